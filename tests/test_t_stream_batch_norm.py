"""T-stream BatchNorm per group of examples (the release's per-GPU BatchNorm2d), trunk and
heads over the whole batch (its SyncBN)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from care_jax import parallel
from care_jax.errors import UserError
from care_jax.models import create_networks
from care_jax.models.layers import GroupedBatchNorm, batch_norm
from care_jax.models.t_stream import TStream
from care_jax.training.train_step import apply_to_views
from tests.conftest import load_config, quick_jit, run_on_devices


def batch(seed=0, shape=(8, 3, 3, 5)):
  """Examples whose mean and scale change along the batch, so groups' statistics differ."""
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  ramp = np.arange(shape[0], dtype=np.float32).reshape(-1, *[1] * (len(shape) - 1))
  return x * (1 + ramp) + ramp


def variables(seed=1, features=5):
  """BatchNorm variables away from their initial values, so every one of them matters."""
  rng = np.random.default_rng(seed)
  draw = lambda low, high: jnp.asarray(rng.uniform(low, high, features), jnp.float32)
  return {"params": {"scale": draw(0.5, 2), "bias": draw(-1, 1)},
          "batch_stats": {"mean": draw(-1, 1), "var": draw(0.5, 2)}}


def run(module, x, train=True):
  if not train:
    return module.apply(variables(), x), None
  out, new = module.apply(variables(), x, mutable=["batch_stats"])
  return out, new["batch_stats"]


def whole_batch_norm(train=True):
  return batch_norm(train, jnp.float32, "bn")


def test_each_group_is_normalised_as_its_own_batch():
  """Against nn.BatchNorm (batch_norm) on each group alone; running averages follow the
  first group, as the release's saved model holds rank 0's (GroupedBatchNorm)."""
  x = batch()
  out, stats = run(GroupedBatchNorm(False, group_size=4), x)
  first, first_stats = run(whole_batch_norm(), x[:4])
  second, _ = run(whole_batch_norm(), x[4:])
  np.testing.assert_allclose(out, np.concatenate([first, second]), rtol=1e-5, atol=1e-5)
  for name in ("mean", "var"):
    np.testing.assert_allclose(stats[name], first_stats[name], rtol=1e-6, atol=1e-6)
  global_out, global_stats = run(whole_batch_norm(), x)
  assert np.abs(global_out - out).max() > 0.1  # the grouping matters for this batch
  assert np.abs(global_stats["mean"] - stats["mean"]).max() > 0.1


@pytest.mark.parametrize("group_size", [0, -1, 8, 100])
def test_no_grouping_is_batch_norm(group_size):
  x = batch()
  out, stats = run(GroupedBatchNorm(False, group_size=group_size), x)
  want, want_stats = run(whole_batch_norm(), x)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  for name in ("mean", "var"):
    np.testing.assert_allclose(stats[name], want_stats[name], rtol=1e-6, atol=1e-6)


def test_same_variables_as_batch_norm_and_eval_mode_takes_any_batch():
  x = batch(shape=(6, 2, 2, 5))
  ours = GroupedBatchNorm(True, group_size=4).init(jax.random.key(0), x)
  theirs = whole_batch_norm(False).init(jax.random.key(0), x)
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  # Eval mode uses the running averages: 6 examples need not divide into groups of 4.
  out, _ = run(GroupedBatchNorm(True, group_size=4), x, train=False)
  want, _ = run(whole_batch_norm(False), x, train=False)
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(UserError, match="bn_group_size"):
    run(GroupedBatchNorm(False, group_size=4), x)


def test_t_stream_groups_within_each_view():
  """Both views in one pass (apply_to_views): each group of each view gives what
  the whole-batch T-stream gives on that group alone, and the running averages are the
  release's two sequential updates from the first group of each view."""
  tiny = load_config("tiny").model.t_stream
  make = lambda group_size, axis_name=None: TStream(
      num_blocks=2, out_channels=16, heads=tiny.heads, head_dim=tiny.head_dim,
      bn_group_size=group_size, axis_name=axis_name)
  views = jnp.asarray(np.stack([batch(2, (4, 8, 8, 8)), batch(3, (4, 8, 8, 8))]))
  net_vars = make(0).init(jax.random.key(0), views[0], train=False)
  params, stats = net_vars["params"], net_vars["batch_stats"]
  out, new_stats = quick_jit(
      lambda p, s, v: apply_to_views(make(2, parallel.DATA_AXIS), p, s, v), params, stats,
      views)

  apply_whole = jax.jit(lambda stats, x: make(0).apply(
      {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]))
  want_stats = stats
  for view in range(2):
    for group in range(2):
      part = views[view, 2 * group:2 * group + 2]
      want, updated = apply_whole(want_stats, part)
      # BatchNorm over groups of 2 x 4x4 values amplifies float32 rounding: the reference
      # alone moves by up to 3e-4 between jit and eager.
      np.testing.assert_allclose(out[view, 2 * group:2 * group + 2], want, rtol=1e-4, atol=3e-4)
      if group == 0:
        first_group_stats = updated["batch_stats"]
    want_stats = first_group_stats
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_stats, want_stats)


