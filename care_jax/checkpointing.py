"""Checkpoints of the whole training state, with orbax, under `WORKDIR/checkpoints`.

A workdir is self-describing: `config.json` beside the checkpoints records the config that
made them, so linear evaluation, conversion and `care_jax.pretrained` can rebuild the
networks without being told the architecture. Orbax writes each step to a temporary
directory and renames it when complete, so a crash never leaves a half-written checkpoint;
one left behind by a crash or a full disk is deleted when the next run opens the manager.
"""
import contextlib
import errno
import json
import logging
import pathlib
import socket
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from care_jax import errors, run_safety
from care_jax.errors import UserError


class CheckpointError(UserError):
  """A checkpoint or workdir that cannot be used; the message says what to do."""


def checkpoint_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "checkpoints"


def check_workdir(workdir) -> None:
  """The workdir must be a directory we can write to: found now, not after the last step."""
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise UserError(f"--workdir {workdir} is a file; pass a directory (it is created if "
                    "missing).")
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise UserError(f"Cannot write to --workdir {workdir} ({e.strerror}); pass a directory "
                    "you can write to.") from None


def manager(workdir, *, keep: int = 3, save_every: int = 1, read_only: bool = False):
  """Items: 'state' (the TrainState, or an evaluation's state), 'online_probe' (the
  pretraining's online probe, kept apart so that readers of the networks need not know
  its shape) and 'progress' (an evaluation's results so far and the encoder it reads,
  JSON)."""
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=0 if read_only else save_every, read_only=read_only,
      create=not read_only, cleanup_tmp_directories=not read_only,
      preservation_policy=ocp.checkpoint_managers.LatestN(keep))
  mgr = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)
  # Orbax (0.12) deletes the leftovers of interrupted saves in a thread that close() does
  # not wait for: a run refused soon after (changed settings) exited with the thread's
  # traceback and the leftovers still there. Waiting here costs one directory listing.
  wait_for_cleanup = getattr(mgr, "_maybe_await_cleanup_tmp_directory", None)
  if wait_for_cleanup is not None:  # absent where orbax cleans up before returning
    wait_for_cleanup()
  return mgr


def newest_intact_step(workdir) -> int | None:
  """The newest step orbax completed (renamed into place) in WORKDIR/checkpoints, read from
  the directory itself: after a failed save, the manager's own list cannot be trusted."""
  try:
    steps = [int(p.name) for p in checkpoint_dir(workdir).iterdir()
             if p.name.isdigit() and p.is_dir()]
  except OSError:
    return None
  return max(steps, default=None)


def save_config(workdir, config) -> None:
  if jax.process_index() == 0:
    run_safety.write_atomic(pathlib.Path(workdir) / "config.json", config.to_json(indent=2))


@contextlib.contextmanager
def writing(where):
  """Raises a refused write inside the block as WriteFailed naming `where`: orbax's errors
  surface in save(), in wait_until_finished() or at close, far from the file they hit."""
  try:
    yield
  except errors.WriteFailed:
    raise
  except Exception as e:  # orbax and TensorStore raise many types
    errors.raise_if_write_failed(e, where)
    raise


def finish(mgr: ocp.CheckpointManager) -> None:
  """Waits for the saves in flight, then closes the manager (its threads would fail noisily
  at exit otherwise)."""
  try:
    with writing(_step_dir(mgr, mgr.latest_step())):
      mgr.wait_until_finished()
  finally:
    mgr.close()


def _step_dir(mgr, step) -> pathlib.Path:
  return pathlib.Path(mgr.directory) / ("" if step is None else str(step))


# Fields that do not change what a run computes, so a resumed run may set them differently.
RESUMABLE_CHANGES = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                     "profile_steps", "distributed", "data.data_dir", "data.folder_root",
                     "data.num_workers", "monitor.every_steps", "monitor.knn",
                     "monitor.knn_k", "monitor.knn_temperature", "monitor.knn_bank_size",
                     "linear_eval", "finetune")


