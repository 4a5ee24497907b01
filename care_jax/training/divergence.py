"""The divergence guard: a run whose numbers stop being finite ends at the next check, with
its newest checkpoint (always finite) kept and one line saying what to do.

Checks, with no device sync the loop does not already make:
  - every log_every_steps, on the metrics the loop fetches for its log line: the loss
    terms and the gradient norm must be finite. Under float16 a non-finite step is the loss
    scaler's to skip (it leaves the state unchanged); there only a loss scale that fell
    below MIN_LOSS_SCALE counts (steps overflow even unscaled: the run will not recover).
  - before every checkpoint, the state to be saved: a non-finite state is never written,
    so orbax's rotation can only drop finite checkpoints for finite ones.

On divergence WORKDIR/DIVERGED records the step, the figures and the settings. A rerun
with the same settings gives the same line, before any work; one that changes CURE_FIELDS
(a lower learning rate, a longer warm-up, ...) resumes from the newest checkpoint with
them. They are the settings that leave the state's structure as it is: another optimiser,
or float16 on either side of a change of precision, would not restore.
"""
import json
import math
import pathlib

import jax
import jax.numpy as jnp

from care_jax import checkpointing, run_safety

EXIT_STATUS = run_safety.EXIT_DIVERGED  # 65, EX_DATAERR: the numbers went bad; change a setting
MARKER = "DIVERGED"
MIN_LOSS_SCALE = 1.0
# Settings a rerun may change to resume a diverged run from its newest checkpoint.
CURE_FIELDS = ("optimizer.base_lr", "optimizer.warmup_epochs", "optimizer.weight_decay",
               "optimizer.momentum")
_TERMS = ("loss", "c_loss", "t_loss", "cross_loss")


class Diverged(Exception):
  """Training diverged; the message is the one line to print."""


def _finite(value) -> bool:
  return math.isfinite(float(value))


def _figures(scalars: dict) -> str:
  terms = ", ".join(f"{k} {float(scalars[k]):.4g}" for k in _TERMS[1:] if k in scalars)
  line = f"loss {float(scalars.get('loss', math.nan)):.4g} ({terms})"
  if "grad_norm" in scalars:
    line += f", gradient norm {float(scalars['grad_norm']):.4g}"
  if "loss_scale" in scalars:
    line += f", float16 loss scale {float(scalars['loss_scale']):.4g}"
  return line + f", learning rate {float(scalars.get('learning_rate', math.nan)):.4g}"


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class Guard:
  """Made at the start of pretraining (refuses a rerun that would diverge again)."""

  def __init__(self, config, workdir):
    self._config, self._workdir = config, pathlib.Path(workdir)
    self._float16 = config.precision == "float16"
    self.resumed_with_cure = False
    recorded = read_marker(workdir)
    if recorded is not None:
      if _cure_settings(config) == recorded["settings"]:
        raise Diverged(recorded["message"] + " (This rerun has the same settings.)")
      self.resumed_with_cure = True

  def check_metrics(self, step: int, scalars: dict) -> None:
    """After a log line's metrics are fetched."""
    if self._float16:
      bad = "loss_scale" in scalars and float(scalars["loss_scale"]) < MIN_LOSS_SCALE
      why = (f"the float16 loss scale fell below {MIN_LOSS_SCALE:g}: steps overflow even "
             "unscaled") if bad else ""
    else:
      bad = not all(_finite(scalars[k]) for k in ("loss", "grad_norm") if k in scalars)
      why = "the loss or the gradient norm is not finite"
    if bad:
      self._stop(step, why, scalars)

  def check_state(self, step: int, state, metrics) -> None:
    """Before `state` (after `step`) is saved; `metrics` are that step's."""
    if not bool(_all_finite(state)):
      scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
      self._stop(step, "the state holds non-finite values", scalars)

  def _stop(self, step, why, scalars):
    # Read from the directory: the manager also lists a save still in flight, which may
    # never complete.
    newest_checkpoint = checkpointing.newest_intact_step(self._workdir)
    lr = self._config.optimizer.base_lr
    if newest_checkpoint is None:
      keep = ("No checkpoint was saved before it. Rerun with a lower learning rate "
              f"(--config.optimizer.base_lr, now {lr:g}) to start again")
    else:
      keep = (f"Nothing non-finite was saved: the newest checkpoint, step "
              f"{newest_checkpoint}, is finite. To resume from it, rerun with a lower "
              f"learning rate (--config.optimizer.base_lr, now {lr:g}) or a longer warm-up "
              "(--config.optimizer.warmup_epochs)")
    message = (f"Training diverged at step {step}: {why}; {_figures(scalars)}. {keep}; or "
               "pass a new --workdir to start over.")
    if jax.process_index() == 0:
      run_safety.write_atomic(self._workdir / MARKER, json.dumps(
          {"step": step, "message": message, "settings": _cure_settings(self._config)},
          indent=2))
    raise Diverged(message)

  def clear(self) -> None:
    """The rerun with other settings has started: the record no longer applies."""
    if self.resumed_with_cure and jax.process_index() == 0:
      (self._workdir / MARKER).unlink(missing_ok=True)


def read_marker(workdir) -> dict | None:
  path = pathlib.Path(workdir) / MARKER
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError):  # cut short: its run diverged; the settings are unknown
    return None


def _cure_settings(config) -> dict:
  """The CURE_FIELDS' values, by dotted name."""
  settings = json.loads(config.to_json())
  out = {}
  for field in CURE_FIELDS:
    value = settings
    for part in field.split("."):
      value = value.get(part) if isinstance(value, dict) else None
    out[field] = value
  return out
