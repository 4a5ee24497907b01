"""Initialisers and layer defaults shared by the trunk, the T-stream and the heads.

They reproduce PyTorch's defaults as the release used them (spec, "T-stream block"), so a
freshly initialised care_jax network has the release's statistics.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def batch_norm(train: bool, dtype, name: str) -> nn.BatchNorm:
  """PyTorch BatchNorm semantics (momentum 0.1, eps 1e-5); gamma 1, beta 0.

  Under jax.jit on a batch-sharded global array the statistics are those of the global
  batch, which is what SyncBN gives the release.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-5,
                      dtype=dtype, name=name)


conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_kernel_init,
                         conv_general_dilated=cpu_conv.conv_general_dilated)


def dense(features: int, fan_in: int, dtype, name: str) -> nn.Dense:
  """nn.Dense with torch.nn.Linear's default initialisation."""
  return nn.Dense(features, dtype=dtype, kernel_init=dense_kernel_init,
                  bias_init=dense_bias_init(fan_in), name=name)
