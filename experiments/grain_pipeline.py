"""input_pipeline's pretraining batches, built on grain's MapDataset: an evaluation of grain
as a replacement for the hand-written loader (experiments/grain_vs_ours.py), not the
trainer's path: grain did not hold the loader's rate (docs/data.md). Needs `pip install
grain` (not among care_jax's requirements).

Element p of the dataset is this process's p-th example of the run: slot
_process_slots(...)[p mod b] of global batch p // b (b = global_batch_size /
process_count). The order, the views and the replacements are input_pipeline's own
functions of (seed, step, slot), so the batches are bitwise input_pipeline's. grain's own
shuffle and sharding are not used: they give other orders (grain's index shuffle, and
shards of the example order rather than of each global batch).
"""
import sys
import threading
from typing import Callable

import grain

from care_jax.data import input_pipeline, sources
from care_jax.errors import UserError

_ENDLESS = sys.maxsize  # MapDataset.range's stop: an endless stream of examples.


class _LockedOrder:
  """_EpochOrder for grain's threads: it caches one epoch's permutation, swapped unlocked
  (input_pipeline calls it from the main thread only; grain maps in its pool)."""

  def __init__(self, order: input_pipeline._EpochOrder):
    self._order, self._lock = order, threading.Lock()

  def global_batch(self, step: int):
    with self._lock:
      return self._order.global_batch(step)


def grain_view_batches(source: sources.Source, *, num_views: int, image_size: int,
                       min_scale: float, global_batch_size: int, seed: int, start_step: int,
                       process_index: int, process_count: int, num_workers: int,
                       batch_fn: Callable[[list], object] = list, per_step: bool = False
                       ) -> grain.IterDataset:
  """input_pipeline.random_view_batches as a grain IterDataset: batch_fn of each batch's
  list of _random_views results (list: random_view_batches' own elements).

  Decoding runs on grain's thread pool (ReadOptions.num_threads = num_workers), as many
  examples ahead as random_view_batches keeps in flight: one grain element per example
  (the iterator's grain state counts this process's examples from start_step), or with
  per_step one per batch, decoded serially by one thread (grain's per-element cost paid
  once a batch; the state counts steps from start_step). An in-memory ArraySource is
  always one element per step (array_pipeline crops a step's chunk at once).
  """
  if seed < 0:
    raise UserError(f"seed must be >= 0, got {seed}.")
  slots = input_pipeline._process_slots(global_batch_size, process_index, process_count)
  input_pipeline._check_fits(source, global_batch_size)
  order = _LockedOrder(input_pipeline._EpochOrder(len(source), global_batch_size, seed))
  per_process = len(slots)
  ahead = input_pipeline._PREFETCH_STEPS + 1  # Batches in flight, as in _prefetched.
  if isinstance(source, sources.ArraySource):  # Crops by the chunk: one map per step.
    from care_jax.data import array_pipeline  # noqa: PLC0415  (only in-memory splits)
    jobs, assemble = array_pipeline.view_jobs(
        source, order, slots, seed=seed, num_views=num_views, image_size=image_size,
        min_scale=min_scale, num_workers=1)
    steps = grain.MapDataset.range(start_step, _ENDLESS).map(
        lambda step: batch_fn(assemble([job() for job in jobs(step)])))
    return steps.to_iter_dataset(grain.ReadOptions(
        num_threads=num_workers, prefetch_buffer_size=max(ahead, num_workers)))

  input_pipeline._warn_if_pillow_resizes()

  def views_of(position: int):
    step, i = divmod(position, per_process)
    slot = slots[i]
    return input_pipeline._random_views(
        source, int(order.global_batch(step)[slot]), seed=seed, step=step, slot=slot,
        num_views=num_views, image_size=image_size, min_scale=min_scale)

  if per_step:
    def batch_of(step: int):
      return batch_fn([views_of(step * per_process + i) for i in range(per_process)])
    steps = grain.MapDataset.range(start_step, _ENDLESS).map(batch_of)
    return steps.to_iter_dataset(grain.ReadOptions(
        num_threads=num_workers, prefetch_buffer_size=max(ahead, num_workers)))

  examples = grain.MapDataset.range(start_step * per_process, _ENDLESS).map(views_of)
  examples = examples.to_iter_dataset(grain.ReadOptions(
      num_threads=num_workers, prefetch_buffer_size=ahead * per_process))
  return examples.batch(per_process, drop_remainder=True, batch_fn=batch_fn)


def pretrain_batches_grain(config, *, global_batch_size: int, seed: int, start_step: int = 0,
                           process_index: int = 0, process_count: int = 1,
                           per_step: bool = False) -> grain.DatasetIterator:
  """input_pipeline.pretrain_batches' batches (the same dicts, bitwise) from a grain
  iterator, whose get_state/set_state a checkpoint could hold."""
  source = sources.open_source(config, config.train_split)
  return iter(grain_view_batches(
      source, num_views=2, image_size=config.image_size, min_scale=config.crop_min_scale,
      global_batch_size=global_batch_size, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count,
      num_workers=input_pipeline._num_workers(config), batch_fn=input_pipeline._pair_batch,
      per_step=per_step))