def test_both_views_in_one_pass_are_two_calls_one_per_view():
  """apply_to_views passes both views through the whole online network at once: its
  outputs and new statistics (trunk, T-stream, heads) must be those of the release's two
  calls, one per view, each its own BatchNorm batch, the second from the first's
  statistics."""
  config = load_config("tiny")
  config.model.t_stream.bn_group_size = 0
  net, _ = create_networks(config.model, 16, axis_name=parallel.DATA_AXIS)
  single, _ = create_networks(config.model, 16)
  views = jnp.asarray(np.stack([batch(4, (4, 16, 16, 3)), batch(5, (4, 16, 16, 3)) * 0.5]))
  net_vars = quick_jit(lambda x: single.init(jax.random.key(0), x, train=False), views[0])
  out, new_stats = quick_jit(lambda v, x: apply_to_views(
      net, v["params"], v["batch_stats"], x), net_vars, views)

  one_view = jax.jit(lambda stats, x: single.apply(
      {"params": net_vars["params"], "batch_stats": stats}, x, train=True,
      mutable=["batch_stats"]))
  stats = net_vars["batch_stats"]
  for view in range(2):
    want, updated = one_view(stats, views[view])
    stats = updated["batch_stats"]
    for key in ("c", "t", "features"):
      np.testing.assert_allclose(out[key][view], want[key], rtol=1e-4, atol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, new_stats, stats)
  # Every statistic moved from its initial value: the comparison above is not of two
  # untouched initialisations.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_stats,
                       net_vars["batch_stats"])
  assert min(jax.tree.leaves(moved)) > 0


def test_config_groups_the_t_stream_only():
  """Through create_networks: with groups of 2, the trunk's and C-stream's outputs and
  statistics are those of the ungrouped network (whole batch), the T-stream's are not."""
  config = load_config("tiny")
  x = jnp.asarray(batch(4, (4, 16, 16, 3)))
  ungrouped, _ = create_networks(config.model, 16)
  config.model.t_stream.bn_group_size = 2
  grouped, _ = create_networks(config.model, 16)
  # tiny's own setting, 128, covers its batches: the whole batch.
  assert grouped.t_stream.bn_group_size == 2 and ungrouped.t_stream.bn_group_size == 128
  net_vars = quick_jit(lambda x: ungrouped.init(jax.random.key(0), x, train=False), x)
  train = lambda net: quick_jit(
      lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]), net_vars, x)
  (out_grouped, new_grouped), (out_whole, new_whole) = train(grouped), train(ungrouped)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  close(out_grouped["c"], out_whole["c"])
  jax.tree.map(close, new_grouped["batch_stats"]["trunk"], new_whole["batch_stats"]["trunk"])
  assert np.abs(out_grouped["t"] - out_whole["t"]).max() > 1e-3
  differs = lambda a, b: float(np.abs(a - b).max())
  assert differs(new_grouped["batch_stats"]["t_stream"]["block0"]["bn_in"]["mean"],
                 new_whole["batch_stats"]["t_stream"]["block0"]["bn_in"]["mean"]) > 1e-4


def test_paper_presets_group_by_the_release_per_gpu_batch():
  """128 images per GPU (spec, "Optimisation"); the tiny and demo batches are one group."""
  for preset in ("r50_100ep", "r152_800ep", "fmnist_demo", "tiny"):
    assert load_config(preset).model.t_stream.bn_group_size == 128
  assert load_config("fmnist_demo").global_batch_size <= 128
  assert load_config("tiny").global_batch_size <= 128


@pytest.mark.slow  # ~50 s: 4 simulated devices in a subprocess
def test_sharded_groups_equal_one_device():
  """4 simulated devices, each computing only its own examples under shard_map: the online
  network with one group of 4 per device (as each GPU holds its 128 images) equals one
  device in outputs, statistics and gradient; so does the layer alone for groups within a
  device, across devices and the whole batch; groups that straddle devices are refused."""
  result = run_on_devices("grouped_bn_on_devices.py", 4)
  assert result["devices"] == 4 and result["batch"] == 16
  errors = result["relative_difference"]
  # float32 sums in another order; BatchNorm over groups of 16-64 values amplifies that in
  # the gradient (measured 4-6e-5), still far below what grouping changes.
  assert errors["outputs"] <= 1e-5 and errors["batch_stats"] <= 1e-5, result
  assert errors["gradient"] <= 1e-3, result
  assert set(result["layer"]) == {"2", "4", "8", "0"}
  for group_size, layer_errors in result["layer"].items():
    for part, error in layer_errors.items():
      assert error <= 1e-6, (group_size, part, result)
  assert "straddle the 4 devices' batches of 6" in result["straddle"], result


def test_a_float64_run_normalises_in_float64():
  """Statistics in promote_types(dtype, float32), as nn.BatchNorm's: a float64 batch is not
  rounded to float32 on the way (it was: 5e-6 from nn.BatchNorm on this batch)."""
  with jax.enable_x64(True):
    x = jnp.asarray(batch(), jnp.float64) * 1e3 + 1e4  # large mean: float32 loses digits
    grouped, grouped_stats = run(GroupedBatchNorm(False, group_size=0, dtype=jnp.float64), x)
    plain, plain_stats = run(batch_norm(True, jnp.float64, "bn"), x)
    assert grouped.dtype == jnp.float64
    np.testing.assert_allclose(grouped, plain, rtol=1e-12, atol=1e-12)
    for name in ("mean", "var"):
      np.testing.assert_allclose(grouped_stats[name], plain_stats[name], rtol=1e-12)
