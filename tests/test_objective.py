"""The CARE loss: values against a hand computation, and where its gradients go."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from care_jax import objectives
from care_jax.training import pretraining
from care_jax.training.schedules import learning_rate, target_decay
from care_jax.training.train_step import care_objective


def unit(v):
  v = np.asarray(v, np.float32)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_loss_matches_a_hand_computation():
  rng = np.random.default_rng(0)
  q1, q2, a1, a2, k1, k2, b1, b2 = (unit(rng.normal(size=(3, 4))) for _ in range(8))
  total, terms = objectives.care_loss({"c": q1, "t": a1}, {"c": q2, "t": a2},
                                      {"c": k1, "t": b1}, {"c": k2, "t": b2}, 100.0)
  cos = lambda x, y: np.sum(x * y, -1)
  c = np.mean((2 - 2 * cos(q1, k1)) + (2 - 2 * cos(q2, k2)))
  t = np.mean((2 - 2 * cos(a1, b1)) + (2 - 2 * cos(a2, b2)))
  mse = lambda x, y: np.mean((x - y) ** 2)
  cross = mse(q1, a1) + mse(q2, a2) + mse(k1, b1) + mse(k2, b2)
  np.testing.assert_allclose(terms["c_loss"], c, rtol=1e-6)
  np.testing.assert_allclose(terms["t_loss"], t, rtol=1e-6)
  np.testing.assert_allclose(terms["cross_loss"], cross, rtol=1e-6)
  np.testing.assert_allclose(total, c + t + 100 * cross, rtol=1e-6)


@pytest.fixture(scope="module")
def gradients():
  """d(term)/d(online params) and d(loss)/d(target params) on the tiny network."""
  from tests.conftest import load_config, quick_jit
  config = load_config("tiny")
  setup = pretraining.build(config, steps_per_epoch=1, total_steps=1)
  state = setup.init_state(jax.random.key(0))
  views = jax.random.normal(jax.random.key(1), (2, 8, 16, 16, 3))
  objective = functools.partial(care_objective, online_stats=state.online_stats,
                                target_stats=state.target_stats, views=views,
                                online_net=setup.online_net, target_net=setup.target_net,
                                cross_weight=1.0)

  def grads(online, target):
    term = lambda name: lambda p: objective(p, target)[1][0][name]
    return ({name: jax.grad(term(name))(online)
             for name in ("c_loss", "t_loss", "cross_loss")},
            jax.grad(lambda t: objective(online, t)[0])(target))

  # Perturb the target so that it differs from the online network, as after some training.
  target = jax.tree.map(lambda p: p * 1.1, state.target_params)
  return quick_jit(grads, state.online_params, target)


def norm(tree):
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


def test_no_gradient_reaches_the_target(gradients):
  _, target_grads = gradients
  assert norm(target_grads) == 0.0


def test_cross_term_pulls_the_c_stream_only(gradients):
  g = gradients[0]["cross_loss"]
  for part in ("t_stream", "t_projector", "t_predictor"):
    assert norm(g[part]) == 0.0, part
  for part in ("c_projector", "c_predictor", "trunk"):
    assert norm(g[part]) > 0.0, part


def test_t_stream_loss_reaches_stem_to_layer3_but_not_layer4(gradients):
  trunk = gradients[0]["t_loss"]["trunk"]
  for name, sub in trunk.items():
    if name.startswith("layer4"):
      assert norm(sub) == 0.0, name
    else:
      assert norm(sub) > 0.0, name
  assert norm(gradients[0]["t_loss"]["c_projector"]) == 0.0
  assert norm(gradients[0]["t_loss"]["t_stream"]) > 0.0


def test_c_stream_loss_does_not_reach_the_t_stream(gradients):
  g = gradients[0]["c_loss"]
  for part in ("t_stream", "t_projector", "t_predictor"):
    assert norm(g[part]) == 0.0, part
  assert norm(g["trunk"]["layer4_0"]) > 0.0


def test_learning_rate_schedule():
  lr = learning_rate(0.05, global_batch_size=1024, warmup_steps=100, total_steps=1000)
  np.testing.assert_allclose(lr(0), 1e-6, rtol=1e-4)
  np.testing.assert_allclose(lr(100), 0.05 * 1024 / 256, rtol=1e-6)
  assert lr(50) < lr(100) and lr(500) < lr(100)
  assert abs(float(lr(1000))) < 1e-7


def test_target_decay_schedule():
  tau = target_decay(0.99, total_steps=1000)
  np.testing.assert_allclose(tau(0), 0.99, rtol=1e-7)
  np.testing.assert_allclose(tau(500), 0.995, rtol=1e-7)
  np.testing.assert_allclose(tau(1000), 1.0, rtol=1e-7)
