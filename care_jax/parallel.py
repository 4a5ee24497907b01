"""Data parallelism: one `data` mesh axis over every device of every process.

The batch is sharded along it and the state replicated. The networks' training-mode passes
run under `jax.shard_map` over that axis (`per_device`), so each device computes only its
own examples; their BatchNorms average the statistics over the axis, so the trunk's and
heads' statistics are those of the global batch (the release's SyncBN), and the T-stream
normalises contiguous groups of `model.t_stream.bn_group_size` examples (the release's
per-GPU BatchNorm2d: each device's own shard when the per-device batch equals the group
size). The losses, the optimiser and most evaluation programs are plain jit, where XLA
partitions the batch axis and inserts the reductions itself; kNN's count runs per device
too. Left to jit, the vmap over the two views merged the view axis into the sharded batch
axis, which XLA could only partition by gathering every activation onto every device
(care_jax.scaling checks every program for that).
"""
import collections

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from care_jax.errors import UserError


DATA_AXIS = "data"


def create_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def per_device(fn, mesh: Mesh, in_specs, out_specs):
  """`fn` run on each device's shard (jax.shard_map over the data axis); specs name the
  batch axis with DATA_AXIS, as PartitionSpecs."""
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch_size % n:
    raise UserError(
        f"The global batch size {global_batch_size} does not divide over the {n} devices "
        f"in use; set --config.global_batch_size to a multiple of {n} (e.g. "
        f"{max(n, global_batch_size // n * n)}).")


def host_to_global(mesh: Mesh, local_batch):
  """Process-local numpy arrays -> global arrays sharded over the batch axis."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


def jit_train_step(step_fn, mesh: Mesh):
  """jit with the state replicated and donated, the batch sharded, metrics replicated."""
  return jax.jit(step_fn, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=(0,))


class InFlight:
  """Lets at most `depth` dispatched programs run ahead: each call waits for the result
  passed `depth` calls earlier.

  XLA:CPU deadlocks when dozens of programs with collectives are queued on its simulated
  devices: the full-count rehearsal's evaluation loops, fed from a cache, hung that way
  (docs/scale.md). Two in flight keep a GPU as busy as more would.
  """

  def __init__(self, depth: int = 2):
    self._depth, self._pending = depth, collections.deque()

  def __call__(self, result):
    self._pending.append(result)
    if len(self._pending) > self._depth:
      jax.block_until_ready(self._pending.popleft())
    return result
