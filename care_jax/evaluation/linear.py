"""Linear evaluation (spec, "Linear evaluation"): a frozen encoder in eval mode, a Linear +
BatchNorm head trained with SGD (momentum 0.9, no weight decay, lr 0.2 x batch/256, cosine).

Encoders: the online trunk of a pretraining workdir ("pretrained"), the same network at
random initialisation with its initial BN statistics ("random_init"), or the normalised
pixels themselves ("raw_pixels"). With linear_eval.augment the head trains on random
resized crops + flips through the frozen trunk, as the release does; without it, features
of the centre views are computed once and the head trains on them (fast: the demo's way).

Epochs, evaluations, checkpoints, stops and results.json are the shared loop's
(`supervised`, `training.loop`); the resolution is the pretraining run's unless
linear_eval.image_size says otherwise.
"""
import functools
import itertools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from care_jax import parallel, run_safety
from care_jax.data import augment, input_pipeline
from care_jax.evaluation import classifier, encoders, features, supervised

ENCODERS = ("pretrained", "random_init", "raw_pixels")


class LinearHead(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, features, train: bool):
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                      bias_init=nn.initializers.zeros)(features)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(logits)


def encoder_features(config, source: dict, image_size: int, mesh):
  """(uint8 images -> [B, D] float32 features over the mesh, description) of the encoder
  `source` (encoders.source) names; its checkpoint is read only here."""
  if source["encoder"] == "raw_pixels":
    flat = lambda images: augment.normalize(images).reshape(images.shape[0], -1)
    sharded = parallel.batch_sharded(mesh)
    return jax.jit(flat, in_shardings=sharded, out_shardings=sharded), "raw_pixels"
  network, variables = encoders.load(config, source, image_size, mesh)
  if source["encoder"] == "pretrained":
    description = f"pretrained ({config.linear_eval.pretrained_workdir}, step {source['step']})"
  else:
    description = "random init"
  return (functools.partial(features.trunk_features_fn(network, mesh), variables),
          description)


def head_programs(head: LinearHead, tx, mesh):
  """(train step on a batch of features, an epoch over cached features (cache_features),
  top-1/top-5 counts), jitted over the mesh: the state replicated, each device on its own
  examples."""
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  head_step = classifier.training_step(head.apply, tx)
  train_step = jax.jit(head_step, in_shardings=(replicated, sharded, sharded),
                       out_shardings=(replicated, replicated), donate_argnums=(0,))

  take = take_cached_fn(mesh)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def scan_epoch(state, feats, labels, order):
    """One epoch over the cache (cache_features) in a single dispatch: order is [steps,
    batch] of flat indices into it."""
    state, losses = jax.lax.scan(
        lambda state, idx: head_step(state, *take(feats, labels, idx)), state, order)
    return state, losses[-1]

  @functools.partial(jax.jit, in_shardings=(replicated, sharded, sharded, sharded),
                     out_shardings=replicated)
  def head_counts(state, feats, labels, mask):
    logits = head.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                        feats, train=False)
    return classifier.correct_counts(logits, labels, mask)

  return train_step, scan_epoch, head_counts


def evaluate(config, workdir: str, safety: run_safety.RunSafety | None = None) -> dict:
  """Linear evaluation of linear_eval.encoder; writes and returns results.json's content."""
  safety = safety or run_safety.RunSafety()
  lin = config.linear_eval
  # Everything that can be checked is checked before any work.
  mesh = supervised.check_before_work(config, "linear_eval", ENCODERS, workdir)
  data = config.data.copy_and_resolve_references()
  data.image_size = encoders.image_size(config, "linear_eval", encoders.pretrained_config(lin))
  info = input_pipeline.dataset_info(data)
  input_pipeline.check_batch_fits(info.num_train_examples, lin.global_batch_size,
                                  "linear_eval.global_batch_size")
  source = encoders.source(lin)
  run = supervised.SupervisedRun(workdir, config, "linear_eval", source, safety)
  try:
    features_fn, description = encoder_features(config, source, data.image_size, mesh)
    logging.info("Linear evaluation of %s at %d px: %d epochs.", description,
                 data.image_size, lin.num_epochs)
    training = (_AugmentedTraining(config, data, info, features_fn, mesh) if lin.augment
                else _CachedTraining(config, data, features_fn, mesh, safety))
    history = _train_head(config, data, info, features_fn, mesh, run, training, safety)
  finally:
    run.close()
  return run.write_results(history, encoder=description, epochs=lin.num_epochs,
                           image_size=data.image_size)


