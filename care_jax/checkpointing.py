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
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=0 if read_only else save_every, read_only=read_only,
      create=not read_only,
      preservation_policy=ocp.checkpoint_managers.LatestN(keep))
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state",))


def save_config(workdir, config) -> None:
  if jax.process_index() == 0:
    path = pathlib.Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json(indent=2))
    tmp.replace(path)


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


def restore(mgr: ocp.CheckpointManager, abstract_state, step=None):
  """Restores `step` (default: the latest) into the structure and shardings given."""
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"No checkpoint in {mgr.directory}.")
  # Without a sharding, restore onto this process's first device: a checkpoint written on
  # 8 GPUs must load on a laptop.
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None) or local),
      abstract_state)
  try:
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  except Exception as e:  # orbax raises many types for unreadable or mismatched files
    raise CheckpointError(
        f"Cannot restore checkpoint {step} from {mgr.directory}: {type(e).__name__}: "
        f"{str(e).splitlines()[0].rstrip('.') if str(e) else ''}. If it was written by another config "
        "or an interrupted copy, move it away and resume from an earlier one.") from None
  return restored.state


def save(mgr: ocp.CheckpointManager, step: int, state, *, force: bool = False) -> bool:
  return mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                  force=force)


def restore_from_workdir(workdir, abstract_state, step=None):
  """Read-only restore used by evaluation and export."""
  with manager(workdir, read_only=True) as mgr:
    return restore(mgr, abstract_state, step)
