"""ResNet trunk in the torchvision v1.5 layout (stride on the bottleneck's 3x3 conv).

Parameter names follow torchvision's (`conv1`, `bn1`, `layer3_5/conv2`, `downsample_conv`,
...) so that checkpoint conversion is a rename, not a search.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from care_jax.errors import UserError
from care_jax.models import cpu_conv
from care_jax.models.layers import batch_norm, conv

# name -> (block type, blocks per stage)
ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


class BasicBlock(nn.Module):
  planes: int
  stride: int
  train: bool
  dtype: jnp.dtype
  axis_name: Optional[str] = None  # see layers.batch_norm
  views: int = 1  # see layers.GroupedBatchNorm
  expansion = 1

  @nn.compact
  def __call__(self, x):
    out = conv(self.planes, (3, 3), (self.stride, self.stride), padding=1, dtype=self.dtype,
               name="conv1")(x)
    out = nn.relu(batch_norm(self.train, self.dtype, "bn1", self.axis_name, self.views)(out))
    out = conv(self.planes, (3, 3), padding=1, dtype=self.dtype, name="conv2")(out)
    out = batch_norm(self.train, self.dtype, "bn2", self.axis_name, self.views)(out)
    return nn.relu(out + _shortcut(self, x, self.planes))


class Bottleneck(nn.Module):
  planes: int
  stride: int
  train: bool
  dtype: jnp.dtype
  width_multiplier: int = 1
  axis_name: Optional[str] = None  # see layers.batch_norm
  views: int = 1  # see layers.GroupedBatchNorm
  expansion = 4

  @nn.compact
  def __call__(self, x):
    # The release's `width` scales only the inner 3x3 width (base_width = 64 * width), as
    # torchvision's wide_resnet50_2: the stage outputs stay 256..2048 channels.
    width = self.planes * self.width_multiplier
    out = conv(width, (1, 1), dtype=self.dtype, name="conv1")(x)
    out = nn.relu(batch_norm(self.train, self.dtype, "bn1", self.axis_name, self.views)(out))
    out = conv(width, (3, 3), (self.stride, self.stride), padding=1, dtype=self.dtype,
               name="conv2")(out)
    out = nn.relu(batch_norm(self.train, self.dtype, "bn2", self.axis_name, self.views)(out))
    out = conv(self.planes * 4, (1, 1), dtype=self.dtype, name="conv3")(out)
    out = batch_norm(self.train, self.dtype, "bn3", self.axis_name, self.views)(out)
    return nn.relu(out + _shortcut(self, x, self.planes * 4))


def _shortcut(block: nn.Module, x, out_channels: int):
  """Identity, or the 1x1 projection torchvision calls `downsample` (built in the block)."""
  if block.stride == 1 and x.shape[-1] == out_channels:
    return x
  x = conv(out_channels, (1, 1), (block.stride, block.stride), dtype=block.dtype,
           name="downsample_conv")(x)
  return batch_norm(block.train, block.dtype, "downsample_bn", block.axis_name,
                    block.views)(x)


class ResNet(nn.Module):
  """Returns the layer3 and layer4 feature maps (the T-stream and C-stream inputs)."""
  stage_sizes: Sequence[int]
  block: str = "bottleneck"
  width_multiplier: int = 1
  channels: int = 64  # stem and layer1 planes; each later stage doubles (tiny tests use 8)
  small_stem: bool = False  # 3x3/1 conv and no max-pool, for images of 64 px or less
  small_stem_pool: bool = False  # the small stem, then a 3x3/2 max-pool (a quarter the cost)
  dtype: jnp.dtype = jnp.float32
  axis_name: Optional[str] = None  # see layers.batch_norm

  @nn.compact
  def __call__(self, x, train: bool, views: int = 1):
    """`views`: see layers.GroupedBatchNorm."""
    x = x.astype(self.dtype)
    if self.small_stem:
      x = conv(self.channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(x)
      x = nn.relu(batch_norm(train, self.dtype, "bn1", self.axis_name, views)(x))
      if self.small_stem_pool:
        x = cpu_conv.max_pool(x, window=3, stride=2, pad=1)
    else:
      x = conv(self.channels, (7, 7), (2, 2), padding=3, dtype=self.dtype, name="conv1")(x)
      x = nn.relu(batch_norm(train, self.dtype, "bn1", self.axis_name, views)(x))
      x = cpu_conv.max_pool(x, window=3, stride=2, pad=1)
    stages = []
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        name = f"layer{i + 1}_{j}"
        if self.block == "basic":
          x = BasicBlock(self.channels * 2**i, stride, train, self.dtype, self.axis_name,
                         views, name=name)(x)
        else:
          x = Bottleneck(self.channels * 2**i, stride, train, self.dtype, self.width_multiplier,
                         self.axis_name, views, name=name)(x)
      stages.append(x)
    return stages[2], stages[3]

  @property
  def out_channels(self) -> int:
    return self.channels * 8 * (4 if self.block == "bottleneck" else 1)


def resnet(arch: str, **kwargs) -> ResNet:
  if arch not in ARCHITECTURES:
    raise UserError(f"Unknown trunk {arch!r}; choose one of {sorted(ARCHITECTURES)}.")
  block, stage_sizes = ARCHITECTURES[arch]
  if block == "basic" and kwargs.get("width_multiplier", 1) != 1:
    raise UserError(f"{arch} has basic blocks, which have no width multiplier; use "
                    "resnet50/101/152 for a wide trunk.")
  return ResNet(stage_sizes=stage_sizes, block=block, **kwargs)
