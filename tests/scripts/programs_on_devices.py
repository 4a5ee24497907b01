"""Compiles every program pretraining and the evaluations jit over the mesh (care_jax.
scaling) for the tiny config at 4 examples per device, on a mesh of one device and on all
(the test sets XLA_FLAGS for 8 simulated CPU devices), and prints both audits as JSON,
with linear evaluation's feature cache and the kNN bank built on all devices from random
batches: their bytes per device, a batch looked up from the cache against numpy, and the
kNN count against the bank against the count on one device with the whole bank."""
import json

import jax
import numpy as np

from care_jax import parallel, scaling
from care_jax.evaluation import features, knn, linear
from care_jax.training.pretraining import FAST_COMPILE
from tests.conftest import load_config


def feature_cache(mesh):
  rng = np.random.default_rng(0)
  batches, batch, dim = 5, 32, 24
  feats = rng.normal(size=(batches, batch, dim)).astype(np.float32)
  labels = rng.integers(0, 10, (batches, batch)).astype(np.int32)
  mask = rng.random((batches, batch)) > 0.2  # padding and undecodable images
  parts = [parallel.host_to_global(mesh, (feats[i], labels[i], mask[i]))
           for i in range(batches)]
  cached_feats, cached_labels, valid = linear.cache_features(parts, mesh)
  order = valid[rng.permutation(len(valid))[:batch]]
  got_feats, got_labels = jax.device_get(jax.jit(linear.take_cached_fn(mesh))(
      cached_feats, cached_labels, order))
  return {"bytes": feats.nbytes,
          "bytes_per_device": [s.data.nbytes for s in cached_feats.addressable_shards],
          "label_bytes_per_device": cached_labels.addressable_shards[0].data.nbytes,
          "valid_is_the_mask": bool(np.array_equal(valid, np.flatnonzero(mask))),
          "lookup_error": float(np.abs(got_feats - feats.reshape(-1, dim)[order]).max()),
          "lookup_labels_equal": bool(np.array_equal(got_labels,
                                                     labels.reshape(-1)[order]))}


def knn_bank(mesh):
  rng = np.random.default_rng(1)
  batches, batch, dim, classes = 6, 32, 16, 5
  centres = rng.normal(size=(classes, dim))
  bank_labels = rng.integers(0, classes, (batches, batch)).astype(np.int32)
  bank = (centres[bank_labels] + rng.normal(size=(batches, batch, dim))).astype(np.float32)
  bank_mask = rng.random((batches, batch)) > 0.1
  query_labels = rng.integers(0, classes, 2 * batch).astype(np.int32)
  queries = (centres[query_labels] + rng.normal(size=(2 * batch, dim))).astype(np.float32)
  query_mask = rng.random(2 * batch) > 0.1
  stacked = features.stack_batches(
      [parallel.host_to_global(mesh, (bank[i], bank_labels[i], bank_mask[i]))
       for i in range(batches)], mesh)
  count = knn.count_fn(mesh, k=20, temperature=0.07, num_classes=classes)
  sharded = int(count(*parallel.host_to_global(mesh, (queries, query_labels, query_mask)),
                      *stacked))
  whole = int(jax.jit(knn.correct_count, static_argnames=("k", "temperature", "num_classes"))(
      queries, query_labels, query_mask, bank.reshape(-1, dim), bank_labels.reshape(-1),
      bank_mask.reshape(-1), k=20, temperature=0.07, num_classes=classes))
  return {"bytes": bank.nbytes,
          "bytes_per_device": [s.data.nbytes for s in stacked[0].addressable_shards],
          "correct_sharded": sharded, "correct_whole_bank": whole,
          "valid_queries": int(query_mask.sum())}


def main():
  config = load_config("tiny")
  audit = lambda devices: scaling.audit(config, parallel.create_mesh(devices), 4,
                                        num_classes=10, compiler_options=FAST_COMPILE)
  print(json.dumps({"devices": len(jax.devices()), "one": audit(jax.devices()[:1]),
                    "many": audit(jax.devices()),
                    "feature_cache": feature_cache(parallel.create_mesh()),
                    "knn_bank": knn_bank(parallel.create_mesh())}))


if __name__ == "__main__":
  main()
