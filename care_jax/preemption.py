"""Preemption: a scheduler's SIGTERM asks a training loop to checkpoint and stop.

A preempted run ends with exit status EXIT_STATUS (75, EX_TEMPFAIL in sysexits.h: "try
again later"), never 0, so that a scheduler can tell an unfinished run from a finished one
and requeue it: rerunning the same command resumes from the checkpoint saved on the way out.
Process 0 also leaves MARKER in the workdir, for launchers that cannot rely on the exit
status (under `srun --kill-on-bad-exit`, the other processes may be killed first and srun
reports their signal: experiments/slurm.sbatch).
"""
import pathlib
import signal
import threading

import jax

EXIT_STATUS = 75
MARKER = "PREEMPTED"

# Set by SIGTERM once listen() has run; a loop that stops for it clears it.
_requested = threading.Event()


class Preempted(Exception):
  """Raised once the checkpoint of `step` is saved: the run stopped early, on request."""

  def __init__(self, step: int):
    super().__init__(f"Preempted: saved the checkpoint of step {step}; rerun the same command "
                     "to resume.")
    self.step = step


def listen() -> None:
  """From now on SIGTERM requests a stop (one process, main thread). A request made before
  a loop starts (during setup or a restore) stops it at its first step: nothing is lost.

  With several processes, jax.distributed's own SIGTERM notifier (which orbax's
  reached_preemption asks, so that all processes stop at the same step) must keep the
  signal: a Python handler would replace it.
  """
  if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, lambda *_: _requested.set())


def withdraw() -> None:
  """Forgets a request no loop has acted on (one that came after the last step)."""
  _requested.clear()


class Preemption:
  """SIGTERM (a scheduler's preemption notice) asks the loop to checkpoint and stop."""

  def __init__(self):
    listen()

  def reached(self, mgr, step: int) -> bool:
    if jax.process_count() > 1:  # all processes must agree on the step to save at
      return mgr.reached_preemption(step)
    if not _requested.is_set():
      return False
    _requested.clear()  # one request stops one loop
    return True


def write_marker(workdir, reason: str) -> None:
  """WORKDIR/MARKER (process 0), after the preemption checkpoint is saved."""
  if jax.process_index() == 0:
    pathlib.Path(workdir, MARKER).write_text(reason + "\n")
