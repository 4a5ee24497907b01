"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of InstDisc (Wu et al. 2018), as solo-learn and lightly run it during
pretraining: features are compared by cosine similarity with a labelled bank, the k most
similar bank examples vote for their class with weight exp(similarity / temperature), and
the class with the largest vote is the prediction. No training, so it measures the
features themselves, and it takes one pass over the bank and the eval split.

The bank is replicated on every device and the queries are sharded over the batch axis,
so each device ranks its own queries against the whole bank (one matrix product, under
shard_map: left to jit, XLA gathered every device's similarities for the top-k) and only
the count of correct predictions is summed over the devices. A bank of N examples with
D-dim features takes N x D x 4 bytes per device (100,000 x 2048: 0.8 GB).
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from care_jax import parallel


def bank_indices(num_train_examples: int, bank_size: int, seed: int) -> Optional[np.ndarray]:
  """The training examples in the bank: all (None) when bank_size <= 0 or covers the
  split, else a fixed sorted random sample of bank_size, the same at every evaluation."""
  if bank_size <= 0 or bank_size >= num_train_examples:
    return None
  rng = np.random.default_rng([seed, 4])
  return np.sort(rng.choice(num_train_examples, bank_size, replace=False))


def _unit(x):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def weighted_votes(queries, bank, bank_labels, bank_mask, *, k: int, temperature: float,
                   num_classes: int):
  """[Q, num_classes] votes of the k nearest valid bank examples of each query."""
  similarity = _unit(queries) @ _unit(bank).T
  similarity = jnp.where(bank_mask[None, :], similarity, -jnp.inf)
  top, index = jax.lax.top_k(similarity, min(k, bank.shape[0]))
  weights = jnp.where(jnp.isfinite(top), jnp.exp(top / temperature), 0.0)
  votes = jnp.zeros((queries.shape[0], num_classes), jnp.float32)
  rows = jnp.arange(queries.shape[0])[:, None]
  return votes.at[rows, bank_labels[index]].add(weights)


def correct_count(queries, labels, mask, bank, bank_labels, bank_mask, *, k: int,
                  temperature: float, num_classes: int):
  """How many valid queries the weighted kNN classifies correctly."""
  votes = weighted_votes(queries, bank, bank_labels, bank_mask, k=k, temperature=temperature,
                         num_classes=num_classes)
  return jnp.sum((jnp.argmax(votes, axis=-1) == labels) & mask)


def count_fn(mesh, *, k: int, temperature: float, num_classes: int):
  """(queries, labels, mask sharded; bank, bank labels, bank mask replicated) -> correct
  count (replicated), jitted: each device counts its own queries, the counts are summed."""
  count = functools.partial(correct_count, k=k, temperature=temperature,
                            num_classes=num_classes)
  sharded, whole = P(parallel.DATA_AXIS), P()
  return jax.jit(parallel.per_device(
      lambda *args: jax.lax.psum(count(*args), parallel.DATA_AXIS), mesh,
      in_specs=(sharded, sharded, sharded, whole, whole, whole), out_specs=whole))


class Knn:
  """A bank of labelled features on the mesh, and kNN counts of query batches against it."""

  def __init__(self, mesh, *, k: int, temperature: float, num_classes: int):
    self._gather = jax.jit(lambda *xs: tuple(jnp.concatenate(x) for x in zip(*xs)),
                           out_shardings=parallel.replicated(mesh))
    self._count = count_fn(mesh, k=k, temperature=temperature, num_classes=num_classes)
    self._bank = None

  def set_bank(self, batches) -> None:
    """batches: (features, labels, mask) global arrays, e.g. of the train split."""
    self._bank = self._gather(*batches)

  def correct(self, features, labels, mask):
    """Correctly classified valid examples of one batch (a replicated scalar)."""
    return self._count(features, labels, mask, *self._bank)
