"""The CARE objective (spec, "Objective"): two BYOL losses plus the cross-stream term.

All inputs are unit-norm [batch, dim] outputs; `online_i` and `target_i` are dicts with
"c" and "t" entries, where target_i was computed from the *other* view than online_i.
"""
import jax
import jax.numpy as jnp


def byol_loss(online_1, target_1, online_2, target_2):
  """Batch mean of (2 - 2 cos) summed over both views; the release's `4 - 2 (...)`."""
  cos = lambda a, b: jnp.sum(a * b, axis=-1)
  return jnp.mean(4.0 - 2.0 * (cos(online_1, target_1) + cos(online_2, target_2)))


def mse(x, y):
  return jnp.mean(jnp.square(x - y))


def care_loss(online_1, online_2, target_1, target_2, cross_weight: float = 100.0):
  """Returns (total, terms) with each term for logging.

  The cross-stream term pulls the C-stream towards the T-stream: the T-stream side is a
  stop-gradient. The release also adds the same MSE between the target's C and T outputs;
  it carries no gradient but is part of the logged value, so it is kept here.
  """
  sg = jax.lax.stop_gradient
  target_1, target_2 = sg(target_1), sg(target_2)
  c_loss = byol_loss(online_1["c"], target_1["c"], online_2["c"], target_2["c"])
  t_loss = byol_loss(online_1["t"], target_1["t"], online_2["t"], target_2["t"])
  cross = (mse(online_1["c"], sg(online_1["t"])) + mse(online_2["c"], sg(online_2["t"]))
           + mse(target_1["c"], target_1["t"]) + mse(target_2["c"], target_2["t"]))
  total = c_loss + t_loss + cross_weight * cross
  return total, {"loss": total, "c_loss": c_loss, "t_loss": t_loss, "cross_loss": cross}
