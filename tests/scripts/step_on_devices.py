"""Runs two train steps of the tiny config on a 1-device mesh and on all devices (the test
sets XLA_FLAGS for 8 simulated CPU devices), same global batch, and prints as JSON the
relative difference of each part of the resulting state (conftest.relative_differences).

The networks compute in float64 (the parameters stay float32): each device now sums its own
examples and the devices' sums are added, an order float32 rounding follows closely enough
on this tiny net (BatchNorm over 2 examples a device) to move the momentum buffers by 1e-3;
in float64 what is left is the rounding of the float32 parameters, so the comparison shows
that the sharded step computes what one device computes.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from care_jax import parallel
from care_jax.training import pretraining, state as state_lib
from tests.conftest import load_config, relative_differences


def run(devices, config, views):
  mesh = parallel.create_mesh(devices)
  setup = pretraining.build(config, steps_per_epoch=10, total_steps=20)
  state = setup.init_state(jax.random.key(0), parallel.replicated(mesh))
  step = parallel.jit_train_step(functools.partial(setup.train_step, mesh=mesh), mesh)
  for v in views:
    state, metrics = step(state, parallel.host_to_global(mesh, (v[0], v[1])))
  return jax.device_get(state), jax.device_get(metrics)


def main():
  jax.config.update("jax_enable_x64", True)
  state_lib.PRECISIONS["float64"] = jnp.float64  # for this comparison only
  config = load_config("tiny")
  config.global_batch_size = 16
  config.precision = "float64"
  rng = np.random.default_rng(0)
  views = rng.normal(size=(2, 2, 16, 16, 16, 3))
  one, m1 = run(jax.devices()[:1], config, views)
  many, m8 = run(jax.devices(), config, views)
  errors = relative_differences(one, many)
  print(json.dumps({"devices": len(jax.devices()), "relative_difference": errors,
                    "loss_1": float(m1["loss"]), "loss_n": float(m8["loss"]),
                    "leaves": len(jax.tree.leaves(one))}))


if __name__ == "__main__":
  main()