def check_same_run(workdir, config, compared=None, resumable=RESUMABLE_CHANGES) -> None:
  """Refuses to resume a run under a config that would compute something else.

  A checkpoint holds the state, not the settings that produced it: resuming with another
  learning rate, batch size or schedule length would silently splice two different runs.
  Fields under `compared` (default: all) count, except those under `resumable`.
  """
  saved = _flatten(load_config(workdir).to_dict())
  current = _flatten(json.loads(config.to_json()))
  under = lambda key, prefixes: any(key == f or key.startswith(f + ".") for f in prefixes)
  changed = sorted(k for k in saved.keys() | current.keys()
                   if saved.get(k) != current.get(k) and not under(k, resumable)
                   and (compared is None or under(k, compared)))
  if changed:
    details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
    raise CheckpointError(
        f"{workdir} holds a run with other settings ({details}). Rerun with the same "
        f"settings to resume it, or pass a new --workdir to start another run.")


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def load_config(workdir) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise CheckpointError(
        f"{workdir} is not a care_jax workdir: {path} is missing. Pass the --workdir of a "
        "pretraining run (or of `python -m care_jax.convert from-release`).")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"Cannot read {path}: {e}. Restore it from the run's logs or "
                          "rerun the pretraining.") from None


def restore_items(mgr: ocp.CheckpointManager, step: int, **items):
  """mgr.restore of the named items (orbax restore args), errors as CheckpointError."""
  _drop_abandoned_read_reports()
  try:
    return mgr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax raises many types for unreadable or mismatched files
    raise CheckpointError(
        f"Cannot restore checkpoint {step} from {mgr.directory}: {_reason(e)}. If it was "
        "written by another config or an interrupted copy, move it away and resume from an "
        "earlier one.") from None


