"""The pretraining program: data, train step, checkpoints and metrics put together.

Everything a resumed run needs is in the checkpoint (the state pytree, whose step fixes the
data stream, the schedules and the augmentation keys), so rerunning the same command after
a crash or a preemption continues exactly where the last checkpoint left off. A damaged
latest checkpoint is moved aside and the run resumes from the newest intact one
(checkpointing.resume). On SIGTERM the loop saves and raises preemption.Preempted, which
the command line turns into exit status 75 ("rerun to resume"). A run whose loss or state
stops being finite stops at the next check without saving it (training.divergence).
"""
import contextlib
import datetime
import logging
import time

import jax

from care_jax import checkpointing, errors, metric_writers, parallel, plan, preemption
from care_jax.data import input_pipeline
from care_jax.evaluation import monitor as monitor_lib
from care_jax.training import divergence, online_probe, pretraining


def schedule_length(config, num_train_examples: int) -> tuple[int, int]:
  """(steps per epoch, total steps): num_train_steps > 0 overrides num_epochs."""
  input_pipeline.check_batch_fits(num_train_examples, config.global_batch_size,
                                  "global_batch_size")
  steps_per_epoch = input_pipeline.steps_per_epoch(num_train_examples, config.global_batch_size)
  if config.num_train_steps > 0:
    return steps_per_epoch, config.num_train_steps
  errors.check_positive(config.num_epochs, "num_epochs")
  return steps_per_epoch, int(config.num_epochs * steps_per_epoch)


def pretrain(config, workdir: str) -> dict:
  """Pretrains (or resumes) in `workdir`; returns the last logged metrics.

  Raises Preempted after saving, when SIGTERM stopped the run before its last step, and
  divergence.Diverged (nothing saved) when its numbers stopped being finite.
  """
  preemption.listen()  # a SIGTERM during the setup stops the run at its first step
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
  monitor = monitor_lib.create(config, mesh, setup.online_net, probe, info)
  replicated = parallel.replicated(mesh)
  mgr = checkpointing.manager(workdir, keep=config.keep_checkpoints,
                              save_every=config.checkpoint_every_steps)
  try:
    if mgr.latest_step() is not None:
      cures = divergence.CURE_FIELDS if guard.resumed_with_cure else ()
      checkpointing.check_same_run(workdir, config,
                                   resumable=checkpointing.RESUMABLE_CHANGES + cures)
    checkpointing.save_config(workdir, config)
    state = checkpointing.resume(mgr, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        setup.abstract_state()))
    guard.clear()  # resumed (or started) under the new settings
  except Exception:
    mgr.close()  # an open manager's threads would fail noisily at exit
    raise

  if state is not None:
    logging.info("Resumed from step %d of %d.", int(state.step), total_steps)
  else:
    state = setup.init_state(jax.random.key(config.seed), replicated)
    logging.info("Starting from scratch: %d steps (%d per epoch, %d devices).", total_steps,
                 steps_per_epoch, mesh.devices.size)
  start_step = int(state.step)
  if start_step >= total_steps:
    logging.info("Nothing to do: the checkpoint is at step %d of %d.", start_step, total_steps)
    mgr.close()
    return {} if monitor is None else _log_evaluation(start_step, monitor.evaluate(state))

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  batches = input_pipeline.pretrain_batches(
      config.data, global_batch_size=config.global_batch_size, seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())
  train_step = setup.jitted_step(mesh)
  hooks = [Progress(start_step, total_steps, writer)]
  profile = None
  if config.profile_steps > 0 and jax.process_index() == 0:
    profile = metric_writers.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                     first_profile=start_step + config.log_every_steps)
    hooks.append(profile)
  period = _Period(start_step)
  in_flight = parallel.InFlight()
  metrics = {}
  try:
    for step in range(start_step, total_steps):
      with period.waiting_for_data():
        batch = next(batches)
      period.skipped += batch.pop("num_skipped")
      batch.pop("index")
      if probe is None:
        batch.pop("label")
      state, metrics = train_step(state, parallel.host_to_global(mesh, batch))
      in_flight(metrics)  # not the state: the next step donates it
      done = step + 1
      for hook in hooks:
        hook(done)
      if done % config.log_every_steps == 0 or done == total_steps:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        scalars.update(period.summary(done, config.global_batch_size, steps_per_epoch))
        writer.write_scalars(done, scalars)
        guard.check_metrics(done, scalars, mgr.latest_step())
        metrics = scalars
      stop = done < total_steps and preemption.requested(mgr, done)
      if stop or done == total_steps or mgr.should_save(done):
        guard.check_state(done, state, metrics, mgr.latest_step())  # never save non-finite
        checkpointing.save(mgr, done, state, force=True)
      if stop:
        mgr.wait_until_finished()
        raise preemption.Preempted(done)
      # After the save: an evaluation that fails must not cost the steps since the last one.
      if monitor is not None and monitor.due(done, total_steps):
        evaluation = _log_evaluation(done, monitor.evaluate(state))
        period.start += evaluation["monitor_seconds"]  # not training time
        writer.write_scalars(done, evaluation)
        metrics = {**metrics, **evaluation}
  finally:
    if profile is not None:
      profile.close()  # a run stopped inside the profiled steps still ends its trace
    batches.close()
    mgr.wait_until_finished()
    mgr.close()
    writer.close()
  return metrics


