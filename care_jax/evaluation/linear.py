"""Linear evaluation (spec, "Linear evaluation"): a frozen encoder in eval mode, a Linear +
BatchNorm head trained with SGD (momentum 0.9, no weight decay, lr 0.2 x batch/256, cosine).

Encoders: the online trunk of a pretraining workdir ("pretrained"), the same network at
random initialisation with its initial BN statistics ("random_init"), or the normalised
pixels themselves ("raw_pixels"). With linear_eval.augment the head trains on random
resized crops + flips through the frozen trunk, as the release does; without it, features
of the centre views are computed once and the head trains on them (fast: the demo's way).
"""
import functools
import json
import logging
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from care_jax import parallel, pretrained
from care_jax.data import augment, input_pipeline, sources
from care_jax.errors import UserError
from care_jax.training import pretraining

ENCODERS = ("pretrained", "random_init", "raw_pixels")
_FEATURE_BATCH = 1024  # images per forward pass when features are cached
_CACHE_BYTES = 2**31  # decoded splits up to this size stay in memory (see _centre_view_chunks)


class LinearHead(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, features, train: bool):
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                      bias_init=nn.initializers.zeros)(features)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(logits)


def load_encoder(config):
  """(features_fn(images_uint8) -> [B, D] float32, description) for linear_eval.encoder."""
  kind = config.linear_eval.encoder
  if kind not in ENCODERS:
    raise UserError(f"linear_eval.encoder must be one of {ENCODERS}, got {kind!r}.")
  if kind == "raw_pixels":
    return lambda images: augment.normalize(images).reshape(images.shape[0], -1), kind
  if kind == "pretrained":
    source = config.linear_eval.pretrained_workdir
    if not source:
      raise UserError("linear_eval.pretrained_workdir is not set: pass "
                      "--config.linear_eval.pretrained_workdir=<pretraining workdir>.")
    net, variables = pretrained.load(source)
    description = f"pretrained ({source})"
  else:
    setup = pretraining.build(config, steps_per_epoch=1, total_steps=1)
    state = setup.init_state(jax.random.key(config.seed))
    net = setup.online_net
    variables = {"params": state.online_params, "batch_stats": state.online_stats}
    description = "random init"

  def features(images):
    return net.apply(variables, augment.normalize(images), method=net.trunk_features)

  return features, description


def top_k_correct(logits, labels, mask, k):
  top = jnp.argsort(-logits, axis=-1)[:, :k]
  return jnp.sum(jnp.any(top == labels[:, None], axis=-1) & mask)


def evaluate(config, workdir: str) -> dict:
  lin = config.linear_eval
  mesh = parallel.create_mesh()
  parallel.check_batch_size(lin.global_batch_size, mesh)
  info = input_pipeline.dataset_info(config.data)
  features_fn, description = load_encoder(config)
  steps_per_epoch = input_pipeline.steps_per_epoch(info.num_train_examples,
                                                   lin.global_batch_size)
  total_steps = lin.num_epochs * steps_per_epoch
  logging.info("Linear evaluation of %s: %d epochs of %d steps.", description, lin.num_epochs,
               steps_per_epoch)

  head = LinearHead(info.num_classes)
  feature_dim = jax.eval_shape(features_fn, jax.ShapeDtypeStruct(
      (2, config.data.image_size, config.data.image_size, 3), jnp.uint8)).shape[-1]
  variables = head.init(jax.random.key(config.seed), jnp.zeros((2, feature_dim)), train=False)
  lr = optax.cosine_decay_schedule(lin.base_lr * lin.global_batch_size / 256, total_steps)
  tx = optax.chain(optax.add_decayed_weights(lin.weight_decay),
                   optax.sgd(lr, momentum=lin.momentum))
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  state = jax.device_put(state, replicated)

  def head_step(state, features, labels):
    params, stats, opt_state = state

    def loss_fn(params):
      logits, new = head.apply({"params": params, "batch_stats": stats}, features, train=True,
                               mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state), loss

  def eval_counts(state, features, labels, mask):
    params, stats, _ = state
    logits = head.apply({"params": params, "batch_stats": stats}, features, train=False)
    return jnp.stack([top_k_correct(logits, labels, mask, 1),
                      top_k_correct(logits, labels, mask, min(5, info.num_classes)),
                      jnp.sum(mask)])

  def train_epoch(state, feats, labels, order):
    """One epoch over cached features in a single dispatch: order is [steps, batch]."""
    state, losses = jax.lax.scan(
        lambda state, idx: head_step(state, feats[idx], labels[idx]), state, order)
    return state, losses[-1]

  train_epoch = jax.jit(train_epoch, donate_argnums=(0,))
  train_step = jax.jit(head_step, in_shardings=(replicated, sharded, sharded),
                       out_shardings=(replicated, replicated), donate_argnums=(0,))
  eval_counts = jax.jit(eval_counts, in_shardings=(replicated, sharded, sharded, sharded),
                        out_shardings=replicated)
  features_fn = jax.jit(features_fn, in_shardings=sharded, out_shardings=sharded)
  to_global = lambda x: parallel.host_to_global(mesh, x)

  def evaluate_head(state, eval_features=None):
    counts = np.zeros(3)
    if eval_features is not None:
      for feats, labels, mask in eval_features:
        counts += np.asarray(eval_counts(state, feats, labels, mask))
    else:
      for batch in _eval_batches(config.data, lin.global_batch_size):
        feats = features_fn(to_global(batch["image"]))
        counts += np.asarray(eval_counts(state, feats, *to_global((batch["label"],
                                                                   batch["mask"]))))
    return counts[0] / counts[2], counts[1] / counts[2], int(counts[2])

  eval_features = None
  if not lin.augment:
    train_feats, train_labels = _cached_split(config, features_fn, to_global,
                                              config.data.train_split)
    eval_features = [to_global(b) for b in _padded_batches(
        *_cached_split(config, features_fn, to_global, config.data.eval_split),
        lin.global_batch_size)]
    train_feats, train_labels = jax.device_put((train_feats, train_labels), replicated)
  else:
    batches = input_pipeline.eval_batches(
        config.data, split="train", global_batch_size=lin.global_batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())

  history, start = [], time.monotonic()
  rng = np.random.default_rng(config.seed)
  for epoch in range(1, lin.num_epochs + 1):
    if lin.augment:
      for _ in range(steps_per_epoch):
        batch = next(batches)
        feats = features_fn(to_global(batch["image"]))
        state, loss = train_step(state, feats, to_global(batch["label"]))
    else:
      order = rng.permutation(len(train_labels))[:steps_per_epoch * lin.global_batch_size]
      state, loss = train_epoch(state, train_feats, train_labels,
                                order.reshape(steps_per_epoch, lin.global_batch_size))
    if epoch == lin.num_epochs or epoch % lin.eval_every_epochs == 0:
      top1, top5, examples = evaluate_head(state, eval_features)
      history.append({"epoch": epoch, "top1": top1, "top5": top5, "examples": examples})
      elapsed = time.monotonic() - start
      logging.info("linear eval epoch %d/%d: loss %.3f, top-1 %.4f, top-5 %.4f (%.0fs, ETA "
                   "%.0fs)", epoch, lin.num_epochs, float(loss), top1, top5, elapsed,
                   elapsed / epoch * (lin.num_epochs - epoch))
  if lin.augment:
    batches.close()
  best = max(history, key=lambda h: h["top1"])
  results = {"encoder": description, "epochs": lin.num_epochs,
             "final_top1": history[-1]["top1"], "final_top5": history[-1]["top5"],
             "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
             "history": history}
  if jax.process_index() == 0:
    path = pathlib.Path(workdir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)
  return results


