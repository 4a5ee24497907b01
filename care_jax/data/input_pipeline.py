"""Batch streams for the trainer: deterministic, sharded by process, exactly resumable.

The order of examples is a pure function of the seed: epoch e visits the examples in the
permutation np.random.default_rng([seed, 0, e]); global batch k of the run is the slice
[j*B, (j+1)*B) of epoch k // steps_per_epoch's permutation (j = k mod steps_per_epoch; the
last N mod B examples of each epoch are left out, as a drop-remainder loader does). Each
process decodes only its contiguous 1/process_count of every global batch. The random crop
and flip of the example in slot i of batch k come from default_rng([seed, 1, k, i, attempt]).
So a run resumed at step k sees exactly the batches an uninterrupted run sees from step k,
whatever the number of processes and threads.

An example that cannot be read or decoded is replaced by one drawn from
default_rng([seed, 2, k, i, attempt]), so batches keep their shape and stay a function of
(seed, step); each batch reports how many of its examples were replaced ('num_skipped').
Validation instead masks an undecodable example out, so every example counts once. Each
bad example is named in the log the first time this process meets it, then only counted.
"""
import collections
import concurrent.futures
import functools
import itertools
import logging
import math
import os
import threading
from typing import Callable, Iterable, Iterator

import numpy as np

from care_jax.data import sources, views
from care_jax.data.errors import DataError
from care_jax.errors import UserError

_PERMUTATION_STREAM, _VIEW_STREAM, _REPLACEMENT_STREAM = 0, 1, 2
_MAX_ATTEMPTS = 16  # Undecodable examples in a row before we call the dataset broken.
_PREFETCH_STEPS = 2  # Batches decoded ahead of the one the trainer takes.

