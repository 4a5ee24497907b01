"""Architecture: parameter counts against the spec and torchvision, any input size."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from care_jax import summary
from care_jax.models import create_networks
from care_jax.models.t_stream import _relative_logits_1d
from care_jax.training import pretraining
from tests.conftest import load_config, quick_jit


def abstract_state(config):
  setup = pretraining.build(config, steps_per_epoch=1, total_steps=1)
  return setup.abstract_state()


def test_resnet50_counts_match_the_spec_exactly():
  rows = summary.parameter_counts(abstract_state(load_config("r50_100ep")))
  assert rows["trunk"] == (23508032, 23508032)
  assert rows["t_stream"] == (32813568, 32813568)
  assert rows["c_projector"][0] + rows["c_predictor"][0] == 11559424
  assert rows["t_projector"] == (9449728, 9449728)
  assert rows["c_predictor"][1] is None
  assert rows["total"] == (79440448, 75221056)


# torchvision's published totals for resnet101 (44549160), resnet152 (60192808) and
# wide_resnet50_2 (68883240), less their 2048 x 1000 + 1000 classifier. The heads and the
# T-stream do not depend on the trunk (the release hard-codes 1024 -> 2048 channels).
@pytest.mark.parametrize("preset,trunk", [("r101_100ep", 42500160), ("r152_100ep", 58143808),
                                          ("r50x2_100ep", 66834240)])
def test_larger_trunks_match_torchvision(preset, trunk):
  rows = summary.parameter_counts(abstract_state(load_config(preset)))
  heads = 2 * 11559424
  assert rows["trunk"][0] == trunk
  assert rows["total"] == (trunk + 32813568 + heads, trunk + 32813568 + 2 * 9449728)


# layer3 is 1/4 of the input with the small stem (auto for <= 64 px), 1/8 with the small
# stem and its max-pool (ceil for odd sizes), 1/16 with ImageNet's.
@pytest.mark.parametrize("size,stem,layer3", [(28, "auto", 7), (36, "auto", 9),
                                              (28, "small_pool", 4), (64, "imagenet", 4)])
def test_any_input_size_works_and_sizes_the_position_tables(size, stem, layer3, tiny_config):
  config = tiny_config
  config.model.stem = stem
  online, _ = create_networks(config.model, size)
  x = jnp.ones((2, size, size, 3))
  variables = quick_jit(lambda x: online.init(jax.random.key(0), x, train=False), x)
  out = quick_jit(lambda v, x: online.apply(v, x, train=False), variables, x)
  # The T-stream's first block attends over the layer3 map, whatever its size.
  pos = variables["params"]["t_stream"]["block0"]["attention"]["pos_height"]
  assert pos.shape[0] == layer3
  assert out["c"].shape == out["t"].shape == (2, config.model.projection_dim)
  np.testing.assert_allclose(jnp.linalg.norm(out["c"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(out["t"], axis=-1), 1.0, rtol=1e-5)


def test_relative_position_logits_match_a_direct_loop():
  rng = np.random.default_rng(0)
  b, heads, x, y, d = 1, 2, 3, 4, 5
  q = rng.normal(size=(b, heads, x, y, d)).astype(np.float32)
  table = rng.normal(size=(2 * y - 1, d)).astype(np.float32)
  got = np.asarray(_relative_logits_1d(jnp.asarray(q), jnp.asarray(table)))
  want = np.zeros((b, heads, x, y, y), np.float32)
  for i in range(y):
    for j in range(y):
      want[..., i, j] = q[..., i, :] @ table[j - i + y - 1]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_relative_variant_builds_and_runs(tiny_config):
  tiny_config.model.t_stream.position_embedding = "relative"
  online, _ = create_networks(tiny_config.model, 16)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = quick_jit(lambda x: online.init(jax.random.key(0), x, train=False), x)
  attention = variables["params"]["t_stream"]["block0"]["attention"]
  assert set(attention) == {"qkv", "rel_height", "rel_width"}
  out = quick_jit(lambda v, x: online.apply(v, x, train=False), variables, x)
  assert np.all(np.isfinite(out["t"]))
