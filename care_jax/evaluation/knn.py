"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of InstDisc (Wu et al. 2018), as solo-learn and lightly run it during
pretraining: features are compared by cosine similarity with a labelled bank, the k most
similar bank examples vote for their class with weight exp(similarity / temperature), and
the class with the largest vote is the prediction. No training, so it measures the
features themselves, and it takes one pass over the bank and the eval split.

The bank stays sharded over the devices as its batches were embedded (features.
stack_batches): a bank of N examples with D-dim features takes N x D x 4 / n bytes per
device (100,000 x 2048 on 8 GPUs: 0.1 GB). For each batch of queries (sharded too), every
device ranks all the batch's queries against its part of the bank and keeps its k best;
an all-to-all brings each device every part's candidates for its own queries, and the k
best of those are the k best of the whole bank; only the counts are summed over the
devices. What moves is the query batch and k candidates a query, never the bank.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from care_jax import parallel
from care_jax.evaluation import features


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


def nearest(queries, bank, bank_labels, bank_mask, k: int):
  """(similarities [Q, k'], labels [Q, k']) of the k' = min(k, bank size) most similar
  bank examples of each query; -inf for invalid ones."""
  similarity = _unit(queries) @ _unit(bank).T
  similarity = jnp.where(bank_mask[None, :], similarity, -jnp.inf)
  top, index = jax.lax.top_k(similarity, min(k, bank.shape[0]))
  return top, bank_labels[index]


def votes_of(top, top_labels, *, temperature: float, num_classes: int):
  """[Q, num_classes]: each neighbour votes for its class with exp(similarity / T)."""
  weights = jnp.where(jnp.isfinite(top), jnp.exp(top / temperature), 0.0)
  votes = jnp.zeros((top.shape[0], num_classes), jnp.float32)
  return votes.at[jnp.arange(top.shape[0])[:, None], top_labels].add(weights)


def weighted_votes(queries, bank, bank_labels, bank_mask, *, k: int, temperature: float,
                   num_classes: int):
  """[Q, num_classes] votes of the k nearest valid bank examples of each query."""
  top, top_labels = nearest(queries, bank, bank_labels, bank_mask, k)
  return votes_of(top, top_labels, temperature=temperature, num_classes=num_classes)


def correct_count(queries, labels, mask, bank, bank_labels, bank_mask, *, k: int,
                  temperature: float, num_classes: int):
  """How many valid queries the weighted kNN classifies correctly."""
  votes = weighted_votes(queries, bank, bank_labels, bank_mask, k=k, temperature=temperature,
                         num_classes=num_classes)
  return jnp.sum((jnp.argmax(votes, axis=-1) == labels) & mask)


def _count_on_device(queries, labels, mask, bank, bank_labels, bank_mask, *, k: int,
                     temperature: float, num_classes: int, axis: str):
  """This device's share of correct_count for the whole sharded bank (module docstring)."""
  devices = jax.lax.axis_size(axis)
  every_query = jax.lax.all_gather(queries, axis, tiled=True)
  top, top_labels = nearest(every_query, bank.reshape(-1, bank.shape[-1]),
                            bank_labels.reshape(-1), bank_mask.reshape(-1), k)
  # [devices (whose queries), own queries, k'] -> [devices (whose bank part), own queries,
  # k'] -> [own queries, every part's k']
  split = lambda x: x.reshape((devices, queries.shape[0]) + x.shape[1:])
  merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(queries.shape[0], -1)
  top, top_labels = (merge(jax.lax.all_to_all(split(x), axis, 0, 0))
                     for x in (top, top_labels))
  top, index = jax.lax.top_k(top, min(k, top.shape[1]))
  top_labels = jnp.take_along_axis(top_labels, index, axis=1)
  votes = votes_of(top, top_labels, temperature=temperature, num_classes=num_classes)
  return jax.lax.psum(jnp.sum((jnp.argmax(votes, axis=-1) == labels) & mask), axis)


def count_fn(mesh, *, k: int, temperature: float, num_classes: int):
  """(queries, labels, mask sharded; the bank's features, labels and mask stacked as
  features.stack_batches leaves them) -> correct count (replicated), jitted."""
  sharded, bank = P(parallel.DATA_AXIS), P(None, parallel.DATA_AXIS)
  return jax.jit(parallel.per_device(
      functools.partial(_count_on_device, k=k, temperature=temperature,
                        num_classes=num_classes, axis=parallel.DATA_AXIS), mesh,
      in_specs=(sharded, sharded, sharded, bank, bank, bank), out_specs=P()))


class Knn:
  """A bank of labelled features on the mesh, and kNN counts of query batches against it."""

  def __init__(self, mesh, *, k: int, temperature: float, num_classes: int):
    self._mesh = mesh
    self._count = count_fn(mesh, k=k, temperature=temperature, num_classes=num_classes)
    self._bank = None

  def set_bank(self, batches) -> None:
    """batches: (features, labels, mask) global arrays, e.g. of the train split."""
    self._bank = features.stack_batches(batches, self._mesh)

  def correct(self, queries, labels, mask):
    """Correctly classified valid examples of one batch (a replicated scalar)."""
    return self._count(queries, labels, mask, *self._bank)


def top1(features_fn, data_config, mesh, *, k: int, temperature: float, num_classes: int,
         bank: Optional[np.ndarray], safety) -> float:
  """kNN top-1 on the eval split of any encoder (features_fn: uint8 images -> [B, D]),
  against the training examples `bank` (bank_indices): the monitor's protocol, for the
  baselines a pretrained encoder's kNN is judged against (e.g. raw pixels)."""
  classifier = Knn(mesh, k=k, temperature=temperature, num_classes=num_classes)
  embed = functools.partial(features.apply_to_split, features_fn, data_config, mesh=mesh)
  classifier.set_bank(list(embed(split=data_config.train_split, indices=bank)))
  correct = total = jnp.zeros((), jnp.int32)
  for feats, labels, mask in embed(split=data_config.eval_split):
    correct += classifier.correct(feats, labels, mask)
    total += jnp.sum(mask)
    safety.check()
  return int(correct) / int(total)
