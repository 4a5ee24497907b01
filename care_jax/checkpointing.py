"""Checkpoints of the whole training state, with orbax, under `WORKDIR/checkpoints`.

A workdir is self-describing: `config.json` beside the checkpoints records the config that
made them, so linear evaluation, conversion and `care_jax.pretrained` can rebuild the
networks without being told the architecture. Orbax writes each step to a temporary
directory and renames it when complete, so a crash never leaves a half-written checkpoint.
"""
import json
import logging
import pathlib
import sys
import tempfile
import time

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

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
  its shape) and 'history' (an evaluation's results so far, JSON)."""
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=0 if read_only else save_every, read_only=read_only,
      create=not read_only,
      preservation_policy=ocp.checkpoint_managers.LatestN(keep))
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save_config(workdir, config) -> None:
  if jax.process_index() == 0:
    path = pathlib.Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json(indent=2))
    tmp.replace(path)


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
  try:
    return mgr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax raises many types for unreadable or mismatched files
    _drop_event_loop_closed_reports()
    raise CheckpointError(
        f"Cannot restore checkpoint {step} from {mgr.directory}: {_reason(e)}. If it was "
        "written by another config or an interrupted copy, move it away and resume from an "
        "earlier one.") from None


def _drop_event_loop_closed_reports() -> None:
  """After a failed restore, the reads orbax still had in flight complete on the event loop
  it has closed, and each reports RuntimeError('Event loop is closed') as an unraisable
  exception: dozens of tracebacks, even at exit, that say nothing about the run. From now
  on this process drops those reports; every other one still goes to the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_event_loop_closed", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_event_loop_closed = True
  sys.unraisablehook = hook


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
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"No checkpoint in {mgr.directory}.")
  return _state_of(restore_items(mgr, step, **_state_items(abstract_state)))


def resume(mgr: ocp.CheckpointManager, abstract_state):
  """The TrainState of the newest checkpoint that restores, or None if there is none.

  A checkpoint damaged after orbax completed it (a truncated array file, a lost manifest)
  must not end a run whose older checkpoints are intact: newer ones that fail to restore
  are renamed to `STEP.damaged-TIME` (outside orbax's step names; nothing is deleted) and
  the run resumes from the newest that restores. When none restores, nothing is moved: the
  cause is then more likely the config or the code than the files.
  """
  failures = []
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      state = _state_of(mgr.restore(step, args=ocp.args.Composite(
          **_state_items(abstract_state))))
    except Exception as e:  # orbax raises many types for unreadable or mismatched files
      _drop_event_loop_closed_reports()
      failures.append((step, _reason(e)))
      continue
    for damaged, reason in failures:
      moved = _move_aside(mgr, damaged)
      logging.warning("Checkpoint %d cannot be restored (%s); moved it to %s.", damaged,
                      reason, moved)
    if failures:
      mgr.reload()
      logging.warning("Resuming from checkpoint %d, the newest that restores.", step)
    return state
  if failures:
    step, reason = failures[0]
    raise CheckpointError(
        f"No checkpoint in {mgr.directory} restores (the latest, {step}: {reason}). If the "
        "config or care_jax changed since they were written, rerun with the settings and "
        "version that wrote them, or pass a new --workdir.")
  return None


def _move_aside(mgr: ocp.CheckpointManager, step: int) -> pathlib.Path:
  """Renames a step's directory out of orbax's sight (process 0; the others wait)."""
  source = pathlib.Path(mgr.directory) / str(step)
  target = source.with_name(f"{step}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
  if jax.process_index() == 0:
    source.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"care_jax: moved checkpoint {step} aside")
  return target


def save(mgr: ocp.CheckpointManager, step: int, state, *, force: bool = False) -> bool:
  items = {"state": ocp.args.StandardSave(state.replace(probe=None))}
  if state.probe is not None:
    items["online_probe"] = ocp.args.StandardSave(state.probe)
  return mgr.save(step, args=ocp.args.Composite(**items), force=force)


def restore_from_workdir(workdir, abstract_state, step=None):
  """Read-only restore used by evaluation and export."""
  with manager(workdir, read_only=True) as mgr:
    return restore(mgr, abstract_state, step)
