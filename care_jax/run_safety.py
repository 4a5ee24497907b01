"""Run safety: what may stop a run early, and how every way a run ends becomes one line and
an exit status a scheduler understands.

Each entry point runs its body under `run`. Those with stages to stop where nothing is
lost make one RunSafety and listen: main and demo before they load JAX, visualize as it
starts; convert and bench keep no state (their files are written atomically), so SIGTERM
ends them. The object owns the stop sources: the scheduler's
SIGTERM, a time limit (the demo's), and in a distributed run jax.distributed's preemption
notice; it says which one fired. Long stages ask `stop_source` where stopping loses
nothing, save what they hold, and raise Stopped.

Exit statuses, by class (sysexits.h where one fits):
  0  the run is complete
  2  a setting or file to fix (errors.UserError)
  65 training diverged (training.divergence.Diverged)
  74 a write failed: disk full, quota, read-only file system (errors.WriteFailed)
  75 stopped on request, or a fault that may pass (errors.TransientError): rerun the same
     command and it resumes from what was saved.

Imports no JAX at module level: the handler must be installed before JAX loads.
"""
import contextlib
import logging
import pathlib
import signal
import sys
import threading
import time
import warnings

from care_jax import errors

EXIT_USER, EXIT_DIVERGED, EXIT_WRITE_FAILED, EXIT_RERUN = 2, 65, 74, 75
MARKER = "PREEMPTED"  # for launchers that lose the exit status (experiments/slurm.sbatch)
SIGTERM, TIME_LIMIT, PREEMPTION_NOTICE, REQUEST = ("SIGTERM", "the time limit",
                                                  "jax.distributed's preemption notice",
                                                  "a request")


class Stopped(Exception):
  """The run stopped early on request, after saving `step` (None: the stage it stopped in
  keeps no state, and a rerun starts that stage again); `source` says who asked."""

  def __init__(self, step: int | None = None, source: str = SIGTERM):
    saved = ("nothing of this stage needed saving" if step is None
             else f"saved the checkpoint of step {step}")
    super().__init__(f"Stopped by {source}: {saved}; rerun the same command to resume.")
    self.step, self.source = step, source


