"""care_jax's entry point: pretraining, or with --config.mode=linear_eval / finetune the
evaluation of a pretrained encoder.

  python -m care_jax.main --config=configs/care.py[:preset] --workdir=DIR [--config.x=y ...]

Rerunning the same command resumes from the latest checkpoint in DIR.
"""
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from care_jax import cli, errors

_CONFIG = config_flags.DEFINE_config_file("config", "configs/care.py",
                                          "Config file, optionally with :preset.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")


def run(config, workdir: str):
  if config.distributed:
    jax.distributed.initialize()  # cluster (SLURM, ...) detected from the environment
  if config.mode == "pretrain":
    from care_jax import train
    return train.pretrain(config, workdir)
  if config.mode == "linear_eval":
    from care_jax.evaluation import linear
    return linear.evaluate(config, workdir)
  if config.mode == "finetune":
    from care_jax.evaluation import finetune
    return finetune.finetune(config, workdir)
  raise errors.UserError(f"config.mode must be 'pretrain', 'linear_eval' or 'finetune', got "
                         f"{config.mode!r}.")


def _flat_fields(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _flat_fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _config_from_argv(argv):
  """The config that --config names, built without absl (used to list valid fields)."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
              "configs/care.py")
  path, _, preset = spec.partition(":")
  return cli.load_config(path, preset)


def parse_flags(argv):
  """absl's parsing, with config mistakes reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl or config_flags, raised from the config or an override
    lines = [line.strip() for line in str(e).replace("\\n", "\n").splitlines() if line.strip()]
    reason = lines[-1].strip("'\"") if lines else type(e).__name__
    try:
      fields = sorted(_flat_fields(_config_from_argv(argv)))
    except Exception:  # the config itself cannot be built; the reason says why
      sys.exit(f"error: {reason}")
    unknown = [arg.split("=")[0][len("--config."):] for arg in argv[1:]
               if arg.startswith("--config.")
               and arg.split("=")[0][len("--config."):] not in fields]
    if unknown:
      sys.exit(f"error: unknown config field(s) {', '.join(unknown)}. "
               f"Valid fields: {', '.join(fields)}")
    sys.exit(f"error: {reason}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: where checkpoints and metrics go.")
  cli.configure_logging()
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
