"""Preemption: a scheduler's SIGTERM asks a training loop to checkpoint and stop."""
import signal
import threading

import jax


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
