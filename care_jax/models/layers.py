"""Initialisers and layer defaults shared by the trunk, the T-stream and the heads.

They reproduce PyTorch's defaults as the release used them (spec, "T-stream block"), so a
freshly initialised care_jax network has the release's statistics.
"""
import functools
import math
from typing import Optional

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


def batch_norm(train: bool, dtype, name: str, axis_name: Optional[str] = None,
               views: int = 1) -> "GroupedBatchNorm":
  """PyTorch BatchNorm semantics (momentum 0.1, eps 1e-5); gamma 1, beta 0.

  With `axis_name` (the data axis of a shard_map over the devices) the training-mode
  statistics are averaged over that axis: those of the global batch, as SyncBN gives the
  release's trunk and heads, while each device computes only its own examples. `views`:
  see GroupedBatchNorm.
  """
  return GroupedBatchNorm(not train, group_size=0, dtype=dtype, axis_name=axis_name,
                          views=views, name=name)


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
  """BatchNorm whose training-mode statistics are those of each contiguous group of
  `group_size` examples of the global batch: the release's T-stream uses plain
  BatchNorm2d, so each GPU normalises its own 128 images (spec, "Networks"). With
  group_size <= 0, the whole batch: batch_norm, the trunk's and the heads' SyncBN.

  With `axis_name` (the data axis of a shard_map) each device holds a contiguous slice of
  the global batch and computes only its own examples: a group lies within one device
  (group_size divides the per-device batch: the release's case when they are equal) or
  spans whole devices (the per-device batch divides group_size). Each device writes the
  sums of its groups into a [groups, features] table at their global rows and one psum
  (exact: the other rows are zeros) gives every device every group's statistics.

  The running averages follow the first group only: DDP broadcasts rank 0's buffers to
  every rank at each forward (broadcast_buffers=True, its default) and rank 0 saves the
  checkpoint, so the release keeps rank 0's statistics. Variables, statistics (E[x^2] -
  E[x]^2, in promote_types(dtype, float32): float32 under bfloat16, float64 in a float64
  run) and eval mode are nn.BatchNorm's, so checkpoints cannot tell them apart.

  With `views` > 1 the batch is that many batches one after another (the two views of
  the train step, each device's examples of the first view, then of the second), each
  normalised on its own, as if the network were called once per view as the release
  calls it; the running averages take their updates in that order. One pass over both
  views runs every convolution and matrix product on twice the batch, and its weight
  gradients as single products, which a vmap over the views did not (docs/benchmarks.md).
  """
  use_running_average: bool
  group_size: int
  dtype: jnp.dtype = jnp.float32
  axis_name: Optional[str] = None
  views: int = 1

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    compute_dtype = jnp.promote_types(self.dtype, jnp.float32)
    if self.use_running_average:
      grouped = x.reshape(1, -1, features).astype(compute_dtype)
      mean, var = running_mean.value[None], running_var.value[None]
    else:
      grouped, mean, var, first_mean, first_var = self._group_statistics(
          x.astype(compute_dtype))
      if not self.is_initializing():
        for view in range(self.views):
          running_mean.value = (BN_MOMENTUM * running_mean.value
                                + (1 - BN_MOMENTUM) * first_mean[view])
          running_var.value = (BN_MOMENTUM * running_var.value
                               + (1 - BN_MOMENTUM) * first_var[view])
    y = (grouped - mean[:, None]) * (jax.lax.rsqrt(var + BN_EPSILON) * scale)[:, None] + bias
    return y.reshape(x.shape).astype(self.dtype)

  def _group_statistics(self, x):
    """x as [each view's groups on this device, their values, features]; the mean and
    variance of each of those groups; those of each view's first group of the global
    batch ([views, features])."""
    if x.shape[0] % self.views:
      raise ValueError(f"{x.shape[0]} examples do not split into {self.views} views.")
    local, features = x.shape[0] // self.views, x.shape[-1]  # examples per view
    axis_name = None if self.is_initializing() else self.axis_name  # as nn.BatchNorm
    if axis_name is None:
      devices, index = 1, 0
    else:
      devices, index = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    groups = batch_norm_groups(local * devices, self.group_size)
    size = local * devices // groups  # examples per group
    if local % size == 0:
      local_groups, first_row = local // size, index * (local // size)
    elif size % local == 0:
      local_groups, first_row = 1, index * local // size
    else:
      raise UserError(
          f"BatchNorm groups of {size} examples straddle the {devices} devices' batches of "
          f"{local}; set --config.model.t_stream.bn_group_size to a divisor or a multiple "
          f"of {local} (0: the whole batch).")
    grouped = x.reshape(self.views * local_groups, -1, features)
    sums = jnp.stack([jnp.sum(grouped, axis=1), jnp.sum(jnp.square(grouped), axis=1)], 1)
    sums = sums.reshape(self.views, local_groups, 2, features)
    if axis_name is None:
      table = sums
    else:  # every group's sums on every device; rows of other devices' groups are zeros
      table = jax.lax.dynamic_update_slice_in_dim(
          jnp.zeros((self.views, groups, 2, features), x.dtype), sums, first_row, axis=1)
      table = jax.lax.psum(table, axis_name)
      sums = jax.lax.dynamic_slice_in_dim(table, first_row, local_groups, axis=1)
    count = size * (x.size // (x.shape[0] * features))  # values per group and feature
    moments = lambda s: (s[..., 0, :] / count,
                         jnp.maximum(0., s[..., 1, :] / count - jnp.square(s[..., 0, :] / count)))
    mean, var = moments(sums.reshape(-1, 2, features))
    first_mean, first_var = moments(table[:, 0])
    return grouped, mean, var, first_mean, first_var


conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_kernel_init,
                         conv_general_dilated=cpu_conv.conv_general_dilated)


def dense(features: int, fan_in: int, dtype, name: str) -> nn.Dense:
  """nn.Dense with torch.nn.Linear's default initialisation."""
  return nn.Dense(features, dtype=dtype, kernel_init=dense_kernel_init,
                  bias_init=dense_bias_init(fan_in), name=name)