def _drop_abandoned_read_reports() -> None:
  """Called before a restore. When one fails, the reads orbax still had in flight end
  later (some before the error reaches us), each reporting its error: as an unraisable
  exception, RuntimeError('Event loop is closed') when it completes on the event loop orbax
  has closed, or orbax's 'Encountered error while reading array index' caused by
  GeneratorExit when the garbage collector closes it; or through asyncio's logger, '...
  exception was never retrieved' with TensorStore's error. Dozens of tracebacks, even at
  exit, that say nothing about the run: from now on this process drops those reports;
  every other one still goes where it went. Installed once."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_abandoned_reads", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    collected = (isinstance(error.__cause__, GeneratorExit)
                 and str(error).startswith("Encountered error while reading array index"))
    if not (closed_loop or collected):
      previous(unraisable)

  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(
      lambda record: not ("exception was never retrieved" in record.getMessage()
                          and "tensorstore" in record.getMessage().lower()))


def _reason(error: Exception) -> str:
  """The gist of an orbax or TensorStore error: its first line, without the JSON specs."""
  text = str(error).splitlines()[0] if str(error) else ""
  for noise in (" [tensorstore_spec", " See full TensorStore details"):
    text = text.split(noise)[0]
  return f"{type(error).__name__}: {text[:300].rstrip('.')}"


def abstract_on_devices(abstract_tree):
  """Shapes and dtypes with a sharding: their own, else this process's first device (a
  checkpoint written on 8 GPUs must load on a laptop)."""
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None) or local),
      abstract_tree)


def _state_items(abstract_state) -> dict:
  """Orbax restore args of a TrainState; without a probe, the probe is not read."""
  target = abstract_on_devices(abstract_state)
  items = {"state": ocp.args.StandardRestore(target.replace(probe=None))}
  if target.probe is not None:
    items["online_probe"] = ocp.args.StandardRestore(target.probe)
  return items


def _state_of(restored):
  return restored.state.replace(probe=restored.get("online_probe"))


def restore(mgr: ocp.CheckpointManager, abstract_state, step=None):
  """Restores the TrainState of `step` (default: the latest) into the structure and
  shardings given. An abstract state without a probe restores without reading it."""
  if step is None:
    step = next(iter(agreed_steps(mgr)), None)
  if step is None:
    raise CheckpointError(f"No checkpoint in {mgr.directory}.")
  return _state_of(restore_items(mgr, step, **_state_items(abstract_state)))


def resume(mgr: ocp.CheckpointManager, abstract_state):
  """The TrainState of the newest checkpoint that restores, or None if there is none.

  A checkpoint damaged after orbax completed it (a truncated array file, a lost manifest)
  must not end a run whose older checkpoints are intact: newer ones whose files are
  damaged (_damaged) are renamed to `STEP.damaged-TIME` (outside orbax's step names;
  nothing is deleted) and the run resumes from the newest that restores. Any other failure
  (another config or version, an I/O fault) moves nothing and ends the run; so does damage
  in every checkpoint, whose cause is then more likely the code than the files. All
  processes decide alike, on every process's outcome: one that moved on alone to an older
  step would wait for the others forever.
  """
  damaged = []
  _drop_abandoned_read_reports()
  for step in agreed_steps(mgr):
    try:
      state = _state_of(mgr.restore(step, args=ocp.args.Composite(
          **_state_items(abstract_state))))
      outcome, reason = _RESTORED, "another process could not restore it"
    except Exception as e:  # orbax raises many types for unreadable or mismatched files
      # Not kept past this block: its traceback holds orbax's unfinished reads.
      outcome, reason = _outcome(e), _reason(e)
    worst = int(np.max(multihost_utils.process_allgather(np.int32(outcome))))
    if worst == _TRANSIENT:
      raise errors.TransientError(
          f"Cannot read checkpoint {step} from {mgr.directory} now ({reason}): a fault of "
          "the file system that may pass, so nothing was moved. Rerun the same command.")
    if worst == _FAILED:
      raise CheckpointError(
          f"Cannot restore checkpoint {step} from {mgr.directory} ({reason}); its files do "
          "not look damaged, so nothing was moved. If the config or care_jax changed since "
          "it was written, rerun with the settings and version that wrote it, or pass a new "
          "--workdir.")
    if worst == _DAMAGED:
      damaged.append((step, reason))
      continue
    for bad, why in damaged:
      moved = _move_aside(mgr, bad)
      logging.warning("Checkpoint %d cannot be restored (%s); moved it to %s.", bad, why, moved)
    if damaged:
      mgr.reload()
      logging.warning("Resuming from checkpoint %d, the newest that restores.", step)
    return state
  if damaged:
    step, reason = damaged[0]
    raise CheckpointError(
        f"No checkpoint in {mgr.directory} restores (the latest, {step}: {reason}). If the "
        "config or care_jax changed since they were written, rerun with the settings and "
        "version that wrote them, or pass a new --workdir.")
  return None


_MAX_STEPS = 1024  # steps a workdir may list for agreed_steps (orbax keeps 3 by default)
_HOST_BYTES = 64


def agreed_steps(mgr: ocp.CheckpointManager) -> list[int]:
  """The checkpoint steps to try, newest first, the same on every process. A process
  that sees other steps than process 0 (a shared file system's lag after a requeue, on
  either side) stops every process with one error naming its host: orbax's own view of
  the steps decides when it saves next, so every process must have the same one."""
  steps = sorted(mgr.all_steps(), reverse=True)[:_MAX_STEPS]
  if jax.process_count() == 1:
    return steps
  padded = np.full(_MAX_STEPS + _HOST_BYTES, -1, np.int64)
  padded[:len(steps)] = steps
  name = socket.gethostname().encode()[:_HOST_BYTES]
  padded[_MAX_STEPS:_MAX_STEPS + len(name)] = np.frombuffer(name, np.uint8)
  every = np.asarray(multihost_utils.process_allgather(padded))
  listed = lambda row: [int(s) for s in row[:_MAX_STEPS] if s >= 0]
  host = lambda row: bytes(row[_MAX_STEPS:][row[_MAX_STEPS:] >= 0].astype(np.uint8)).decode(
      errors="replace")
  others = [(i, listed(row), host(row)) for i, row in enumerate(every)
            if listed(row) != listed(every[0])]
  if others:
    who = "; ".join(f"process {i} on host {h} sees steps {s}" for i, s, h in others)
    raise errors.TransientError(
        f"The processes do not see the same checkpoints in {mgr.directory}: process 0 sees "
        f"steps {listed(every[0])}, but {who}. Rerun when every node sees the same files (a "
        "shared file system can lag behind after a restart), and check that the workdir is "
        "on a file system that every node shares.")
  return steps


# Ordered: the worst outcome of any process decides.
_RESTORED, _DAMAGED, _TRANSIENT, _FAILED = 0, 1, 2, 3
# TensorStore's status codes for files that are missing, short or undecodable.
_DAMAGE_CODES = ("NOT_FOUND:", "OUT_OF_RANGE:", "DATA_LOSS:", "FAILED_PRECONDITION:")
# Faults of the storage that may pass: TensorStore's codes and the OS's.
_TRANSIENT_CODES = ("UNAVAILABLE:", "DEADLINE_EXCEEDED:")
_TRANSIENT_ERRNOS = (errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.EINTR)


def _outcome(error: BaseException) -> int:
  if _damaged(error):
    return _DAMAGED
  return _TRANSIENT if _transient(error) else _FAILED


def _transient(error: BaseException) -> bool:
  """An I/O fault that may pass (EIO, a timeout, a stale NFS handle; TensorStore's
  UNAVAILABLE or DEADLINE_EXCEEDED), not a permission, a missing file or a tree that does
  not match: those stay errors a rerun would repeat."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (getattr(error, "errno", None) in _TRANSIENT_ERRNOS
        or str(error).startswith(_TRANSIENT_CODES)):
      return True
    error = error.__cause__ or error.__context__
  return False


