"""A diverging run stops at the next check with one line and exit status 65, never saves a
non-finite state, keeps its newest (finite) checkpoint, refuses a rerun that would diverge
again and resumes under a lower learning rate."""
import math
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from care_jax import checkpointing
from care_jax.training import divergence
from tests.conftest import ROOT, load_config, tiny_run_args

RUN = ("--config.num_train_steps=12", "--config.checkpoint_every_steps=2",
       "--config.keep_checkpoints=2", "--config.log_every_steps=4")


def run(args, timeout=300):
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def checkpoint_states(workdir):
  """Every checkpoint's state, as saved."""
  with checkpointing.manager(workdir, read_only=True) as mgr:
    return {step: mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
            .state for step in mgr.all_steps()}


def test_a_diverging_run_stops_keeps_finite_checkpoints_and_resumes_with_a_lower_lr(
    tmp_path, image_folder):
  diverging = tiny_run_args(image_folder, tmp_path, *RUN, "--config.optimizer.base_lr=1e30")
  out = run(diverging)
  assert out.returncode == divergence.EXIT_STATUS == 65, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: Training diverged at step "), last
  assert "Traceback" not in out.stderr
  step = int(last.split("diverged at step ")[1].split(":")[0])
  assert "learning rate" in last and "--config.optimizer.base_lr, now 1e+30" in last
  states = checkpoint_states(tmp_path)
  assert all(s < step for s in states)  # stopped at the first check after it
  for state in states.values():  # nothing non-finite was written
    for leaf in jax.tree.leaves(state):
      if np.issubdtype(np.asarray(leaf).dtype, np.inexact):
        assert np.isfinite(leaf).all()
  if states:
    assert f"the newest checkpoint, step {max(states)}, is finite" in last

  again = run(diverging)  # the same settings: the same line, before any work
  assert again.returncode == 65 and "Traceback" not in again.stderr
  assert again.stderr.strip().splitlines()[-1] == last + " (This rerun has the same settings.)"
  assert checkpoint_states(tmp_path).keys() == states.keys()

  # Another learning rate may cure it: the rerun resumes from the newest checkpoint. (That
  # one is finite but 1e30 has already blown it up, so this run diverges in turn, under its
  # own settings: the guard judges the numbers, not the advice.)
  cured = run(tiny_run_args(image_folder, tmp_path, *RUN, "--config.optimizer.base_lr=0.05"))
  assert cured.returncode in (0, 65), cured.stderr[-3000:]
  assert "Traceback" not in cured.stderr
  if states:
    assert f"Resumed from step {max(states)} of 12" in cured.stderr
  if cured.returncode == 65:
    assert "(--config.optimizer.base_lr, now 0.05)" in cured.stderr.strip().splitlines()[-1]
    assert divergence.read_marker(tmp_path)["settings"]["optimizer.base_lr"] == 0.05
  else:
    assert max(checkpoint_states(tmp_path)) == 12
    assert not (tmp_path / divergence.MARKER).exists()


def guard(tmp_path, precision):
  config = load_config("tiny")
  config.precision = precision
  return divergence.Guard(config, tmp_path)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_non_finite_loss_or_gradient_norm_stops_float32_and_bfloat16(tmp_path, precision):
  g = guard(tmp_path, precision)
  g.check_metrics(4, {"loss": 60.0, "grad_norm": 12.0, "learning_rate": 0.1}, None)
  for bad in ({"loss": math.nan}, {"grad_norm": math.inf}):
    metrics = {"loss": 60.0, "grad_norm": 12.0, "learning_rate": 0.1, **bad}
    with pytest.raises(divergence.Diverged, match=r"^Training diverged at step 8: the loss or "
                                                  r"the gradient norm is not finite"):
      g.check_metrics(8, metrics, None)


def test_float16_skips_are_the_loss_scalers_until_the_scale_collapses(tmp_path):
  g = guard(tmp_path, "float16")
  # An overflowed (skipped) step: non-finite loss and gradients, a healthy scale.
  g.check_metrics(4, {"loss": math.inf, "grad_norm": math.nan, "loss_scale": 2.0**14,
                      "learning_rate": 0.1}, None)
  with pytest.raises(divergence.Diverged, match="float16 loss scale fell below 1"):
    g.check_metrics(8, {"loss": math.nan, "grad_norm": math.nan, "loss_scale": 2.0**-3,
                        "learning_rate": 0.1}, 6)


def test_a_non_finite_state_is_never_saved(tmp_path):
  g = guard(tmp_path, "float32")
  metrics = {"loss": 1.0, "grad_norm": 1.0, "learning_rate": 0.1}
  g.check_state(2, {"w": np.ones(3, np.float32), "step": np.int32(2)}, metrics, None)
  with pytest.raises(divergence.Diverged, match="the state holds non-finite values.*newest "
                                                "checkpoint, step 2, is finite"):
    g.check_state(4, {"w": np.array([1, np.inf, 0], np.float32)}, metrics, 2)
  assert divergence.read_marker(tmp_path)["step"] == 4
