"""Features of every centre view of a split, computed over the device mesh.

The kNN monitor, the online probe's evaluation and linear evaluation on cached features all
embed whole splits. Each process decodes only its own slots of every global batch, and the
features come back as global arrays sharded over the batch axis, so the work spreads over
every device of every process. A split whose decoded views (this process's share) fit in
_CACHE_BYTES is decoded once per process and kept: the monitor embeds the same images at
every evaluation, and the demo probes three encoders on them.
"""
import functools
import json
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from care_jax import parallel
from care_jax.data import augment, input_pipeline

_CACHE_BYTES = 2**30  # per split; at most 4 splits are kept (_cached_batches)
_IMAGES_PER_PASS = 1024  # global batch of a forward pass, rounded up to the device count


def global_batch_size(mesh) -> int:
  n = mesh.devices.size
  return n * -(-_IMAGES_PER_PASS // n)


def trunk_features_fn(network, mesh) -> Callable:
  """(variables, uint8 images) -> pooled layer4 features, eval mode, jitted over the mesh.

  The variables are an argument (not a constant), so one compiled program serves every
  evaluation of a changing network.
  """
  def pooled_layer4(variables, images):
    return network.apply(variables, augment.normalize(images), method=network.trunk_features)

  return jax.jit(pooled_layer4,
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=parallel.batch_sharded(mesh))


def _split_size(data_config, split: str, indices=None) -> int:
  """Examples to embed: from the dataset's metadata (opening a tfds split costs seconds)."""
  if indices is not None:
    return len(indices)
  info = input_pipeline.dataset_info(data_config)
  return info.num_train_examples if split == data_config.train_split else info.num_eval_examples


def decoded_batches(data_config, split: str, mesh, indices: Optional[np.ndarray] = None,
                    ) -> Iterator[dict]:
  """This process's part of every global batch of the centre views of `split` (train_split
  or eval_split of data_config), in order:
  'image' uint8, 'label' int32, 'mask' bool (False for padding and undecodable images)."""
  batch = global_batch_size(mesh)
  local_bytes = (_split_size(data_config, split, indices) * data_config.image_size**2 * 3
                 / jax.process_count())
  key = (data_config.to_json(), split, batch,
         None if indices is None else np.asarray(indices, np.int64).tobytes())
  if local_bytes <= _CACHE_BYTES:
    return iter(_cached_batches(*key))
  return _stream_batches(*key)


def _stream_batches(data_json: str, split: str, batch: int, indices_bytes) -> Iterator[dict]:
  data_config = ml_collections.ConfigDict(json.loads(data_json))
  indices = None if indices_bytes is None else np.frombuffer(indices_bytes, np.int64)
  for b in input_pipeline.centre_view_batches(
      data_config, split, global_batch_size=batch, indices=indices,
      process_index=jax.process_index(), process_count=jax.process_count()):
    yield {k: b[k] for k in ("image", "label", "mask")}


@functools.lru_cache(maxsize=4)
def _cached_batches(*key) -> tuple:
  return tuple(_stream_batches(*key))


def apply_to_split(fn: Callable, data_config, split: str, mesh,
                   indices: Optional[np.ndarray] = None) -> Iterator[tuple]:
  """(fn(images), labels, mask) of every global batch of the split's centre views, as
  global arrays: fn maps uint8 images to features, logits, ..."""
  for batch in decoded_batches(data_config, split, mesh, indices):
    images, labels, mask = parallel.host_to_global(
        mesh, (batch["image"], batch["label"], batch["mask"]))
    yield fn(images), labels, mask


def stack_batches(batches, mesh) -> tuple:
  """(features, labels, mask) global batches, e.g. of apply_to_split, each stacked into
  [batches, B, ...] with B sharded over the devices as the batches were: nothing moves, and
  a device holds 1/n of a split's features (the kNN bank, linear evaluation's cache). A
  flat index i is example i % B of batch i // B."""
  stack = _stacker(mesh)
  return tuple(stack(*parts) for parts in zip(*batches))


@functools.lru_cache(maxsize=4)
def _stacker(mesh):  # one jitted function a mesh: the monitor restacks its bank each time
  return jax.jit(lambda *xs: jnp.stack(xs),
                 out_shardings=NamedSharding(mesh, P(None, parallel.DATA_AXIS)))