def _damaged(error: BaseException) -> bool:
  """Whether a restore failed on the checkpoint's files themselves: an array or manifest
  missing (NOT_FOUND), truncated (OUT_OF_RANGE), undecodable (DATA_LOSS, or
  FAILED_PRECONDITION from the decompressor), an item's directory gone, or a metadata
  file cut short. A tree that does not match (another config) and I/O faults that may pass
  (UNAVAILABLE, DEADLINE_EXCEEDED, an OSError other than a missing file) are not damage.
  Orbax wraps TensorStore's error, so the whole chain is read."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = str(error)
    if (isinstance(error, (FileNotFoundError, json.JSONDecodeError))
        or text.startswith(_DAMAGE_CODES)
        or (isinstance(error, KeyError) and "was not found in the checkpoint" in text)):
      return True
    error = error.__cause__ or error.__context__
  return False


def _move_aside(mgr: ocp.CheckpointManager, step: int) -> pathlib.Path:
  """Renames a step's directory out of orbax's sight (process 0; the others wait)."""
  source = pathlib.Path(mgr.directory) / str(step)
  target = source.with_name(f"{step}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
  if jax.process_index() == 0:
    source.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"care_jax: moved checkpoint {step} aside")
  return target


def save_items(mgr: ocp.CheckpointManager, step: int, **items) -> None:
  """Starts saving the named items (orbax save args) as `step`, forced (the caller decides
  when); a refused write raises WriteFailed naming the step's directory."""
  with writing(_step_dir(mgr, step)):
    mgr.save(step, args=ocp.args.Composite(**items), force=True)


def save(mgr: ocp.CheckpointManager, step: int, state) -> None:
  """Saves a pretraining TrainState; its online probe as an item of its own."""
  items = {"state": ocp.args.StandardSave(state.replace(probe=None))}
  if state.probe is not None:
    items["online_probe"] = ocp.args.StandardSave(state.probe)
  save_items(mgr, step, **items)


def restore_from_workdir(workdir, abstract_state, step=None):
  """Read-only restore used by evaluation and export."""
  with manager(workdir, read_only=True) as mgr:
    return restore(mgr, abstract_state, step)
