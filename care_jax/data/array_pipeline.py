"""The input pipeline's fast path for a split already decoded in memory (ArraySource).

One example at a time, the host's time per Fashion-MNIST pair is mostly numpy call
overhead (a generator per example, ten scalar draws per window), and Python threads share
one interpreter: a GPU would wait for its data at 28 px. Here each step's windows and flips
are drawn at once, from one generator per global batch, default_rng([seed, 1, step])
(input_pipeline's crop stream with a shorter key), and each worker crops a contiguous
chunk of this process's slots. Batches stay a function of (seed, step) whatever the number
of processes or workers; the example order is input_pipeline's.
"""
import itertools

import numpy as np

from care_jax.data import sources, views

_VIEW_STREAM = 1


def view_jobs(source: sources.ArraySource, order, slots: range, *, seed: int, num_views: int,
              image_size: int, min_scale: float, num_workers: int):
  """(jobs, assemble) for input_pipeline's prefetching loop: jobs(step) crops one chunk of
  `slots` each, and assemble gives per example (views, index, label, 0 skipped), as
  input_pipeline.random_view_batches does."""
  images, labels = source.images, source.labels()
  height, width = images.shape[1:3]
  chunks = [chunk for chunk in np.array_split(np.asarray(slots), num_workers) if len(chunk)]

  def crop_chunk(chunk, indices, boxes, flips):
    crops = [views.crop_array_views(images[indices[chunk]], boxes[chunk, v], flips[chunk, v],
                                    image_size) for v in range(num_views)]
    return [([crop[j] for crop in crops], int(indices[slot]), int(labels[indices[slot]]), 0)
            for j, slot in enumerate(chunk)]

  def jobs(step):
    indices = order.global_batch(step)
    rng = np.random.default_rng([seed, _VIEW_STREAM, step])
    boxes = views.random_resized_crop_boxes(rng, len(indices) * num_views, height, width,
                                            min_scale).reshape(len(indices), num_views, 4)
    flips = rng.random((len(indices), num_views)) < 0.5
    return [lambda chunk=chunk: crop_chunk(chunk, indices, boxes, flips) for chunk in chunks]

  return jobs, lambda results: list(itertools.chain.from_iterable(results))
