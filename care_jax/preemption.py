"""Preemption: a scheduler's SIGTERM asks a training loop to checkpoint and stop.

A preempted run ends with exit status EXIT_STATUS (75, EX_TEMPFAIL in sysexits.h: "try
again later"), never 0, so that a scheduler can tell an unfinished run from a finished one
and requeue it: rerunning the same command resumes from the checkpoint saved on the way out.
"""
import signal
import threading

import jax

EXIT_STATUS = 75


class Preempted(Exception):
  """Raised once the checkpoint of `step` is saved: the run stopped early, on request."""

  def __init__(self, step: int):
    super().__init__(f"Preempted: saved the checkpoint of step {step}; rerun the same command "
                     "to resume.")
    self.step = step


class Preemption:
  """SIGTERM (a scheduler's preemption notice) asks the loop to checkpoint and stop.

  With several processes, jax.distributed's own SIGTERM notifier (which orbax's
  reached_preemption asks, so that all processes stop at the same step) must keep the
  signal: a Python handler would replace it.
  """

  def __init__(self):
    self.requested = threading.Event()
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, lambda *_: self.requested.set())

  def reached(self, mgr, step: int) -> bool:
    if jax.process_count() > 1:  # all processes must agree on the step to save at
      return mgr.reached_preemption(step)
    return self.requested.is_set()
