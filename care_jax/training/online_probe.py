"""A linear classifier trained alongside pretraining: BYOL's online classifier.

At every pretraining step it takes one step of its own optimiser on the batch's labels,
with the stop-gradient pooled trunk features of the first view as input (train-mode
BatchNorm, as the step computes them anyway). It never sends a gradient into the encoder,
so the encoder trains exactly as without it (tests/test_monitor.py checks this bitwise),
and it costs one small matrix product per step. Evaluated on eval-mode features of the
eval split, its top-1 follows the features' linear separability during the run, without
the separate 80-epoch linear evaluation.
"""
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class ProbeState:
  params: Any  # {"kernel": [D, C], "bias": [C]}
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class OnlineProbe:
  num_classes: int
  learning_rate: float
  total_steps: int  # of the pretraining: the probe's lr decays to 0 over them

  def _optimizer(self) -> optax.GradientTransformation:
    # Adam, whose step does not scale with the drifting features; the cosine lets the probe
    # chase the moving features early and settle on them at the end (as solo-learn's
    # online classifier follows the encoder's schedule).
    return optax.adam(optax.cosine_decay_schedule(self.learning_rate, self.total_steps))

  def init(self, rng, feature_dim: int) -> ProbeState:
    params = {"kernel": 0.01 * jax.random.normal(rng, (feature_dim, self.num_classes)),
              "bias": jnp.zeros((self.num_classes,))}
    return ProbeState(params, self._optimizer().init(params))

  @staticmethod
  def logits(params, features):
    return features @ params["kernel"] + params["bias"]

  def update(self, probe: ProbeState, features, labels) -> tuple[ProbeState, dict]:
    """One optimiser step on (features, labels); features get no gradient."""
    features = jax.lax.stop_gradient(features)

    def loss_fn(params):
      logits = self.logits(params, features)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe.params)
    updates, opt_state = self._optimizer().update(grads, probe.opt_state, probe.params)
    metrics = {"online_probe_loss": loss,
               "online_probe_train_top1": jnp.mean(jnp.argmax(logits, -1) == labels)}
    return ProbeState(optax.apply_updates(probe.params, updates), opt_state), metrics

  def correct_count(self, params, features, labels, mask):
    return jnp.sum((jnp.argmax(self.logits(params, features), -1) == labels) & mask)


def from_config(monitor_config, num_classes: int, total_steps: int):
  """The probe a config asks for, or None when it is off or the data has no labels."""
  if not monitor_config.online_probe or num_classes < 2:
    return None
  return OnlineProbe(num_classes, monitor_config.online_probe_lr, total_steps)
