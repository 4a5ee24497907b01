"""Preemption: a scheduler's SIGTERM asks the program to stop where nothing is lost.

Every command installs the handler first (`listen`), before it imports JAX, so a SIGTERM
at any moment, during imports, dataset preparation, compilation or a restore included, is
a request, never the default death by signal 15. Long stages ask `requested(...)` at
points where stopping loses nothing (after a step, between batches of a pass over a split);
a stage with state saves it first, then raises Preempted.

A preempted run ends with exit status EXIT_STATUS (75, EX_TEMPFAIL in sysexits.h: "try
again later"), never 0, so that a scheduler can tell an unfinished run from a finished one
and requeue it: rerunning the same command resumes from what was saved on the way out.
Process 0 also leaves MARKER in the workdir, for launchers that cannot rely on the exit
status (under `srun --kill-on-bad-exit`, the other processes may be killed first and srun
reports their signal: experiments/slurm.sbatch).

Imports no JAX at module level: main.py installs the handler before JAX loads. In a
distributed run jax.distributed's own notifier takes the signal over, and every process
stops at the same step (requested).
"""
import pathlib
import signal
import sys
import threading

EXIT_STATUS = 75
MARKER = "PREEMPTED"

# Set by SIGTERM once listen() has run; cleared when a stop acts on it (or by withdraw()).
_requested = threading.Event()
_shared_early_request = False  # in a distributed run: whether the flag above was shared yet


class Preempted(Exception):
  """The run stopped early on request, after saving `step` (None: the stage it stopped in
  keeps no state, and a rerun starts that stage again)."""

  def __init__(self, step: int | None = None):
    saved = ("nothing of this stage needed saving" if step is None
             else f"saved the checkpoint of step {step}")
    super().__init__(f"Preempted: {saved}; rerun the same command to resume.")
    self.step = step


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  _requested.set()


def listen() -> None:
  """From now on SIGTERM requests a stop (a no-op when it already does, or off the main
  thread). A request made before a stage starts stops it at its first check.

  With several processes, jax.distributed's own SIGTERM notifier, installed by
  jax.distributed.initialize() after this, takes the signal over below Python (so this
  handler still looks installed, and later calls leave it be); requested() then asks it,
  so that all processes stop at the same point."""
  jax = sys.modules.get("jax")  # not imported here: the program may not have loaded it yet
  if jax is not None and jax.distributed.is_initialized():
    return  # its notifier has the signal
  if (threading.current_thread() is threading.main_thread()
      and signal.getsignal(signal.SIGTERM) is not _on_sigterm):
    signal.signal(signal.SIGTERM, _on_sigterm)


def request() -> None:
  """A stop requested from within the program (the demo's time limit), as SIGTERM would."""
  _requested.set()


def withdraw() -> None:
  """Forgets a request no stage has acted on (one that came after the last step)."""
  _requested.clear()


def requested(mgr=None, step: int | None = None) -> bool:
  """Whether a stop was requested; True once per request.

  In a distributed run (jax.distributed, which owns the signal there) the answer is the
  same on every process: it is asked at each step, with the step and the orbax manager
  whose sync point it shares (`mgr.reached_preemption`, as orbax's own saves ask it), and
  elsewhere (mgr None: between batches of a pass) it is False, so such runs stop at their
  next step. A SIGTERM that came before jax.distributed started is shared at the first
  call."""
  import jax  # noqa: PLC0415  (the module imports no JAX: main.py loads it first)
  if jax.distributed.is_initialized():
    if mgr is None:
      return False
    global _shared_early_request
    if not _shared_early_request:
      import numpy as np  # noqa: PLC0415
      from jax.experimental import multihost_utils  # noqa: PLC0415
      _shared_early_request = True
      flags = multihost_utils.process_allgather(np.int32(_requested.is_set()))
      if np.asarray(flags).any():
        _requested.clear()
        return True
    return mgr.reached_preemption(step)
  if not _requested.is_set():
    return False
  _requested.clear()
  return True


def check() -> None:
  """Raises Preempted (nothing to save) if a stop was requested: for stages whose work is
  recomputed on a rerun, such as a pass over a split (single-process runs; see requested)."""
  if requested():
    raise Preempted()


def write_marker(workdir, reason: str) -> None:
  """WORKDIR/MARKER (process 0), after whatever the stage keeps is saved."""
  import jax  # noqa: PLC0415
  if jax.process_index() == 0:
    path = pathlib.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(reason + "\n")