class RunSafety:
  """The stop sources of one program. The SIGTERM handler only assigns a plain attribute:
  a handler that took a lock (threading.Event does) would deadlock when the signal lands
  while the main thread holds that lock. The time limit is a deadline read when a stage
  asks, not a timer thread, so it can fire nowhere but inside its own `with` block."""

  def __init__(self):
    self._fired = None  # the source of a request no stage has acted on yet
    self._deadline = None
    self._shared_early_request = False

  def listen(self) -> "RunSafety":
    """From now on SIGTERM requests a stop (main thread only). With jax.distributed up,
    its own notifier owns the signal, and stop_source asks it instead."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
      return self
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._fired = SIGTERM

  def request(self, source: str = REQUEST) -> None:
    """A stop asked from within the program, as SIGTERM asks it."""
    self._fired = source

  @contextlib.contextmanager
  def time_limit(self, seconds: float):
    """Inside the block, a stop is requested once `seconds` (> 0) have passed. A limit
    that ran out but was not acted on ends with the block: later stages never see it."""
    self._deadline = time.monotonic() + seconds if seconds > 0 else None
    try:
      yield
    finally:
      self._deadline = None
      if self._fired == TIME_LIMIT:
        self._fired = None

  def stop_source(self, step: int | None = None, mgr=None) -> str | None:
    """Who asked the run to stop (once per request), else None.

    In a distributed run every process must give the same answer: at a step, the orbax
    manager's sync point (`mgr.reached_preemption`, as orbax's saves ask it) decides, and
    between the batches of a pass (mgr None) nothing stops. A request that came before
    jax.distributed started is shared at the first step."""
    if self._deadline is not None and time.monotonic() > self._deadline:
      self._deadline = None  # once
      self._fired = self._fired or TIME_LIMIT
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
      return self._distributed_source(step, mgr)
    fired, self._fired = self._fired, None
    return fired

  def _distributed_source(self, step, mgr) -> str | None:
    if mgr is None:
      return None
    if not self._shared_early_request:
      import numpy as np  # noqa: PLC0415  (JAX is loaded by now)
      from jax.experimental import multihost_utils  # noqa: PLC0415
      self._shared_early_request = True
      flags = multihost_utils.process_allgather(np.int32(self._fired is not None))
      if np.asarray(flags).any():
        fired, self._fired = self._fired or SIGTERM, None
        return fired
    return PREEMPTION_NOTICE if mgr.reached_preemption(step) else None

  def check(self) -> None:
    """Raises Stopped (nothing to save) when a stop was requested: for passes whose work a
    rerun recomputes (single-process runs: stop_source)."""
    source = self.stop_source()
    if source is not None:
      raise Stopped(None, source)


def exit_status(error: BaseException) -> int | None:
  """The exit status of an error class a user can act on; None for a bug (traceback). A
  refused write that no caller named (a library's own files: tfds, the profiler) is still
  one: 74."""
  divergence = sys.modules.get("care_jax.training.divergence")  # loaded if it can diverge
  if isinstance(error, (Stopped, errors.TransientError)):
    return EXIT_RERUN
  if isinstance(error, errors.WriteFailed):
    return EXIT_WRITE_FAILED
  if divergence is not None and isinstance(error, divergence.Diverged):
    return EXIT_DIVERGED
  if isinstance(error, errors.UserError):
    return EXIT_USER
  return EXIT_WRITE_FAILED if errors.write_failure_reason(error) else None


def run(body, workdir=None) -> None:
  """Runs body() and ends each way a run stops short with one line on stderr and its exit
  status; a Stopped run also leaves WORKDIR/PREEMPTED (process 0)."""
  try:
    body()
  except Exception as error:
    status = exit_status(error)
    if status is None:
      raise
    if status == EXIT_WRITE_FAILED:
      # orbax's queued writes are abandoned: their coroutines would each warn at exit.
      warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                              category=RuntimeWarning)
    if status == EXIT_RERUN:  # the marker too: srun may report another process's signal
      _leave_marker(workdir, str(error))
    if isinstance(error, Stopped):
      logging.warning("%s (exit status %d)", error, status)
    else:
      print(f"error: {_message(error, workdir)}", file=sys.stderr)
    sys.exit(status)


def _message(error: Exception, workdir) -> str:
  """The one line: for a failed write, also what survived it and what to do."""
  if not isinstance(error, errors.WriteFailed):
    reason = errors.write_failure_reason(error)
    if reason is None or exit_status(error) != EXIT_WRITE_FAILED:
      return str(error)
    error = errors.WriteFailed("a file", reason)
  if workdir is None:
    return (f"{error}. Free some space (or make the file system writable again) and rerun "
            "the same command.")
  return (f"cannot write to {workdir}: {error}. {_newest_checkpoints(workdir)} Free some "
          "space (or make the file system writable again) and rerun the same command: it "
          "resumes from there.")


def _newest_checkpoints(workdir) -> str:
  """Where a rerun resumes from: the newest complete checkpoint of each run in `workdir`
  (the demo's stages are runs of their own, one level down)."""
  from care_jax import checkpointing  # noqa: PLC0415  (loads JAX and orbax)
  root = pathlib.Path(workdir)
  runs = [root] + sorted(p for p in root.glob("*") if (p / "checkpoints").is_dir())
  found = [(r, checkpointing.newest_intact_step(r)) for r in runs]
  found = [checkpointing.checkpoint_dir(r) / str(step) for r, step in found if step is not None]
  if not found:
    return "No checkpoint was complete yet."
  return ("Nothing saved before was touched; the newest intact checkpoint: "
          + ", ".join(map(str, found)) + ".")


def _leave_marker(workdir, text: str) -> None:
  jax = sys.modules.get("jax")
  if workdir is None:
    return
  if jax is not None and jax.process_index() != 0:
    return
  try:
    write_atomic(pathlib.Path(workdir) / MARKER, text + "\n")
  except (errors.WriteFailed, OSError):
    pass  # a full disk, a missing or read-only workdir: the exit status still says it


def write_atomic(path, content) -> None:
  """Writes `content` (text, bytes, or a function that writes the file whose path it is
  given) to `path` through a temporary file and a rename: a reader (or a rerun after a
  crash) sees the old file or the new one, never half of one. A write the machine refuses
  (full disk, quota, read-only) is raised as WriteFailed naming `path`."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
      tmp.write_text(content)
    elif isinstance(content, bytes):
      tmp.write_bytes(content)
    else:
      content(tmp)
    tmp.replace(path)
  except OSError as e:
    errors.raise_if_write_failed(e, path)
    raise
  finally:
    tmp.unlink(missing_ok=True)