dataset_info = sources.dataset_info


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches in one pass over the data (the remainder is left out)."""
  return num_examples // global_batch_size


def check_batch_fits(num_examples: int, batch_size: int, field: str) -> None:
  """A global batch holds at least one example and at most the whole training split;
  `field` names the config field to change."""
  if batch_size < 1:
    raise UserError(f"{field} must be at least 1, got {batch_size}; set --config.{field} "
                    "to the number of examples in a global batch.")
  if batch_size > num_examples:
    raise UserError(f"{field} {batch_size} is larger than the {num_examples} training "
                    f"examples; set --config.{field} to at most {num_examples}.")


class _EpochOrder:
  """Global batch k: a slice of one permutation of the examples per epoch."""

  def __init__(self, num_examples: int, global_batch_size: int, seed: int):
    self._n, self._batch, self._seed = num_examples, global_batch_size, seed
    self.steps_per_epoch = steps_per_epoch(num_examples, global_batch_size)
    self._epoch, self._permutation = -1, None

  def global_batch(self, step: int) -> np.ndarray:
    epoch, position = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      rng = np.random.default_rng([self._seed, _PERMUTATION_STREAM, epoch])
      self._epoch, self._permutation = epoch, rng.permutation(self._n)
    return self._permutation[position * self._batch:(position + 1) * self._batch]


def _process_slots(global_batch_size: int, process_index: int, process_count: int) -> range:
  """This process's contiguous part of the slots 0..B-1 of every global batch."""
  if global_batch_size % process_count:
    raise UserError(f"The global batch size {global_batch_size} must be divisible by the "
                    f"number of processes {process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  per_process = global_batch_size // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


def _check_fits(source: sources.Source, global_batch_size: int) -> None:
  if global_batch_size > len(source):
    raise UserError(f"The global batch size {global_batch_size} is larger than the dataset "
                    f"({len(source)} examples).")


def _num_workers(config) -> int:
  return config.get("num_workers", 0) or os.cpu_count() or 1


_named_bad_examples: set[str] = set()  # of this process, by source.describe(index)
_named_lock = threading.Lock()  # decode threads share it


def _log_skip(source: sources.Source, index: int, error: Exception, action: str) -> None:
  """Names a bad example in the log the first time this process meets it; later draws of
  it (every epoch, every evaluation pass) are only counted, in the batches' num_skipped."""
  name = source.describe(index)
  with _named_lock:
    if name in _named_bad_examples:
      return
    _named_bad_examples.add(name)
  logging.warning("%s example %s: %s (named once; later skips of it are only counted, as "
                  "skipped_images).", action, name, error)


def _random_views(source: sources.Source, index: int, *, seed: int, step: int, slot: int,
                  num_views: int, image_size: int, min_scale: float):
  """Random resized crops + flips of one example, or of its deterministic replacement.

  Returns (views, index actually used, label, number of examples skipped on the way).
  """
  for attempt in range(_MAX_ATTEMPTS):
    rng = np.random.default_rng([seed, _VIEW_STREAM, step, slot, attempt])
    try:
      encoded, label = source.read(index)
      full_size = views.image_size(encoded)
      boxes = [views.random_resized_crop_box(rng, *full_size, min_scale)
               for _ in range(num_views)]
      flips = [bool(rng.random() < 0.5) for _ in range(num_views)]
      return views.crop_views(encoded, boxes, flips, image_size, full_size), index, label, attempt
    except (views.UndecodableImageError, OSError) as e:
      _log_skip(source, index, e, "Skipping")
      replacement = np.random.default_rng([seed, _REPLACEMENT_STREAM, step, slot, attempt])
      index = int(replacement.integers(len(source)))
  raise DataError(f"{_MAX_ATTEMPTS} undecodable examples in a row in {source.describe(index)} "
                  f"and its replacements; is the dataset corrupt?")


def _centre_view(source: sources.Source, index: int, image_size: int):
  """The validation view of one example, or None when it cannot be decoded."""
  try:
    encoded, label = source.read(index)
    return views.centre_view(encoded, image_size), label
  except (views.UndecodableImageError, OSError) as e:
    _log_skip(source, index, e, "Masking out")
    return None


@functools.cache
def _warn_if_pillow_resizes() -> None:
  """Once per process: without the compiled resampler the host resizes ~6x slower."""
  if views._resample is None:
    logging.warning("Crops are resized by Pillow itself, ~6x slower than by care_jax's "
                    "compiled resampler (the same pixels), which was not built: install a C "
                    "compiler and reinstall care_jax (`pip install -e .` in the checkout).")


def _prefetched(steps: Iterable[int], jobs: Callable[[int], list[Callable]],
                assemble: Callable[[list], dict], num_workers: int) -> Iterator[dict]:
  """Runs each step's per-example jobs on a thread pool, _PREFETCH_STEPS steps ahead.

  Decoding (OpenCV, PIL) releases the GIL, so threads use all cores without the copies
  and start-up of worker processes.
  """
  steps = iter(steps)
  pending = collections.deque()
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    try:
      def submit(step):
        pending.append([pool.submit(job) for job in jobs(step)])
      for step in steps:
        submit(step)
        if len(pending) > _PREFETCH_STEPS:
          yield assemble([f.result() for f in pending.popleft()])
      while pending:
        yield assemble([f.result() for f in pending.popleft()])
    finally:  # The trainer stopped early: drop the work queued for batches it won't take.
      for futures in pending:
        for f in futures:
          f.cancel()


def random_view_batches(source: sources.Source, *, num_views: int, image_size: int,
                        min_scale: float, global_batch_size: int, seed: int, start_step: int,
                        process_index: int, process_count: int, num_workers: int,
                        ) -> Iterator[list]:
  """Endless batches of random views of `source`: lists of _random_views results.

  The common engine of pretraining, linear-evaluation training and the input benchmark.
  """
  if seed < 0:
    raise UserError(f"seed must be >= 0, got {seed}.")
  slots = _process_slots(global_batch_size, process_index, process_count)
  _check_fits(source, global_batch_size)
  order = _EpochOrder(len(source), global_batch_size, seed)
  if isinstance(source, sources.ArraySource):  # Decoded in memory: crops by the chunk.
    from care_jax.data import array_pipeline  # noqa: PLC0415  (only in-memory splits)
    return _prefetched(itertools.count(start_step), *array_pipeline.view_jobs(
        source, order, slots, seed=seed, num_views=num_views, image_size=image_size,
        min_scale=min_scale, num_workers=num_workers), num_workers)

  _warn_if_pillow_resizes()

  def jobs(step):
    indices = order.global_batch(step)
    return [lambda slot=slot, index=int(indices[slot]): _random_views(
        source, index, seed=seed, step=step, slot=slot, num_views=num_views,
        image_size=image_size, min_scale=min_scale) for slot in slots]

  return _prefetched(itertools.count(start_step), jobs, list, num_workers)


def _config_batches(config, split: str, num_views: int, indices=None, **kwargs
                    ) -> Iterator[list]:
  source = sources.open_source(config, split)
  if indices is not None:
    source = sources.SubsetSource(source, indices)
  return random_view_batches(
      source, num_views=num_views, image_size=config.image_size,
      min_scale=config.crop_min_scale, num_workers=_num_workers(config), **kwargs)


def pretrain_batches(config, *, global_batch_size: int, seed: int, start_step: int = 0,
                     process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Endless pretraining batches from config.train_split, starting at step `start_step`.

  Each batch holds this process's global_batch_size / process_count examples:
    'view1', 'view2': uint8 [b, S, S, 3] random resized crops (+ flips) of each example,
        S = config.image_size; the colour part of the views is augment.pretrain_views.
    'label': int32 [b], each example's class (for the online probe; unused by CARE).
    'index': int64 [b], the dataset index of each example (after replacements).
    'num_skipped': int, undecodable examples replaced in this process's part.
  """
  batches = _config_batches(
      config, config.train_split, num_views=2, global_batch_size=global_batch_size,
      seed=seed, start_step=start_step, process_index=process_index,
      process_count=process_count)
  return (_pair_batch(results) for results in batches)


def _pair_batch(results: list) -> dict:
  view_pairs, indices, labels, skipped = zip(*results)
  return {"view1": np.stack([v[0] for v in view_pairs]),
          "view2": np.stack([v[1] for v in view_pairs]),
          "label": np.asarray(labels, np.int32), "index": np.asarray(indices, np.int64),
          "num_skipped": int(sum(skipped))}


def labelled_batches(config, *, global_batch_size: int, seed: int, start_step: int = 0,
                     process_index: int = 0, process_count: int = 1,
                     indices=None) -> Iterator[dict]:
  """Endless training batches for linear evaluation and fine-tuning: random resized crops +
  flips of config.train_split (or of its examples at `indices`, e.g. a labelled subset),
  reshuffled every epoch. 'image' uint8 [b, S, S, 3], 'label' int32, 'mask' bool (all
  True), 'index' int64, 'num_skipped'. Evaluation batches are centre_view_batches'.
  """
  batches = _config_batches(
      config, config.train_split, num_views=1, indices=indices,
      global_batch_size=global_batch_size, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count)
  return (_single_view_batch(results) for results in batches)


def _single_view_batch(results: list) -> dict:
  crops, indices, labels, skipped = zip(*results)
  return {"image": np.stack([c[0] for c in crops]), "label": np.asarray(labels, np.int32),
          "mask": np.ones(len(crops), bool), "index": np.asarray(indices, np.int64),
          "num_skipped": int(sum(skipped))}


def centre_view_batches(config, split_name: str, *, global_batch_size: int,
                        indices=None, start_step: int = 0, process_index: int = 0,
                        process_count: int = 1) -> Iterator[dict]:
  """One pass in order over a split (or its examples at `indices`), resized to S*256/224
  and centre-cropped to S (spec), padded with zero images (mask False) to whole global
  batches; an undecodable image is masked out the same way, so every example counts once.
  """
  slots = _process_slots(global_batch_size, process_index, process_count)
  source = sources.open_source(config, split_name)
  if indices is not None:
    source = sources.SubsetSource(source, indices)
  size = config.image_size
  num_steps = math.ceil(len(source) / global_batch_size)
  _warn_if_pillow_resizes()

  def jobs(step):
    positions = [step * global_batch_size + slot for slot in slots]
    return [lambda p=p: (p, _centre_view(source, p, size) if p < len(source) else None)
            for p in positions]

  def assemble(results):
    images = np.zeros((len(results), size, size, 3), np.uint8)
    labels = np.zeros(len(results), np.int32)
    used = np.full(len(results), -1, np.int64)
    skipped = 0
    for i, (position, view) in enumerate(results):
      if view is not None:
        images[i], labels[i] = view
        used[i] = position
      elif position < len(source):
        skipped += 1
    return {"image": images, "label": labels, "mask": used >= 0, "index": used,
            "num_skipped": skipped}

  return _prefetched(range(start_step, num_steps), jobs, assemble, _num_workers(config))
