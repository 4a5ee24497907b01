"""The whole training state as one pytree (what a checkpoint holds)."""
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
from flax.training.dynamic_scale import DynamicScale

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  online_params: Any
  online_stats: Any  # BatchNorm running statistics
  target_params: Any
  target_stats: Any
  opt_state: Any
  loss_scale: Optional[DynamicScale]  # float16 only
  rng: jax.Array  # raw key data (uint32, checkpointable); each step folds in its step
  probe: Optional[Any] = None  # online_probe.ProbeState when the online probe is on

  def step_key(self) -> jax.Array:
    """The key for this step's randomness (augmentations): a function of (seed, step)."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def target_subtree(online_tree):
  """The target network has everything the online one has except the predictors."""
  return {k: v for k, v in online_tree.items() if not k.endswith("_predictor")}


def create(rng, online_net, optimizer, image_size: int, precision: str,
           probe=None) -> TrainState:
  """Initial state; the target starts as a copy of the online network (spec).

  The probe's key is folded from `rng`, not split from it, so that turning the probe on
  leaves the networks' initialisation unchanged.
  """
  init_rng, state_rng = jax.random.split(rng)
  dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  variables = online_net.init(init_rng, dummy, train=False)
  probe_state = None
  if probe is not None:
    features = jax.eval_shape(
        lambda v: online_net.apply(v, dummy, method=online_net.trunk_features), variables)
    probe_state = probe.init(jax.random.fold_in(rng, 1), features.shape[-1])
  params, stats = variables["params"], variables["batch_stats"]
  copy = lambda tree: jax.tree.map(jnp.copy, target_subtree(tree))
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      online_params=params, online_stats=stats,
      target_params=copy(params), target_stats=copy(stats),
      opt_state=optimizer.init(params),
      loss_scale=(DynamicScale(fin_steps=jnp.zeros((), jnp.int32),
                               scale=jnp.asarray(2.0**16, jnp.float32))
                  if precision == "float16" else None),
      rng=jax.random.key_data(state_rng),
      probe=probe_state)
