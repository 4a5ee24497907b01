"""The one training loop of pretraining, linear evaluation and fine-tuning, and its hooks.

A mode brings a step function, its state, its batches and a list of hooks; `run` takes
the steps and calls each hook after each, in order. Steps are counted on the host: the
loop never reads the state's step counter back from the device. The hooks are what a run
does between steps: the progress line, metrics, the checkpoint and stop requests, the
evaluations, the profile (metric_writers.Profile). The order the modes use: Progress,
Profile, Metrics, Checkpoints, Evaluations (an evaluation runs after the save, so one that
fails costs no steps).
"""
import contextlib
import datetime
import logging
import pathlib
import time
from typing import Callable, Iterator, Sequence

import jax

from care_jax import checkpointing, parallel, run_safety


def run(state, step_fn: Callable, batches: Iterator, *, start: int, stop: int,
        stride: int = 1, hooks: Sequence = ()):
  """Runs step_fn(state, batch) -> (state, metrics) from step `start` to `stop`; each call
  advances `stride` steps (an epoch scanned in one dispatch has stride steps_per_epoch).
  hook(step, state, metrics) runs after each call. Returns the last state."""
  in_flight = parallel.InFlight()
  for done in range(start + stride, stop + 1, stride):
    state, metrics = step_fn(state, next(batches))
    in_flight(metrics)  # not the state: the next step donates it
    for hook in hooks:
      hook(done, state, metrics)
  return state


class Progress:
  """The progress line: completion of the run, and a rate and ETA measured on the steps
  this process ran. A resumed run's earlier steps took no time here, and the first step
  (compilation) is left out of the rate: it starts at the first completed step."""

  def __init__(self, start_step: int, total_steps: int, writer=None, every_secs: float = 30,
               clock=time.monotonic):
    self.start_step, self.total_steps, self.writer = start_step, total_steps, writer
    self.every_secs, self.clock = every_secs, clock
    self.first = self.last_report = None  # (step, time) of the first step, last line

  def __call__(self, step: int, state=None, metrics=None) -> str | None:
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


class Metrics:
  """Every `every` steps and at the last: fetches the step's metrics (the loop's only
  device sync), adds `extra(step)` and the throughput since the last time, writes them,
  and lets `check(step, scalars)` (the divergence guard) judge them. `last` holds them."""

  def __init__(self, writer, *, every: int, total_steps: int, start_step: int,
               global_batch_size: int, steps_per_epoch: int, check=None, extra=None):
    self._writer, self._every, self._total = writer, every, total_steps
    self._batch, self._steps_per_epoch = global_batch_size, steps_per_epoch
    self._check, self._extra = check, extra
    self._start, self._step, self.waited, self.skipped = time.monotonic(), start_step, 0.0, 0
    self.last = {}

  @contextlib.contextmanager
  def waiting_for_data(self):
    t = time.monotonic()
    yield
    self.waited += time.monotonic() - t

  def exclude(self, seconds: float) -> None:
    """Time spent off training (an evaluation) is not in the throughput."""
    self._start += seconds

  def __call__(self, step: int, state, metrics) -> None:
    if step % self._every and step != self._total:
      return
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if self._extra is not None:
      scalars.update(self._extra(step))
    scalars.update(self._period(step))
    self._writer.write_scalars(step, scalars)
    if self._check is not None:
      self._check(step, scalars)
    self.last = scalars

  def _period(self, step: int) -> dict:
    """The first period includes compilation, so its rate understates the steady state."""
    now = time.monotonic()
    elapsed = max(now - self._start, 1e-9)
    out = {"images_per_sec": (step - self._step) * self._batch / elapsed,
           "data_wait_fraction": self.waited / elapsed,
           "skipped_images": float(self.skipped), "epoch": step / self._steps_per_epoch}
    self._start, self._step, self.waited, self.skipped = now, step, 0.0, 0
    return out


class Checkpoints:
  """Saves when due (`due(step)`), at the last step, and on a stop request; then a
  requested stop raises run_safety.Stopped. `check_state(step, state, metrics)` (the divergence
  guard) runs before every save: nothing non-finite is written."""

  def __init__(self, mgr, save: Callable, safety: run_safety.RunSafety, *, total_steps: int,
               due: Callable, check_state=None):
    self.mgr, self._save, self._safety = mgr, save, safety
    self._total, self._due, self._check_state = total_steps, due, check_state
    self._metrics = None

  def __call__(self, step: int, state, metrics) -> None:
    self._metrics = metrics
    source = self._safety.stop_source(step, self.mgr) if step < self._total else None
    if source is not None or step == self._total or self._due(step):
      self.save(step, state)
    if source is not None:
      self.stop(step, state, source)

  def save(self, step: int, state) -> None:
    if self.mgr.latest_step() == step:
      return
    if self._check_state is not None:
      self._check_state(step, state, self._metrics)
    self._save(self.mgr, step, state)

  def stop(self, step: int, state, source: str):
    """Saves `state` (if not yet), waits for the save and raises Stopped."""
    self.save(step, state)
    with checkpointing.writing(pathlib.Path(self.mgr.directory) / str(step)):
      self.mgr.wait_until_finished()
    raise run_safety.Stopped(step, source)


class Evaluations:
  """Runs the evaluators (`evaluate(state) -> metrics`) when `due(step)`, after the save,
  and writes what they return; `on_result(step, metrics)` keeps it (an evaluation's
  history). A stop requested during an evaluation saves the state and stops the run."""

  def __init__(self, evaluators: Sequence, writer, checkpoints: Checkpoints, *,
               due: Callable, on_result=None, metrics: Metrics | None = None):
    self._evaluators, self._writer, self._checkpoints = evaluators, writer, checkpoints
    self._due, self._on_result, self._metrics = due, on_result, metrics
    self.last = {}

  def __call__(self, step: int, state, metrics) -> None:
    if self._due(step):
      self.evaluate(step, state)

  def evaluate(self, step: int, state) -> dict:
    start = time.monotonic()
    out = {}
    try:
      for evaluator in self._evaluators:
        out.update(evaluator.evaluate(state))
    except run_safety.Stopped as stopped:
      self._checkpoints.stop(step, state, stopped.source)
    seconds = time.monotonic() - start
    if self._metrics is not None:
      self._metrics.exclude(seconds)
    logging.info("evaluation at step %d: %s (%.0f s)", step, describe(out), seconds)
    self._writer.write_scalars(step, out)
    if self._on_result is not None:
      self._on_result(step, out)
    self.last = out
    return out


def describe(evaluation: dict) -> str:
  return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in evaluation.items())
