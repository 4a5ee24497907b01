"""The online network of the tiny config, T-stream BatchNorm groups of 4 examples, run on
both views in training mode (outputs, new BatchNorm statistics, gradient of the loss's
stand-in) on a 1-device mesh and on all devices. The test sets XLA_FLAGS for 4 simulated
CPU devices: each device holds one group of the global batch of 16, as each GPU holds its
128 images in the release. Prints as JSON the relative difference of each part."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from care_jax import parallel  # noqa: E402
from care_jax.models import create_networks  # noqa: E402
from care_jax.training.pretraining import FAST_COMPILE  # noqa: E402
from care_jax.training.train_step import apply_to_views  # noqa: E402
from tests.conftest import load_config  # noqa: E402

GROUP_SIZE = 4


def forward_and_gradient(net, variables, views):
  """(outputs, new batch_stats, gradient) of a loss that reaches every parameter."""

  def loss(params):
    outputs, stats = apply_to_views(net, params, variables["batch_stats"], views)
    return jnp.sum(outputs["c"] * outputs["t"]) + jnp.mean(outputs["features"]), (outputs,
                                                                                   stats)

  (_, (outputs, stats)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  return outputs, stats, grads


def run_on(devices, net, variables, views):
  mesh = parallel.create_mesh(devices)
  views = jax.device_put(views, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      None, "data")))
  variables = jax.device_put(variables, parallel.replicated(mesh))
  compiled = jax.jit(lambda v, x: forward_and_gradient(net, v, x)).lower(
      variables, views).compile(compiler_options=FAST_COMPILE)
  return jax.device_get(compiled(variables, views))


def relative(a, b):
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                      for x in jax.tree.leaves(tree)])
  return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(a)))


def main():
  config = load_config("tiny")
  config.model.t_stream.bn_group_size = GROUP_SIZE
  batch = GROUP_SIZE * len(jax.devices())
  net, _ = create_networks(config.model, config.data.image_size)
  views = np.random.default_rng(0).normal(size=(2, batch, 16, 16, 3)).astype(np.float32)
  variables = jax.jit(lambda x: net.init(jax.random.key(0), x, train=False)).lower(
      views[0]).compile(compiler_options=FAST_COMPILE)(views[0])
  one = run_on(jax.devices()[:1], net, variables, views)
  many = run_on(jax.devices(), net, variables, views)
  print(json.dumps({
      "devices": len(jax.devices()), "batch": batch,
      "relative_difference": {part: relative(a, b) for part, a, b in zip(
          ("outputs", "batch_stats", "gradient"), one, many)}}))


if __name__ == "__main__":
  main()
