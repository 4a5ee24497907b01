"""Checkpoints of the whole training state, with orbax, under `WORKDIR/checkpoints`.

A workdir is self-describing: `config.json` beside the checkpoints records the config that
made them, so linear evaluation, conversion and `care_jax.pretrained` can rebuild the
networks without being told the architecture. Orbax writes each step to a temporary
directory and renames it when complete, so a crash never leaves a half-written checkpoint.
"""
import json
import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp

from care_jax.errors import UserError


class CheckpointError(UserError):
  """A checkpoint or workdir that cannot be used; the message says what to do."""


def checkpoint_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "checkpoints"


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
    raise CheckpointError(
        f"Cannot restore checkpoint {step} from {mgr.directory}: {type(e).__name__}: "
        f"{str(e).splitlines()[0].rstrip('.') if str(e) else ''}. If it was written by another config "
        "or an interrupted copy, move it away and resume from an earlier one.") from None


def abstract_on_devices(abstract_tree):
  """Shapes and dtypes with a sharding: their own, else this process's first device (a
  checkpoint written on 8 GPUs must load on a laptop)."""
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None) or local),
      abstract_tree)


def restore(mgr: ocp.CheckpointManager, abstract_state, step=None):
  """Restores the TrainState of `step` (default: the latest) into the structure and
  shardings given. An abstract state without a probe restores without reading it."""
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"No checkpoint in {mgr.directory}.")
  target = abstract_on_devices(abstract_state)
  items = {"state": ocp.args.StandardRestore(target.replace(probe=None))}
  if target.probe is not None:
    items["online_probe"] = ocp.args.StandardRestore(target.probe)
  restored = restore_items(mgr, step, **items)
  return restored.state.replace(probe=restored.get("online_probe"))


def save(mgr: ocp.CheckpointManager, step: int, state, *, force: bool = False) -> bool:
  items = {"state": ocp.args.StandardSave(state.replace(probe=None))}
  if state.probe is not None:
    items["online_probe"] = ocp.args.StandardSave(state.probe)
  return mgr.save(step, args=ocp.args.Composite(**items), force=force)


def restore_from_workdir(workdir, abstract_state, step=None):
  """Read-only restore used by evaluation and export."""
  with manager(workdir, read_only=True) as mgr:
    return restore(mgr, abstract_state, step)
