"""Linear evaluation (spec, "Linear evaluation"): a frozen encoder in eval mode, a Linear +
BatchNorm head trained with SGD (momentum 0.9, no weight decay, lr 0.2 x batch/256, cosine).

Encoders: the online trunk of a pretraining workdir ("pretrained"), the same network at
random initialisation with its initial BN statistics ("random_init"), or the normalised
pixels themselves ("raw_pixels"). With linear_eval.augment the head trains on random
resized crops + flips through the frozen trunk, as the release does; without it, features
of the centre views are computed once and the head trains on them (fast: the demo's way).

The run checkpoints at the end of every epoch and on SIGTERM, and a rerun resumes exactly
(`supervised`); the resolution is the pretraining run's unless linear_eval.image_size says
otherwise.
"""
import dataclasses
import functools
import logging
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from care_jax import checkpointing, parallel, pretrained
from care_jax.data import augment, input_pipeline
from care_jax.errors import UserError
from care_jax.evaluation import features, supervised
from care_jax.training import pretraining

ENCODERS = ("pretrained", "random_init", "raw_pixels")


class LinearHead(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, features, train: bool):
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                      bias_init=nn.initializers.zeros)(features)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(logits)


@dataclasses.dataclass(frozen=True)
class Encoder:
  """A frozen encoder: apply(variables, uint8 images) -> [B, D] float32 features."""
  apply: Callable
  variables: Any
  description: str
  pretrained_config: Optional[Any] = None  # the pretraining run's config, if any

  def features_fn(self, mesh) -> Callable:
    """uint8 images (batch-sharded) -> features (batch-sharded), jitted over the mesh."""
    jitted = jax.jit(self.apply, in_shardings=(parallel.replicated(mesh),
                                               parallel.batch_sharded(mesh)),
                     out_shardings=parallel.batch_sharded(mesh))
    return functools.partial(jitted, self.variables)


def _check_encoder(kind: str, pretrained_workdir, section: str = "linear_eval") -> None:
  if kind not in ENCODERS:
    raise UserError(f"{section}.encoder must be one of {ENCODERS}, got {kind!r}.")
  if kind == "pretrained" and not pretrained_workdir:
    raise UserError(f"{section}.pretrained_workdir is not set: pass "
                    f"--config.{section}.pretrained_workdir=<pretraining workdir>.")


def random_init_state(config, image_size: int):
  """The online network of config.model at its random initialisation (config.seed)."""
  config = config.copy_and_resolve_references()
  config.data.image_size = image_size
  setup = pretraining.build(config, steps_per_epoch=1, total_steps=1)
  return setup.online_net, setup.init_state(jax.random.key(config.seed))


def load_encoder(config, image_size: int) -> Encoder:
  """The encoder linear_eval.encoder names (its checkpoint is read only here)."""
  kind, source = config.linear_eval.encoder, config.linear_eval.pretrained_workdir
  _check_encoder(kind, source)
  if kind == "raw_pixels":
    return Encoder(lambda _, images: augment.normalize(images).reshape(images.shape[0], -1),
                   {}, kind)
  if kind == "pretrained":
    net, variables = pretrained.load(source)
    description, pretrained_config = f"pretrained ({source})", checkpointing.load_config(source)
  else:
    net, state = random_init_state(config, image_size)
    variables = {"params": state.online_params, "batch_stats": state.online_stats}
    description, pretrained_config = "random init", None
  apply = lambda v, images: net.apply(v, augment.normalize(images), method=net.trunk_features)
  return Encoder(apply, variables, description, pretrained_config)


def pretrained_config(section_config):
  """The config.json of the pretraining run an evaluation reads, or None."""
  if section_config.encoder != "pretrained" or not section_config.pretrained_workdir:
    return None
  return checkpointing.load_config(section_config.pretrained_workdir)


