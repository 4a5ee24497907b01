"""The train step: sharding invariance, the EMA target, and mixed precision."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from care_jax.training import pretraining
from tests.conftest import load_config, quick_compile, quick_jit, run_on_devices


@pytest.mark.slow  # ~60 s; test_multiprocess checks 2 processes x 2 devices against 1 device
def test_eight_devices_give_the_state_of_one():
  """Each of 8 devices computes its own 2 examples (tests/scripts/step_on_devices.py, in
  float64): the state after two steps is one device's to the rounding of float32 params."""
  result = run_on_devices("step_on_devices.py", 8)
  assert result["devices"] == 8
  assert result["leaves"] > 100  # params, BN statistics, optimiser state of both networks
  assert set(result["relative_difference"]) == {
      "online_params", "online_stats", "target_params", "target_stats", "opt_state"}
  # Measured 2026-12-05: params and statistics <= 3e-8 apart; the momentum buffers (sums of
  # float32 gradients) 1.6e-6.
  bounds = {"opt_state": 1e-5}
  for part, difference in result["relative_difference"].items():
    assert difference <= bounds.get(part, 1e-6), result


def build(precision="float32"):
  config = load_config("tiny")
  config.precision = precision
  setup = pretraining.build(config, steps_per_epoch=10, total_steps=20)
  return setup, setup.init_state(jax.random.key(0))


def views(seed=1, batch=8):
  x = np.random.default_rng(seed).standard_normal((2, batch, 16, 16, 3), np.float32)
  return x[0], x[1]


def test_step_updates_target_as_ema_of_new_online():
  setup, state = build()
  before = jax.device_get(state)
  new, metrics = quick_jit(setup.train_step, state, views())
  tau = float(setup.tau_fn(1))
  assert int(new.step) == 1 and load_config("tiny").base_tau < tau < 1.0
  assert float(metrics["tau"]) == pytest.approx(tau)
  want = jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, before.target_params,
                      {k: v for k, v in new.online_params.items() if "predictor" not in k})
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(new.target_params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  moved = jax.tree_util.tree_leaves_with_path(jax.tree.map(
      lambda a, b: float(jnp.max(jnp.abs(a - b))), before.online_params, new.online_params))
  kernels = [v for path, v in moved if jax.tree_util.keystr(path).endswith("['kernel']")]
  assert len(kernels) > 30 and min(kernels) > 0  # every conv and dense layer was trained


def test_float16_overflow_is_skipped_and_scale_reduced():
  setup, state = build("float16")
  # A scale this large makes the float16 backward pass overflow.
  state = state.replace(loss_scale=state.loss_scale.replace(scale=jnp.float32(3e38)))
  before = jax.device_get(state)
  new, metrics = quick_jit(setup.train_step, state, views())
  assert int(metrics["skipped_step"]) == 1
  assert float(new.loss_scale.scale) == pytest.approx(1.5e38)
  assert float(metrics["loss_scale"]) == pytest.approx(1.5e38)  # logged with the others
  assert int(new.step) == 1  # the data stream and schedules move on
  for name in ("online_params", "online_stats", "target_params", "target_stats", "opt_state"):
    for a, b in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(new, name))):
      np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_training_stays_finite(precision):
  setup, state = build(precision)
  start = jax.device_get(state.online_params)
  # Without backend optimisation: the float16 program takes minutes to compile otherwise.
  step = quick_compile(setup.train_step, state, views())
  losses, skipped = [], []
  for i in range(6):
    state, metrics = step(state, views(seed=i))
    losses.append(float(metrics["loss"]))
    skipped.append(int(metrics["skipped_step"]))
  assert np.all(np.isfinite(losses)), losses
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.online_params))
  # Parameters and optimiser state stay float32; only the compute is reduced.
  assert {x.dtype for x in jax.tree.leaves(state.online_params)} == {jnp.dtype("float32")}
  # float16 starts at torch's scale 2^16, which overflows here at first; the scale falls
  # until steps go through, as with torch.cuda.amp.GradScaler.
  assert sum(skipped) < len(skipped), skipped
  if precision == "float16":
    assert float(state.loss_scale.scale) == 2.0**16 / 2**sum(skipped)
  else:
    assert sum(skipped) == 0
  drift = max(float(jnp.max(jnp.abs(a - b)))
              for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(state.online_params)))
  assert drift > 0