def _eval_batches(data_config, global_batch_size):
  return input_pipeline.eval_batches(
      data_config, split="eval", global_batch_size=global_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())


def _centre_view_chunks(config, split_name: str):
  """(uint8 images, labels) chunks of a split's decodable centre views, in order.

  A split whose decoded views fit in _CACHE_BYTES is decoded once per process: the demo
  probes three encoders on the same images, and decoding them was a third of a probe's
  time on a small CPU. Larger splits (ImageNet) are streamed.
  """
  data = config.data.copy_and_resolve_references()
  data.eval_split = split_name  # one ordered pass over that split
  num_bytes = len(sources.open_source(data, split_name)) * data.image_size**2 * 3
  if num_bytes <= _CACHE_BYTES:
    yield _decoded_split(data.to_json())
  else:
    yield from _decoded_chunks(data)


def _decoded_chunks(data_config):
  for batch in _eval_batches(data_config, _FEATURE_BATCH):
    yield batch["image"][batch["mask"]], batch["label"][batch["mask"]]


@functools.lru_cache(maxsize=2)
def _decoded_split(data_json: str):
  images, labels = zip(*_decoded_chunks(ml_collections.ConfigDict(json.loads(data_json))))
  return np.concatenate(images), np.concatenate(labels)


def _cached_split(config, features_fn, to_global, split_name: str):
  """(features [N, D] float32, labels [N]) of a split's centre views, on the host."""
  if jax.process_count() > 1:
    raise UserError("linear_eval.augment=False caches features on one host; run it as a "
                    "single process or set --config.linear_eval.augment=True.")
  batch = config.linear_eval.global_batch_size * max(
      1, _FEATURE_BATCH // config.linear_eval.global_batch_size)  # divides over devices
  feats, labels = [], []
  for images, chunk_labels in _centre_view_chunks(config, split_name):
    for start in range(0, len(images), batch):
      chunk = images[start:start + batch]
      padded = np.pad(chunk, [(0, batch - len(chunk))] + [(0, 0)] * (chunk.ndim - 1))
      feats.append(np.asarray(features_fn(to_global(padded)))[:len(chunk)])
    labels.append(chunk_labels)
  return np.concatenate(feats), np.concatenate(labels)


def _padded_batches(feats, labels, batch_size: int):
  """Whole batches of cached features with a mask for the padding of the last one."""
  for start in range(0, len(labels), batch_size):
    n = min(batch_size, len(labels) - start)
    pad = lambda x: np.pad(x[start:start + n], [(0, batch_size - n)] + [(0, 0)] * (x.ndim - 1))
    yield pad(feats), pad(labels), np.arange(batch_size) < n
