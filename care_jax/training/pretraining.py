"""Builds the networks, optimiser, schedules and train step that a config describes."""
import dataclasses
from typing import Callable, Optional

import flax.linen as nn
import jax
import optax

from care_jax.models import create_networks
from care_jax import parallel
from care_jax.data import augment
from care_jax.errors import UserError
from care_jax.training import optimizers, schedules, state as state_lib
from care_jax.training.online_probe import OnlineProbe
from care_jax.training.train_step import make_train_step

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Pretraining:
  online_net: nn.Module
  target_net: nn.Module
  optimizer: optax.GradientTransformation
  lr_fn: Callable
  tau_fn: Callable
  # (state, (view_1, view_2)[, labels][, mesh=]) -> (state, metrics), not jitted; data
  # parallel over `mesh` (default: one device)
  train_step: Callable
  precision: str
  image_size: int
  probe: Optional[OnlineProbe] = None
  blur_scale: float = 1.0  # augment.pretrain_views

  def abstract_state(self) -> state_lib.TrainState:
    """Shapes and dtypes only: nothing is allocated."""
    return jax.eval_shape(self._create, jax.random.key(0))

  def init_state(self, rng, sharding=None) -> state_lib.TrainState:
    """The initial state, placed with `sharding` (e.g. replicated over the mesh).

    Compiled without XLA's backend optimisations: it runs once, and random initialisation
    of every parameter otherwise takes several times longer to compile than to run.
    """
    init = jax.jit(self._create, out_shardings=sharding).lower(rng).compile(
        compiler_options=FAST_COMPILE)
    return init(rng)

  def jitted_step(self, mesh, augmentation: bool = True):
    """Device-side augmentation of the host crops and the train step, one program over
    the mesh: (state, {"view1", "view2": uint8 crops[, "label"]}) -> (state, metrics).
    The labels are used by the online probe only. `augmentation=False` only normalises
    the crops: the step alone, as benchmarks of other implementations time it."""

    def step(state, batch):
      if augmentation:
        x1, x2 = augment.pretrain_views(state.step_key(), batch["view1"], batch["view2"],
                                        self.blur_scale)
      else:
        x1, x2 = augment.normalize(batch["view1"]), augment.normalize(batch["view2"])
      return self.train_step(state, (x1, x2), batch.get("label"), mesh=mesh)

    return parallel.jit_train_step(step, mesh)

  def _create(self, rng):
    return state_lib.create(rng, self.online_net, self.optimizer, self.image_size,
                            self.precision, self.probe)


def build(config, steps_per_epoch: int, total_steps: int,
          probe: Optional[OnlineProbe] = None) -> Pretraining:
  """The pretraining a config describes; `probe` adds the online probe to state and step."""
  if config.precision not in state_lib.PRECISIONS:
    raise UserError(f"precision must be one of {sorted(state_lib.PRECISIONS)}, got "
                    f"{config.precision!r}.")
  online_net, target_net = create_networks(config.model, config.data.image_size,
                                           state_lib.PRECISIONS[config.precision],
                                           axis_name=parallel.DATA_AXIS)
  optimizer = optimizers.create(config.optimizer)
  lr_fn = schedules.learning_rate(config.optimizer.base_lr, config.global_batch_size,
                                  int(config.optimizer.warmup_epochs * steps_per_epoch),
                                  total_steps)
  tau_fn = schedules.target_decay(config.base_tau, total_steps)
  step = make_train_step(online_net=online_net, target_net=target_net, optimizer=optimizer,
                         lr_fn=lr_fn, tau_fn=tau_fn, cross_weight=config.cross_weight,
                         probe=probe)
  # Configs saved before data.blur_scale existed blurred at the release's scale.
  return Pretraining(online_net, target_net, optimizer, lr_fn, tau_fn, step,
                     config.precision, config.data.image_size, probe,
                     config.data.get("blur_scale", 1.0))
