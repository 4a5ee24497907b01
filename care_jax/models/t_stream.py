"""The T-stream: a stack of BoTNet-style bottleneck blocks with multi-head self-attention.

Spec, "T-stream block". Unlike the release, position tables are sized from the feature map
the block actually sees, so any input resolution works (the release asserts 14x14).
"""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from care_jax.errors import UserError
from care_jax.models.layers import GroupedBatchNorm, conv


def _relative_logits_1d(q, table):
  """q: [b, heads, X, Y, d]; table: [2Y-1, d] -> [b, heads, X, Y(query), Y(key)]."""
  length = q.shape[3]
  logits = jnp.einsum("bhxyd,rd->bhxyr", q, table)
  # Key j seen from query i sits at offset j - i, stored at row j - i + length - 1.
  offsets = jnp.arange(length)[None, :] - jnp.arange(length)[:, None] + length - 1
  return jnp.take_along_axis(
      logits, jnp.broadcast_to(offsets, logits.shape[:3] + offsets.shape), axis=-1)


class MultiHeadSelfAttention(nn.Module):
  heads: int = 4
  head_dim: int = 128
  position_embedding: str = "absolute"  # or "relative"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, _ = x.shape
    inner = self.heads * self.head_dim
    qkv = conv(3 * inner, (1, 1), dtype=self.dtype, name="qkv")(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)  # torch chunks the channel axis in this order
    split_heads = lambda t: t.reshape(b, h, w, self.heads, self.head_dim)
    q, k, v = split_heads(q) * self.head_dim**-0.5, split_heads(k), split_heads(v)

    logits = jnp.einsum("bxyhd,bijhd->bhxyij", q, k)
    init = nn.initializers.normal(stddev=self.head_dim**-0.5)
    if self.position_embedding == "absolute":
      rows = self.param("pos_height", init, (h, self.head_dim))
      cols = self.param("pos_width", init, (w, self.head_dim))
      pos = (rows[:, None, :] + cols[None, :, :]).astype(self.dtype)
      logits = logits + jnp.einsum("bxyhd,ijd->bhxyij", q, pos)
    elif self.position_embedding == "relative":
      rel_h = self.param("rel_height", init, (2 * h - 1, self.head_dim)).astype(self.dtype)
      rel_w = self.param("rel_width", init, (2 * w - 1, self.head_dim)).astype(self.dtype)
      qh = q.transpose(0, 3, 1, 2, 4)  # [b, heads, x, y, d]
      along_w = _relative_logits_1d(qh, rel_w)  # [b, heads, x, y, j]
      along_h = _relative_logits_1d(qh.transpose(0, 1, 3, 2, 4), rel_h)  # [b, heads, y, x, i]
      logits = logits + along_w[:, :, :, :, None, :] + along_h.transpose(0, 1, 3, 2, 4)[..., None]
    else:
      raise UserError(f"position_embedding must be 'absolute' or 'relative', got "
                      f"{self.position_embedding!r}.")

    attn = nn.softmax(logits.reshape(b, self.heads, h, w, h * w).astype(jnp.float32), axis=-1)
    # For care_jax.visualize: kept (float32, [b, heads, query y, x, key y, x]) only when
    # the caller makes "intermediates" mutable; the computation is the same either way.
    self.sow("intermediates", "weights", attn.reshape(logits.shape))
    attn = attn.astype(self.dtype).reshape(logits.shape)
    out = jnp.einsum("bhxyij,bijhd->bxyhd", attn, v)
    return out.reshape(b, h, w, inner)  # head-major channels, as the release


class TBlock(nn.Module):
  out_channels: int = 2048
  bottleneck_channels: int = 512
  downsample: bool = False
  heads: int = 4
  head_dim: int = 128
  position_embedding: str = "absolute"
  train: bool = True
  bn_group_size: int = 0  # see GroupedBatchNorm; <= 0: the whole batch
  dtype: jnp.dtype = jnp.float32
  axis_name: Optional[str] = None  # see GroupedBatchNorm
  views: int = 1  # see GroupedBatchNorm

  @nn.compact
  def __call__(self, x):
    bn = lambda name: GroupedBatchNorm(not self.train, self.bn_group_size, self.dtype,
                                       self.axis_name, self.views, name=name)
    if self.downsample or x.shape[-1] != self.out_channels:
      stride = 2 if self.downsample else 1
      size = 3 if self.downsample else 1
      shortcut = conv(self.out_channels, (size, size), (stride, stride), padding=size // 2,
                      dtype=self.dtype, name="shortcut_conv")(x)
      shortcut = nn.relu(bn("shortcut_bn")(shortcut))
    else:
      shortcut = x
    y = conv(self.bottleneck_channels, (1, 1), dtype=self.dtype, name="conv_in")(x)
    y = nn.relu(bn("bn_in")(y))
    y = MultiHeadSelfAttention(self.heads, self.head_dim, self.position_embedding,
                               self.dtype, name="attention")(y)
    if self.downsample:
      # 'SAME' pooling gives ceil(n/2), the size of the stride-2 shortcut, so odd maps
      # (e.g. 7x7 from 28 px inputs) work; at 14x14 it is the release's 2x2 AvgPool.
      y = nn.avg_pool(y, (2, 2), (2, 2), padding="SAME", count_include_pad=False)
    y = nn.relu(bn("bn_mid")(y))
    y = conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_out")(y)
    y = bn("bn_out")(y)  # gamma starts at 1: the release's zero-init is overwritten
    return nn.relu(y + shortcut)


class TStream(nn.Module):
  """5 blocks on the layer3 map; the first halves the resolution. Their BatchNorm
  statistics are per group of `bn_group_size` examples (GroupedBatchNorm)."""
  num_blocks: int = 5
  out_channels: int = 2048
  heads: int = 4
  head_dim: int = 128
  position_embedding: str = "absolute"
  bn_group_size: int = 0
  dtype: jnp.dtype = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool, views: int = 1):
    """`views`: see GroupedBatchNorm."""
    for i in range(self.num_blocks):
      x = TBlock(out_channels=self.out_channels, bottleneck_channels=self.out_channels // 4,
                 downsample=i == 0, heads=self.heads, head_dim=self.head_dim,
                 position_embedding=self.position_embedding, train=train,
                 bn_group_size=self.bn_group_size, dtype=self.dtype,
                 axis_name=self.axis_name, views=views, name=f"block{i}")(x)
    return x
