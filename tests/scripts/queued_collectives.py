"""Dozens of programs with collectives dispatched back to back on 8 simulated devices, as
an evaluation loop over cached batches dispatches them, with parallel.InFlight bounding
the queue (without it XLA:CPU deadlocked here: docs/scale.md). Prints the sums as JSON."""
import json

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from care_jax import parallel

mesh = parallel.create_mesh()
sharded = NamedSharding(mesh, P(parallel.DATA_AXIS))


@jax.jit
def heavy(x):  # per-device work between two collectives (an all-gather, a sum)
  for _ in range(8):
    x = jnp.tanh(x @ x.T @ x * 1e-3)
  return jnp.sum(x)


x = jax.device_put(jnp.ones((8 * 128, 128)), sharded)
mask = jax.device_put(jnp.ones((8 * 64,)), sharded)
a = b = 0
in_flight = parallel.InFlight()
for _ in range(60):
  a, b = in_flight((a + heavy(x), b + jnp.sum(mask)))
print(json.dumps({"a": float(a), "b": float(b)}))
