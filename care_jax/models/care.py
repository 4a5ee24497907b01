"""One CARE network: trunk, T-stream and the MLP heads of both streams.

The online network has projector + predictor per stream; the target network has the
projectors only. Both are this module, with `predictors` on or off, so their parameter
trees line up key by key for the EMA update (spec, "Networks" and "Target update").
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from care_jax.errors import UserError
from care_jax.models import resnet as resnet_lib
from care_jax.models.layers import batch_norm, dense
from care_jax.models.t_stream import TStream


class MLP(nn.Module):
  """Linear -> BN -> ReLU -> Linear: the release's projector and predictor."""
  hidden_dim: int = 4096
  out_dim: int = 256
  dtype: jnp.dtype = jnp.float32
  axis_name: Optional[str] = None  # see layers.batch_norm

  @nn.compact
  def __call__(self, x, train: bool, views: int = 1):
    x = dense(self.hidden_dim, x.shape[-1], self.dtype, "dense1")(x)
    x = nn.relu(batch_norm(train, self.dtype, "bn", self.axis_name, views)(x))
    return dense(self.out_dim, self.hidden_dim, self.dtype, "dense2")(x)


def l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CareNetwork(nn.Module):
  trunk: nn.Module
  t_stream: TStream
  hidden_dim: int = 4096
  projection_dim: int = 256
  predictors: bool = True  # online network: True; target network: False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool, views: int = 1):
    """Returns pooled layer4 features and the unit-norm C-stream and T-stream outputs.
    `images` holds `views` batches one after another, each its own BatchNorm batch in
    training mode (layers.GroupedBatchNorm)."""
    layer3, layer4 = self.trunk(images, train=train, views=views)
    t_map = self.t_stream(layer3, train=train, views=views)
    features = jnp.mean(layer4, axis=(1, 2))
    outputs = {"features": features.astype(jnp.float32)}
    for stream, pooled in (("c", features), ("t", jnp.mean(t_map, axis=(1, 2)))):
      z = MLP(self.hidden_dim, self.projection_dim, self.dtype, self.trunk.axis_name,
              name=f"{stream}_projector")(pooled, train, views)
      if self.predictors:
        z = MLP(self.hidden_dim, self.projection_dim, self.dtype, self.trunk.axis_name,
                name=f"{stream}_predictor")(z, train, views)
      outputs[stream] = l2_normalize(z)
    return outputs

  @property
  def axis_name(self):
    """The shard_map axis its training-mode BatchNorms average over (create_networks)."""
    return self.trunk.axis_name

  def trunk_features(self, images):
    """Pooled layer4 features in eval mode (BN running statistics): the linear probe input."""
    _, layer4 = self.trunk(images, train=False)
    return jnp.mean(layer4, axis=(1, 2)).astype(jnp.float32)


# model.stem -> (3x3/1 conv instead of 7x7/2 + max-pool, then a 3x3/2 max-pool anyway).
STEMS = {"imagenet": (False, False), "small": (True, False), "small_pool": (True, True)}


def create_networks(model_config, image_size: int, dtype=jnp.float32,
                    axis_name: Optional[str] = None):
  """(online, target) CareNetwork pair from `config.model`. With `axis_name` their
  training-mode BatchNorms take the statistics over that axis of a shard_map: the form
  the data-parallel train step runs them in (train_step.apply_to_views)."""
  stem = model_config.stem
  if stem == "auto":
    stem = "small" if image_size <= 64 else "imagenet"
  if stem not in STEMS:
    raise UserError(f"model.stem must be 'auto' or one of {sorted(STEMS)}, got {stem!r}.")
  small_stem, small_stem_pool = STEMS[stem]
  trunk = resnet_lib.resnet(model_config.arch, width_multiplier=model_config.width,
                            channels=model_config.channels, small_stem=small_stem,
                            small_stem_pool=small_stem_pool,
                            dtype=dtype, axis_name=axis_name)
  t_cfg = model_config.t_stream
  make = lambda predictors: CareNetwork(
      trunk=trunk.clone(),
      t_stream=TStream(num_blocks=t_cfg.num_blocks, out_channels=trunk.out_channels,
                       heads=t_cfg.heads, head_dim=t_cfg.head_dim,
                       position_embedding=t_cfg.position_embedding,
                       # Configs saved before the field existed normalised the whole batch.
                       bn_group_size=t_cfg.get("bn_group_size", 0), dtype=dtype,
                       axis_name=axis_name),
      hidden_dim=model_config.hidden_dim, projection_dim=model_config.projection_dim,
      predictors=predictors, dtype=dtype)
  return make(True), make(False)

