"""Pretraining's evaluator, run every monitor.every_steps steps and at its end: how well the
online trunk's features classify the eval split, by weighted kNN against a bank of
training examples (`knn_top1`) and by the online probe (`online_probe_top1`), from one
pass of the trunk over the split.

Both take the eval-mode trunk (BatchNorm running statistics) on centre views, as linear
evaluation does, so the three figures are comparable.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from care_jax import parallel
from care_jax.evaluation import features, knn
from care_jax.training.online_probe import OnlineProbe


def probe_count_fn(probe: OnlineProbe, mesh):
  """(probe params, features, labels, mask) -> correct count, jitted over the mesh."""
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(probe.correct_count, in_shardings=(replicated, sharded, sharded, sharded),
                 out_shardings=replicated)


class Monitor:
  """An evaluator (`evaluate(state) -> metrics`) of a pretraining TrainState."""

  def __init__(self, config, mesh, online_net, probe: Optional[OnlineProbe],
               num_train_examples: int, num_classes: int, safety):
    m = config.monitor
    self._data, self._mesh, self._safety = config.data, mesh, safety
    self._features = features.trunk_features_fn(online_net, mesh)
    self._knn = (knn.Knn(mesh, k=m.knn_k, temperature=m.knn_temperature,
                         num_classes=num_classes) if m.knn else None)
    self._bank = knn.bank_indices(num_train_examples, m.knn_bank_size, config.seed)
    self._probe_correct = None if probe is None else probe_count_fn(probe, mesh)

  def evaluate(self, state) -> dict:
    """{'knn_top1', 'online_probe_top1'} (those that are on). A stop request between
    batches raises run_safety.Stopped (single-process runs)."""
    embed = functools.partial(
        features.apply_to_split,
        functools.partial(self._features, {"params": state.online_params,
                                           "batch_stats": state.online_stats}),
        self._data, mesh=self._mesh)
    if self._knn is not None:
      self._knn.set_bank(list(embed(split=self._data.train_split, indices=self._bank)))
    knn_correct = probe_correct = total = jnp.zeros((), jnp.int32)
    in_flight = parallel.InFlight()
    for feats, labels, mask in embed(split=self._data.eval_split):
      total += jnp.sum(mask)
      if self._knn is not None:
        knn_correct += self._knn.correct(feats, labels, mask)
      if self._probe_correct is not None:
        probe_correct += self._probe_correct(state.probe.params, feats, labels, mask)
      in_flight((total, knn_correct, probe_correct))
      self._safety.check()
    knn_correct, probe_correct, total = (int(x) for x in jax.device_get(
        (knn_correct, probe_correct, total)))
    out = {}
    if self._knn is not None:
      out["knn_top1"] = knn_correct / total
    if self._probe_correct is not None:
      out["online_probe_top1"] = probe_correct / total
    return out


def create(config, mesh, online_net, probe, info, safety) -> Optional[Monitor]:
  """The monitor a config asks for, or None (off, or nothing to report on)."""
  if (config.monitor.every_steps <= 0 or info.num_classes < 2
      or (not config.monitor.knn and probe is None)):
    return None
  return Monitor(config, mesh, online_net, probe, info.num_train_examples, info.num_classes,
                 safety)
