"""Semi-supervised fine-tuning (the paper's Table 2): the whole pretrained trunk plus a new
linear head, trained end to end on a small labelled part of the training split.

The labelled part: on ImageNet, tfds `imagenet2012_subset/1pct` or `/10pct` (SimCLR's
subsets, the paper's); on any other dataset, a class-balanced sample of 1% or 10% of
train_split fixed by finetune.label_seed. The protocol is BYOL's, as the CARE paper gives
none (hyper-parameters and sources in docs/evaluation.md): SGD with Nesterov momentum, no weight
decay, random resized crops + flips, BatchNorm in training mode on the global batch, a
cosine learning rate; evaluation on centre views of eval_split. Epochs, evaluations,
checkpoints, stops and results.json are the shared loop's (`supervised`), as in linear
evaluation.
"""
import functools
import logging

import jax
import jax.numpy as jnp
import optax

from care_jax import errors, parallel, run_safety
from care_jax.data import augment, input_pipeline, sources
from care_jax.evaluation import classifier, encoders, features, supervised

ENCODERS = ("pretrained", "random_init")
LABELS = {"1pct": 0.01, "10pct": 0.1, "all": 1.0}
IMAGENET_SUBSETS = {"1pct": "imagenet2012_subset/1pct", "10pct": "imagenet2012_subset/10pct"}

def labelled_data(config):
  """(train data config, indices of the labelled examples or None for all of them)."""
  ft, data = config.finetune, config.data.copy_and_resolve_references()
  if ft.labels not in LABELS:
    raise errors.UserError(f"finetune.labels must be one of {sorted(LABELS)}, got {ft.labels!r}.")
  if ft.labels == "all":
    return data, None
  if data.name in IMAGENET_SUBSETS.values():
    raise errors.UserError(
        f"data.name is already the subset {data.name}, and finetune.labels={ft.labels} would "
        f"take {ft.labels} of it: set --config.data.name=imagenet2012 (finetune.labels picks "
        f"the subset), or --config.finetune.labels=all.")
  if data.name == "imagenet2012":
    train = data.copy_and_resolve_references()
    train.name = IMAGENET_SUBSETS[ft.labels]
    return train, None
  labels = sources.open_source(data, data.train_split).labels()
  return data, sources.stratified_indices(labels, LABELS[ft.labels], ft.label_seed)


def _initial_trunk(config, source: dict, image_size: int, mesh):
  """(trunk module, its params, its BN statistics), pretrained or at random init, on the
  mesh."""
  network, variables = encoders.load(config, source, image_size, mesh)
  return network.trunk, variables["params"]["trunk"], variables["batch_stats"]["trunk"]


def programs(model: classifier.Classifier, tx, mesh):
  """(train step, logits of eval images, top-1/top-5 counts), jitted over the mesh: the
  state replicated, the batch sharded, so each device computes its own examples."""
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  apply = lambda variables, images, **kwargs: model.apply(
      variables, augment.normalize(images), **kwargs)
  train_step = jax.jit(classifier.training_step(apply, tx),
                       in_shardings=(replicated, sharded, sharded),
                       out_shardings=(replicated, replicated), donate_argnums=(0,))

  @functools.partial(jax.jit, in_shardings=(replicated, sharded), out_shardings=sharded)
  def logits_fn(state, images):
    return apply({"params": state["params"], "batch_stats": state["batch_stats"]}, images,
                 train=False)

  counts_fn = jax.jit(classifier.correct_counts, in_shardings=(sharded, sharded, sharded),
                      out_shardings=replicated)
  return train_step, logits_fn, counts_fn


def finetune(config, workdir: str, safety: run_safety.RunSafety | None = None) -> dict:
  """Fine-tunes finetune.encoder; writes and returns results.json's content."""
  safety = safety or run_safety.RunSafety()
  ft = config.finetune
  mesh = supervised.check_before_work(config, "finetune", ENCODERS, workdir)
  if config.precision not in ("float32", "bfloat16"):
    raise errors.UserError(f"Fine-tuning runs in float32 or bfloat16, not "
                           f"{config.precision!r}; set --config.precision.")
  data = config.data.copy_and_resolve_references()
  data.image_size = encoders.image_size(config, "finetune", encoders.pretrained_config(ft))
  train_data, train_indices = labelled_data(config)
  train_data.image_size = data.image_size
  info = input_pipeline.dataset_info(train_data)
  num_train = info.num_train_examples if train_indices is None else len(train_indices)
  input_pipeline.check_batch_fits(num_train, ft.global_batch_size,
                                  "finetune.global_batch_size")
  source = encoders.source(ft)
  run = supervised.SupervisedRun(workdir, config, "finetune", source, safety)
  try:
    history = _train(config, data, (train_data, train_indices, num_train), info, source,
                     mesh, run, safety)
  finally:
    run.close()
  return run.write_results(
      history, encoder=encoders.describe(source), labels=ft.labels,
      labelled_examples=num_train, epochs=ft.num_epochs, image_size=data.image_size)


def _train(config, data, labelled, info, source, mesh, run, safety) -> list:
  """The trunk and a new head trained end to end on the labelled examples through the
  shared loop."""
  ft = config.finetune
  train_data, train_indices, num_train = labelled
  steps_per_epoch = input_pipeline.steps_per_epoch(num_train, ft.global_batch_size)
  trunk, trunk_params, trunk_stats = _initial_trunk(config, source, data.image_size, mesh)
  model = classifier.classifier_model(trunk, info.num_classes, config.precision)
  head = classifier.head(info.num_classes).init(jax.random.key(config.seed),
                                                jnp.zeros((1, trunk.out_channels)))["params"]
  lr = optax.cosine_decay_schedule(ft.base_lr * ft.global_batch_size / 256,
                                   ft.num_epochs * steps_per_epoch)
  tx = optax.chain(optax.add_decayed_weights(ft.weight_decay),
                   optax.sgd(lr, momentum=ft.momentum, nesterov=True))
  initial = jax.device_put(classifier.initial_state(
      {"trunk": trunk_params, "head": head}, {"trunk": trunk_stats}, tx),
      parallel.replicated(mesh))
  train_step, logits_fn, counts_fn = programs(model, tx, mesh)
  top_k = supervised.TopK(
      lambda: features.apply_to_split(lambda images: images, data, data.eval_split, mesh),
      lambda state, batch: counts_fn(logits_fn(state, batch[0]), *batch[1:]), safety)
  state, start, history = run.restore(initial)
  logging.info("Fine-tuning %s at %d px on %d labelled examples (%s): %d epochs of %d "
               "steps.", encoders.describe(source), data.image_size, num_train, ft.labels,
               ft.num_epochs, steps_per_epoch)
  batches = input_pipeline.labelled_batches(
      train_data, global_batch_size=ft.global_batch_size, seed=config.seed,
      start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count(), indices=train_indices)

  def step_fn(state, batch):
    state, loss = train_step(state, *parallel.host_to_global(mesh, (batch["image"],
                                                                    batch["label"])))
    return state, {"loss": loss}

  try:
    return run.train(state, history, start=start, step_fn=step_fn, batches=batches,
                     steps_per_epoch=steps_per_epoch, num_epochs=ft.num_epochs,
                     eval_every_epochs=ft.eval_every_epochs, evaluators=[top_k],
                     learning_rate=lr, batch_size=ft.global_batch_size)
  finally:
    batches.close()
