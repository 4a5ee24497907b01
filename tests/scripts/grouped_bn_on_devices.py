"""T-stream BatchNorm groups on one device and on all (the test sets XLA_FLAGS for 4
simulated CPU devices), printed as JSON relative differences:

- the online network of the tiny config with groups of 4 examples, run on both views in
  training mode (outputs, new BatchNorm statistics, gradient of the loss's stand-in) as the
  train step runs it (apply_to_views): each device holds one group of the global batch of
  16, as each GPU holds its 128 images in the release;
- GroupedBatchNorm alone under shard_map, for groups within a device (2), one per device
  (4), across two devices (8) and the whole batch (0), against the layer on one device;
- the error for groups that straddle devices' batches.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from care_jax import parallel
from care_jax.errors import UserError
from care_jax.models import create_networks
from care_jax.models.layers import GroupedBatchNorm
from care_jax.training.pretraining import FAST_COMPILE
from care_jax.training.train_step import apply_to_views
from tests.conftest import load_config

GROUP_SIZE = 4


def forward_and_gradient(net, variables, views, mesh):
  """(outputs, new batch_stats, gradient) of a loss that reaches every parameter."""

  def loss(params):
    outputs, stats = apply_to_views(net, params, variables["batch_stats"], views, mesh)
    return jnp.sum(outputs["c"] * outputs["t"]) + jnp.mean(outputs["features"]), (outputs,
                                                                                   stats)

  (_, (outputs, stats)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  return outputs, stats, grads


def run_on(devices, net, variables, views):
  mesh = parallel.create_mesh(devices)
  views = jax.device_put(views, jax.sharding.NamedSharding(mesh, P(None, parallel.DATA_AXIS)))
  variables = jax.device_put(variables, parallel.replicated(mesh))
  compiled = jax.jit(lambda v, x: forward_and_gradient(net, v, x, mesh)).lower(
      variables, views).compile(compiler_options=FAST_COMPILE)
  return jax.device_get(compiled(variables, views))


def relative(a, b):
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                      for x in jax.tree.leaves(tree)])
  return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(a)))


def layer_on(devices, group_size, x):
  """GroupedBatchNorm's output, new statistics and input gradient; under shard_map over
  `devices` when there are several."""
  layer = GroupedBatchNorm(False, group_size, axis_name=parallel.DATA_AXIS
                           if len(devices) > 1 else None)
  variables = layer.init(jax.random.key(0), x[:1])

  def forward(x):
    out, new = layer.apply(variables, x, mutable=["batch_stats"])
    return out, new["batch_stats"]

  if len(devices) > 1:
    data = P(parallel.DATA_AXIS)
    forward = parallel.per_device(forward, parallel.create_mesh(devices), in_specs=data,
                                  out_specs=(data, P()))

  def with_gradient(x):
    (out, stats), vjp = jax.vjp(forward, x)
    return out, stats, vjp((jnp.sin(out), jax.tree.map(jnp.zeros_like, stats)))[0]

  return jax.device_get(jax.jit(with_gradient)(x))


def main():
  config = load_config("tiny")
  config.model.t_stream.bn_group_size = GROUP_SIZE
  batch = GROUP_SIZE * len(jax.devices())
  net, _ = create_networks(config.model, config.data.image_size,
                           axis_name=parallel.DATA_AXIS)
  views = np.random.default_rng(0).normal(size=(2, batch, 16, 16, 3)).astype(np.float32)
  variables = jax.jit(lambda x: net.init(jax.random.key(0), x, train=False)).lower(
      views[0]).compile(compiler_options=FAST_COMPILE)(views[0])
  one = run_on(jax.devices()[:1], net, variables, views)
  many = run_on(jax.devices(), net, variables, views)

  rng = np.random.default_rng(1)
  x = (rng.normal(size=(batch, 3, 3, 5)) * (1 + np.arange(batch))[:, None, None, None]
       ).astype(np.float32)  # groups of examples with different scales
  layer = {}
  for group_size in (2, 4, 8, 0):
    layer[group_size] = {part: relative(a, b) for part, a, b in zip(
        ("outputs", "batch_stats", "gradient"), layer_on(jax.devices()[:1], group_size, x),
        layer_on(jax.devices(), group_size, x))}
  try:  # 24 examples, 6 a device: groups of 4 straddle devices 0 and 1
    layer_on(jax.devices(), 4, np.concatenate([x, x[:8]]))
    straddle = "no error"
  except UserError as e:
    straddle = str(e)
  print(json.dumps({
      "devices": len(jax.devices()), "batch": batch,
      "relative_difference": {part: relative(a, b) for part, a, b in zip(
          ("outputs", "batch_stats", "gradient"), one, many)},
      "layer": layer, "straddle": straddle}))


if __name__ == "__main__":
  main()