def evaluate(config, workdir: str) -> dict:
  """Linear evaluation of linear_eval.encoder; writes and returns results.json's content."""
  lin = config.linear_eval
  # Everything that can be checked is checked before any work.
  checkpointing.check_workdir(workdir)
  _check_encoder(lin.encoder, lin.pretrained_workdir)
  mesh = parallel.create_mesh()
  parallel.check_batch_size(lin.global_batch_size, mesh)
  data = config.data.copy_and_resolve_references()
  data.image_size = supervised.image_size(config, "linear_eval", pretrained_config(lin))
  info = input_pipeline.dataset_info(data)
  input_pipeline.check_batch_fits(info.num_train_examples, lin.global_batch_size,
                                  "linear_eval.global_batch_size")
  run = supervised.Run(workdir, config, "linear_eval")
  encoder = load_encoder(config, data.image_size)
  features_fn = encoder.features_fn(mesh)
  logging.info("Linear evaluation of %s at %d px: %d epochs.", encoder.description,
               data.image_size, lin.num_epochs)

  if lin.augment:
    num_train = info.num_train_examples
  else:  # Features of the examples that survived decoding, once.
    train_feats, train_labels = _cached_train_split(features_fn, data, mesh)
    num_train = len(train_labels)
    input_pipeline.check_batch_fits(num_train, lin.global_batch_size,
                                    "linear_eval.global_batch_size")
  steps_per_epoch = input_pipeline.steps_per_epoch(num_train, lin.global_batch_size)
  total_steps = lin.num_epochs * steps_per_epoch

  head = LinearHead(info.num_classes)
  feature_dim = jax.eval_shape(features_fn, jax.ShapeDtypeStruct(
      (mesh.devices.size, data.image_size, data.image_size, 3), jnp.uint8)).shape[-1]
  lr = optax.cosine_decay_schedule(lin.base_lr * lin.global_batch_size / 256, total_steps)
  tx = optax.chain(optax.add_decayed_weights(lin.weight_decay),
                   optax.sgd(lr, momentum=lin.momentum))
  variables = head.init(jax.random.key(config.seed), jnp.zeros((2, feature_dim)), train=False)
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  state = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": variables["params"],
                          "batch_stats": variables["batch_stats"],
                          "opt_state": tx.init(variables["params"])}, replicated)
  state, history = run.restore(state)

  def head_step(state, feats, labels):
    def loss_fn(params):
      logits, new = head.apply({"params": params, "batch_stats": state["batch_stats"]}, feats,
                               train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "batch_stats": stats, "opt_state": opt_state}, loss

  def head_counts(state, feats, labels, mask):
    logits = head.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                        feats, train=False)
    return supervised.correct_counts(logits, labels, mask)

  head_counts = jax.jit(head_counts, in_shardings=(replicated, sharded, sharded, sharded),
                        out_shardings=replicated)

  eval_features = []  # the frozen encoder's features of the eval split, computed once

  def evaluate_head(state):
    if not eval_features:
      eval_features.extend(features.embedded_batches(features_fn, data, data.eval_split, mesh))
    return supervised.accuracy(sum(head_counts(state, *batch) for batch in eval_features))

  if lin.augment:
    train_step = jax.jit(head_step, in_shardings=(replicated, sharded, sharded),
                         out_shardings=(replicated, replicated), donate_argnums=(0,))
    batches = input_pipeline.eval_batches(
        data, split="train", global_batch_size=lin.global_batch_size, seed=config.seed,
        start_step=int(state["step"]), process_index=jax.process_index(),
        process_count=jax.process_count())

    def train_epoch(state, epoch):
      """The rest of `epoch`, a step at a time."""
      for _ in range(int(state["step"]), epoch * steps_per_epoch):
        batch = next(batches)
        images, labels = parallel.host_to_global(mesh, (batch["image"], batch["label"]))
        state, loss = train_step(state, features_fn(images), labels)
        step = int(state["step"])  # the epoch's last step is checked after its evaluation
        if step < epoch * steps_per_epoch:
          run.stop_if_preempted(step, state, history)
      return state, loss
  else:
    batches = None
    train_feats, train_labels = jax.device_put((train_feats, train_labels), replicated)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def scan_epoch(state, order):
      """One epoch over cached features in a single dispatch: order is [steps, batch]."""
      state, losses = jax.lax.scan(
          lambda state, idx: head_step(state, train_feats[idx], train_labels[idx]), state,
          order)
      return state, losses[-1]

    def train_epoch(state, epoch):
      order = np.random.default_rng([config.seed, epoch]).permutation(num_train)
      order = order[:steps_per_epoch * lin.global_batch_size]
      return scan_epoch(state, order.reshape(steps_per_epoch, lin.global_batch_size))

  try:
    for epoch in range(int(state["step"]) // steps_per_epoch + 1, lin.num_epochs + 1):
      state, loss = train_epoch(state, epoch)
      step = int(state["step"])
      run.write_epoch(step, epoch, lin.num_epochs, float(loss), float(lr(step)))
      if epoch == lin.num_epochs or epoch % lin.eval_every_epochs == 0:
        history.append({"epoch": epoch, **evaluate_head(state)})
        run.log_evaluation(step, epoch, lin.num_epochs, float(loss), history[-1])
      run.save(step, state, history)
      if epoch < lin.num_epochs:
        run.stop_if_preempted(step, state, history)
  finally:
    if batches is not None:
      batches.close()
    run.close()
  return run.write_results(supervised.summarise(
      history, encoder=encoder.description, epochs=lin.num_epochs,
      image_size=data.image_size))


def _cached_train_split(features_fn, data, mesh):
  """(features [N, D], labels [N]) of the decodable centre views of the train split, on
  every host."""
  parts = list(features.embedded_batches(features_fn, data, data.train_split, mesh))
  gather = lambda i: np.concatenate([multihost_utils.process_allgather(p[i], tiled=True)
                                     for p in parts])
  feats, labels, mask = gather(0), gather(1), gather(2)
  return feats[mask], labels[mask]
