"""Initialisers and layer defaults shared by the trunk, the T-stream and the heads.

They reproduce PyTorch's defaults as the release used them (spec, "T-stream block"), so a
freshly initialised care_jax network has the release's statistics.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from care_jax.errors import UserError
from care_jax.models import cpu_conv

# Kaiming-normal (untruncated), fan_out, ReLU gain: the release's init for every conv.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


BN_MOMENTUM = 0.9  # flax's convention for PyTorch's momentum=0.1
BN_EPSILON = 1e-5  # PyTorch's default


def batch_norm(train: bool, dtype, name: str) -> nn.BatchNorm:
  """PyTorch BatchNorm semantics (momentum 0.1, eps 1e-5); gamma 1, beta 0.

  Under jax.jit on a batch-sharded global array the statistics are those of the global
  batch, which is what SyncBN gives the release's trunk and heads.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      dtype=dtype, name=name)


def batch_norm_groups(batch: int, group_size: int) -> int:
  """How many groups of `group_size` examples a batch normalises separately: one when
  group_size <= 0 or covers the batch."""
  if group_size <= 0 or group_size >= batch:
    return 1
  if batch % group_size:
    raise UserError(f"BatchNorm groups of {group_size} examples do not divide the batch of "
                    f"{batch}; set --config.model.t_stream.bn_group_size to a divisor of it "
                    "(0: the whole batch).")
  return batch // group_size


class GroupedBatchNorm(nn.Module):
  """batch_norm whose training-mode statistics are those of each contiguous group of
  `group_size` examples: the release's T-stream uses plain BatchNorm2d, so each GPU
  normalises its own 128 images (spec, "Networks"). Under the batch-sharded mesh a group
  is one device's shard when the per-device batch equals the group size.

  The running averages follow the first group only: DDP broadcasts rank 0's buffers to
  every rank at each forward (broadcast_buffers=True, its default) and rank 0 saves the
  checkpoint, so the release keeps rank 0's statistics. Variables, statistics (E[x^2] -
  E[x]^2, in promote_types(dtype, float32): float32 under bfloat16, float64 in a float64
  run) and eval mode are nn.BatchNorm's, so checkpoints cannot tell them apart.
  """
  use_running_average: bool
  group_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    groups = 1 if self.use_running_average else batch_norm_groups(x.shape[0], self.group_size)
    # [groups, examples per group x positions, features]: groups are contiguous examples.
    grouped = x.reshape(groups, -1, features).astype(jnp.promote_types(self.dtype, jnp.float32))
    if self.use_running_average:
      mean, var = running_mean.value[None], running_var.value[None]
    else:
      mean = jnp.mean(grouped, axis=1)
      var = jnp.maximum(0., jnp.mean(jnp.square(grouped), axis=1) - jnp.square(mean))
      if not self.is_initializing():
        running_mean.value = BN_MOMENTUM * running_mean.value + (1 - BN_MOMENTUM) * mean[0]
        running_var.value = BN_MOMENTUM * running_var.value + (1 - BN_MOMENTUM) * var[0]
    y = (grouped - mean[:, None]) * (jax.lax.rsqrt(var + BN_EPSILON) * scale)[:, None] + bias
    return y.reshape(x.shape).astype(self.dtype)


conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_kernel_init,
                         conv_general_dilated=cpu_conv.conv_general_dilated)


def dense(features: int, fan_in: int, dtype, name: str) -> nn.Dense:
  """nn.Dense with torch.nn.Linear's default initialisation."""
  return nn.Dense(features, dtype=dtype, kernel_init=dense_kernel_init,
                  bias_init=dense_bias_init(fan_in), name=name)
