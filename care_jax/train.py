"""The pretraining program: data, train step, checkpoints and metrics put together.

Everything a resumed run needs is in the checkpoint (the state pytree, whose step fixes the
data stream, the schedules and the augmentation keys), so rerunning the same command after
a crash or a preemption continues exactly where the last checkpoint left off. A damaged
latest checkpoint is moved aside and the run resumes from the newest intact one
(checkpointing.resume). A stop request saves and raises run_safety.Stopped (exit status
75, "rerun to resume"). A run whose loss or state stops being finite stops at the next
check without saving it (training.divergence).
"""
import logging

import jax

from care_jax import checkpointing, errors, metric_writers, parallel, plan, run_safety
from care_jax.data import input_pipeline
from care_jax.evaluation import monitor as monitor_lib
from care_jax.training import divergence, loop, online_probe, pretraining


def schedule_length(config, num_train_examples: int) -> tuple[int, int]:
  """(steps per epoch, total steps): num_train_steps > 0 overrides num_epochs."""
  input_pipeline.check_batch_fits(num_train_examples, config.global_batch_size,
                                  "global_batch_size")
  steps_per_epoch = input_pipeline.steps_per_epoch(num_train_examples, config.global_batch_size)
  if config.num_train_steps > 0:
    return steps_per_epoch, config.num_train_steps
  errors.check_positive(config.num_epochs, "num_epochs")
  return steps_per_epoch, int(config.num_epochs * steps_per_epoch)


def pretrain(config, workdir: str, safety: run_safety.RunSafety | None = None) -> dict:
  """Pretrains (or resumes) in `workdir`; returns the last logged metrics.

  Raises run_safety.Stopped after saving, when a stop was requested before the last step,
  and divergence.Diverged (nothing saved) when its numbers stopped being finite.
  """
  safety = safety or run_safety.RunSafety()
  errors.check_positive(config.log_every_steps, "log_every_steps")
  checkpointing.check_workdir(workdir)
  guard = divergence.Guard(config, workdir)  # a rerun that would diverge again stops here
  info = input_pipeline.dataset_info(config.data)
  steps_per_epoch, total_steps = schedule_length(config, info.num_train_examples)
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.global_batch_size, mesh)
  plan.check_fits(config, mesh, info.num_train_examples, info.num_classes)  # GPUs only
  if info.num_classes < 2 and (config.monitor.online_probe or config.monitor.every_steps > 0):
    logging.info("%s has no labels (one class): no online probe and no kNN monitor.",
                 info.name)
  probe = online_probe.from_config(config.monitor, info.num_classes, total_steps)
  setup = pretraining.build(config, steps_per_epoch, total_steps, probe)
  monitor = monitor_lib.create(config, mesh, setup.online_net, probe, info, safety)
  mgr = checkpointing.manager(workdir, keep=config.keep_checkpoints,
                              save_every=config.checkpoint_every_steps)
  try:
    state = _resume_or_start(config, workdir, mgr, setup, guard, mesh, total_steps)
    start_step = int(state.step)  # once, before the loop: it counts steps on the host
    if start_step >= total_steps:
      logging.info("Nothing to do: the checkpoint is at step %d of %d.", start_step,
                   total_steps)
      return {} if monitor is None else _evaluate_once(monitor, start_step, state)
    return _train(config, workdir, safety, mgr, setup, guard, monitor, mesh, state,
                  (start_step, steps_per_epoch, total_steps))
  finally:
    checkpointing.finish(mgr)


def _resume_or_start(config, workdir, mgr, setup, guard, mesh, total_steps):
  """The newest checkpoint's state, else a new one; refuses to splice two runs."""
  if mgr.latest_step() is not None:
    cures = divergence.CURE_FIELDS if guard.resumed_with_cure else ()
    checkpointing.check_same_run(workdir, config,
                                 resumable=checkpointing.RESUMABLE_CHANGES + cures)
  checkpointing.save_config(workdir, config)
  replicated = parallel.replicated(mesh)
  state = checkpointing.resume(mgr, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      setup.abstract_state()))
  guard.clear()  # resumed (or started) under the new settings
  if state is not None:
    logging.info("Resumed from step %d of %d.", int(state.step), total_steps)
    return state
  logging.info("Starting from scratch: %d steps (%d devices).", total_steps, mesh.devices.size)
  return setup.init_state(jax.random.key(config.seed), replicated)


def _evaluate_once(monitor, step: int, state) -> dict:
  out = monitor.evaluate(state)
  logging.info("evaluation at step %d: %s", step, loop.describe(out))
  return out


def _train(config, workdir, safety, mgr, setup, guard, monitor, mesh, state, schedule):
  start_step, steps_per_epoch, total_steps = schedule
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  batches = input_pipeline.pretrain_batches(
      config.data, global_batch_size=config.global_batch_size, seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())
  metrics = loop.Metrics(writer, every=config.log_every_steps, total_steps=total_steps,
                         start_step=start_step, global_batch_size=config.global_batch_size,
                         steps_per_epoch=steps_per_epoch, check=guard.check_metrics)
  checkpoints = loop.Checkpoints(mgr, checkpointing.save, safety, total_steps=total_steps,
                                 due=mgr.should_save, check_state=guard.check_state)
  hooks = [loop.Progress(start_step, total_steps, writer)]
  if config.profile_steps > 0 and jax.process_index() == 0:
    hooks.append(metric_writers.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                        first_profile=start_step + config.log_every_steps))
  hooks += [metrics, checkpoints]
  evaluations = None
  if monitor is not None:
    every = config.monitor.every_steps
    evaluations = loop.Evaluations(
        [monitor], writer, checkpoints, metrics=metrics,
        due=lambda step: step % every == 0 or step == total_steps)
    hooks.append(evaluations)
  train_step = setup.jitted_step(mesh)
  keep_labels = setup.probe is not None

  def step_fn(state, batch):
    return train_step(state, parallel.host_to_global(mesh, batch))

  def next_batch():
    while True:
      with metrics.waiting_for_data():
        batch = next(batches)
      metrics.skipped += batch.pop("num_skipped")
      batch.pop("index")
      if not keep_labels:
        batch.pop("label")
      yield batch

  try:
    loop.run(state, step_fn, next_batch(), start=start_step, stop=total_steps, hooks=hooks)
  finally:
    for hook in hooks:
      if hasattr(hook, "close"):
        hook.close()  # a run stopped inside the profiled steps still ends its trace
    batches.close()
    writer.close()
  return {**metrics.last, **(evaluations.last if evaluations else {})}
