"""A diverging run stops at the next check with one line and exit status 65, never saves a
non-finite state, keeps its newest (finite) checkpoint and names it, refuses a rerun that
would diverge again and resumes under a lower learning rate."""
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from care_jax import checkpointing
from care_jax.training import divergence
from tests.conftest import load_config

def checkpoint_states(workdir):
  """Every checkpoint's state, as saved."""
  with checkpointing.manager(workdir, read_only=True) as mgr:
    return {step: mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
            .state for step in mgr.all_steps()}


def diverging_after(monkeypatch, first_bad: int):
  """The train step, made to return a non-finite loss and state from step `first_bad` on (counted
  on the host), as a blown-up learning rate does, but at a step known in advance."""
  from care_jax.training import pretraining
  jitted = pretraining.Pretraining.jitted_step

  def poisoned(self, mesh):
    step_fn, taken = jitted(self, mesh), [0]

    def step(state, batch):
      state, metrics = step_fn(state, batch)
      taken[0] += 1
      if taken[0] >= first_bad:
        state = state.replace(online_params=jax.tree.map(lambda x: x * np.nan,
                                                         state.online_params))
        metrics = {**metrics, "loss": metrics["loss"] * np.nan}
      return state, metrics

    return step

  monkeypatch.setattr(pretraining.Pretraining, "jitted_step", poisoned)


@pytest.mark.slow  # ~190 s: three runs of the trainer
def test_a_diverging_run_stops_keeps_finite_checkpoints_and_resumes_with_a_lower_lr(
    tmp_path, image_folder, monkeypatch, capsys):
  """Non-finite from step 7: the log check at step 8 stops the run with exit status 65 and
  one line naming step 6, the newest checkpoint (all finite); the same settings are
  refused with that line; a lower learning rate resumes from step 6 and completes."""
  from care_jax import run_safety, train
  config = load_config("tiny")
  config.data.update(name="image_folder", folder_root=image_folder)
  config.update(num_train_steps=12, checkpoint_every_steps=2, keep_checkpoints=2,
                log_every_steps=4)
  config.monitor.every_steps = 0
  diverging = lambda: run_safety.run(lambda: train.pretrain(config, str(tmp_path)), tmp_path)
  diverging_after(monkeypatch, 7)
  with pytest.raises(SystemExit) as exit_:
    diverging()
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert exit_.value.code == divergence.EXIT_STATUS == 65
  assert last.startswith("error: Training diverged at step 8: the loss or the gradient norm "
                         "is not finite; loss nan"), last
  assert ("Nothing non-finite was saved: the newest checkpoint, step 6, is finite. To resume "
          "from it, rerun with a lower learning rate (--config.optimizer.base_lr, now ") in last
  states = checkpoint_states(tmp_path)
  assert sorted(states) == [4, 6]
  for state in states.values():
    for leaf in jax.tree.leaves(state):
      if np.issubdtype(np.asarray(leaf).dtype, np.inexact):
        assert np.isfinite(leaf).all()

  monkeypatch.undo()  # the same settings: the same line, before any work
  with pytest.raises(SystemExit) as exit_:
    diverging()
  assert exit_.value.code == 65
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      last + " (This rerun has the same settings.)")
  assert sorted(checkpoint_states(tmp_path)) == [4, 6]

  config.optimizer.base_lr /= 10  # a cure: resumes from the newest checkpoint, completes
  train.pretrain(config, str(tmp_path))
  assert sorted(checkpoint_states(tmp_path)) == [10, 12]
  assert not (tmp_path / divergence.MARKER).exists()


def test_the_message_names_a_checkpoint_on_disk_not_a_save_in_flight(tmp_path):
  """The manager lists a step as soon as its save starts; the guard names the newest one
  whose directory orbax completed."""
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-17").mkdir()
  with pytest.raises(divergence.Diverged, match="the newest checkpoint, step 4, is finite"):
    guard(tmp_path, "float32").check_metrics(7, {"loss": math.nan, "grad_norm": 1.0})


def guard(tmp_path, precision):
  config = load_config("tiny")
  config.precision = precision
  return divergence.Guard(config, tmp_path)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_non_finite_loss_or_gradient_norm_stops_float32_and_bfloat16(tmp_path, precision):
  g = guard(tmp_path, precision)
  g.check_metrics(4, {"loss": 60.0, "grad_norm": 12.0, "learning_rate": 0.1})
  for bad in ({"loss": math.nan}, {"grad_norm": math.inf}):
    metrics = {"loss": 60.0, "grad_norm": 12.0, "learning_rate": 0.1, **bad}
    with pytest.raises(divergence.Diverged, match=r"^Training diverged at step 8: the loss or "
                                                  r"the gradient norm is not finite"):
      g.check_metrics(8, metrics)


def test_float16_skips_are_the_loss_scalers_until_the_scale_collapses(tmp_path):
  g = guard(tmp_path, "float16")
  # An overflowed (skipped) step: non-finite loss and gradients, a healthy scale.
  g.check_metrics(4, {"loss": math.inf, "grad_norm": math.nan, "loss_scale": 2.0**14,
                      "learning_rate": 0.1})
  with pytest.raises(divergence.Diverged, match="float16 loss scale fell below 1"):
    g.check_metrics(8, {"loss": math.nan, "grad_norm": math.nan, "loss_scale": 2.0**-3,
                        "learning_rate": 0.1})


def test_a_non_finite_state_is_never_saved(tmp_path):
  g = guard(tmp_path, "float32")
  metrics = {"loss": 1.0, "grad_norm": 1.0, "learning_rate": 0.1}
  g.check_state(2, {"w": np.ones(3, np.float32), "step": np.int32(2)}, metrics)
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)
  with pytest.raises(divergence.Diverged, match="the state holds non-finite values.*newest "
                                                "checkpoint, step 2, is finite"):
    g.check_state(4, {"w": np.array([1, np.inf, 0], np.float32)}, metrics)
  assert divergence.read_marker(tmp_path)["step"] == 4