def _train_head(config, data, info, features_fn, mesh, run, training, safety) -> list:
  """A new head trained on `training`'s batches through the shared loop."""
  lin = config.linear_eval
  steps_per_epoch = input_pipeline.steps_per_epoch(training.num_train, lin.global_batch_size)
  lr = optax.cosine_decay_schedule(lin.base_lr * lin.global_batch_size / 256,
                                   lin.num_epochs * steps_per_epoch)
  tx = optax.chain(optax.add_decayed_weights(lin.weight_decay),
                   optax.sgd(lr, momentum=lin.momentum))
  head = LinearHead(info.num_classes)
  feature_dim = jax.eval_shape(features_fn, jax.ShapeDtypeStruct(
      (mesh.devices.size, data.image_size, data.image_size, 3), jnp.uint8)).shape[-1]
  variables = head.init(jax.random.key(config.seed), jnp.zeros((2, feature_dim)), train=False)
  initial = jax.device_put(classifier.initial_state(
      variables["params"], variables["batch_stats"], tx), parallel.replicated(mesh))
  train_step, scan_epoch, head_counts = head_programs(head, tx, mesh)
  state, start, history = run.restore(initial)
  eval_features = []  # the frozen encoder's features of the eval split, computed once

  def eval_batches():
    if not eval_features:
      for batch in features.apply_to_split(features_fn, data, data.eval_split, mesh):
        eval_features.append(batch)
        safety.check()
    return eval_features

  top_k = supervised.TopK(eval_batches, lambda state, batch: head_counts(state, *batch),
                          safety)
  step_fn, batches, stride = training.steps(train_step, scan_epoch, start, steps_per_epoch)
  try:
    return run.train(state, history, start=start, step_fn=step_fn, batches=batches,
                     steps_per_epoch=steps_per_epoch, num_epochs=lin.num_epochs,
                     eval_every_epochs=lin.eval_every_epochs, evaluators=[top_k],
                     learning_rate=lr, batch_size=lin.global_batch_size, stride=stride)
  finally:
    training.close()


class _AugmentedTraining:
  """The head trains on random resized crops + flips through the frozen trunk, one step a
  batch (the release's way)."""

  def __init__(self, config, data, info, features_fn, mesh):
    self._config, self._data, self._features_fn, self._mesh = config, data, features_fn, mesh
    self.num_train = info.num_train_examples
    self._batches = None

  def steps(self, train_step, scan_epoch, start: int, steps_per_epoch: int):
    del scan_epoch, steps_per_epoch
    lin = self._config.linear_eval
    self._batches = input_pipeline.labelled_batches(
        self._data, global_batch_size=lin.global_batch_size, seed=self._config.seed,
        start_step=start, process_index=jax.process_index(),
        process_count=jax.process_count())

    def step_fn(state, batch):
      images, labels = parallel.host_to_global(self._mesh, (batch["image"], batch["label"]))
      state, loss = train_step(state, self._features_fn(images), labels)
      return state, {"loss": loss}

    return step_fn, self._batches, 1

  def close(self) -> None:
    if self._batches is not None:
      self._batches.close()


class _CachedTraining:
  """Features of the centre views of the train split, computed once (of the examples that
  survived decoding); an epoch over them is one dispatch (the demo's way). A stop while
  they are computed saves nothing: a rerun computes them again."""

  def __init__(self, config, data, features_fn, mesh, safety):
    parts = []
    for part in features.apply_to_split(features_fn, data, data.train_split, mesh):
      parts.append(part)
      safety.check()
    self._feats, self._labels, self._valid = cache_features(parts, mesh)
    self.num_train = len(self._valid)
    self._config = config
    input_pipeline.check_batch_fits(self.num_train, config.linear_eval.global_batch_size,
                                    "linear_eval.global_batch_size")

  def steps(self, train_step, scan_epoch, start: int, steps_per_epoch: int):
    del train_step
    batch = self._config.linear_eval.global_batch_size

    def orders():  # epoch e's order of the cached examples
      for epoch in itertools.count(start // steps_per_epoch + 1):
        rng = np.random.default_rng([self._config.seed, epoch])
        order = self._valid[rng.permutation(self.num_train)][:steps_per_epoch * batch]
        yield order.reshape(steps_per_epoch, batch)

    def step_fn(state, order):
      state, loss = scan_epoch(state, self._feats, self._labels, order)
      return state, {"loss": loss}

    return step_fn, orders(), steps_per_epoch

  def close(self) -> None:
    pass


def cache_features(parts, mesh):
  """(features [batches, B, D], labels [batches, B], indices of the valid examples) from
  (features, labels, mask) global batches sharded over the devices: the cache stays where
  the batches were computed (features.stack_batches), each device holding its 1/n (never
  replicated: ImageNet's 1.28M x 2048 float32 features are 10.5 GB), and only the mask
  comes to the host."""
  feats, labels, mask = features.stack_batches(parts, mesh)
  return feats, labels, np.flatnonzero(multihost_utils.process_allgather(mask, tiled=True))


def take_cached_fn(mesh):
  """(cached features, labels, flat indices [batch]) -> (features, labels) of the batch,
  sharded over the devices (not jitted)."""
  cache = P(None, parallel.DATA_AXIS)
  return parallel.per_device(functools.partial(_take_cached, axis=parallel.DATA_AXIS), mesh,
                             in_specs=(cache, cache, P()),
                             out_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)))


def _take_cached(feats, labels, idx, *, axis: str):
  """This device's slice of the batch `idx` (flat indices, the same on every device) from
  the cache: each device looks up the rows it holds (zeros elsewhere) and one psum of the
  batch gives every device every row; adding zeros is exact."""
  local, devices = feats.shape[1], jax.lax.axis_size(axis)
  batch, row = idx // (local * devices), idx % (local * devices)
  mine = row // local == jax.lax.axis_index(axis)
  where = lambda x: jnp.where(mine.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)
  rows = jax.lax.psum((where(feats[batch, row % local]), where(labels[batch, row % local])),
                      axis)
  share = idx.shape[0] // devices
  return tuple(jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis) * share, share)
               for x in rows)