def _log_evaluation(step: int, evaluation: dict) -> dict:
  logging.info("monitor at step %d: %s", step, ", ".join(
      f"{k} {v:.4f}" for k, v in evaluation.items() if k != "monitor_seconds") +
      f" ({evaluation['monitor_seconds']:.0f} s)")
  return evaluation


class Progress:
  """The progress line: completion of the run, and a rate and ETA measured on the steps
  this process ran. A resumed run's earlier steps took no time here, and the first step
  (compilation) is left out of the rate: it starts at the first completed step."""

  def __init__(self, start_step: int, total_steps: int, writer=None, every_secs: float = 30,
               clock=time.monotonic):
    self.start_step, self.total_steps, self.writer = start_step, total_steps, writer
    self.every_secs, self.clock = every_secs, clock
    self.first = self.last_report = None  # (step, time) of the first step, last line

  def __call__(self, step: int) -> str | None:
    """After `step` completes: the line (also logged), when one is due."""
    now = self.clock()
    if self.first is None:
      self.first = self.last_report = (step, now)
      return None
    if now - self.last_report[1] < self.every_secs and step != self.total_steps:
      return None
    self.last_report = (step, now)
    steps_per_sec = (step - self.first[0]) / max(now - self.first[1], 1e-9)
    eta = datetime.timedelta(seconds=round((self.total_steps - step) / steps_per_sec))
    resumed = f", resumed at step {self.start_step}" if self.start_step else ""
    line = (f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.1f}%{resumed}): "
            f"{steps_per_sec:.2f} steps/s over the {step - self.first[0]} steps since step "
            f"{self.first[0]}, ETA {eta}")
    logging.info(line)
    if self.writer is not None:
      self.writer.write_scalars(step, {"steps_per_sec": steps_per_sec})
    return line


class _Period:
  """Throughput, input stall and skipped images since the last log line."""

  def __init__(self, step: int):
    self.start, self.step, self.waited, self.skipped = time.monotonic(), step, 0.0, 0

  @contextlib.contextmanager
  def waiting_for_data(self):
    t = time.monotonic()
    yield
    self.waited += time.monotonic() - t

  def summary(self, step: int, global_batch_size: int, steps_per_epoch: int) -> dict:
    """The first period includes compilation, so its rate understates the steady state."""
    now = time.monotonic()
    elapsed = max(now - self.start, 1e-9)
    out = {"images_per_sec": (step - self.step) * global_batch_size / elapsed,
           "data_wait_fraction": self.waited / elapsed,
           "skipped_images": float(self.skipped), "epoch": step / steps_per_epoch}
    self.start, self.step, self.waited, self.skipped = now, step, 0.0, 0
    return out
