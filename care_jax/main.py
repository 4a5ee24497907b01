"""care_jax's entry point: pretraining, or with --config.mode=linear_eval / finetune the
evaluation of a pretrained encoder.

  python -m care_jax.main --config=configs/care.py[:preset] --workdir=DIR [--config.x=y ...]

Rerunning the same command resumes from the latest checkpoint in DIR. Exit status: 0 when
the run is complete, 2 for a setting or file to fix (one line on stderr), 65 when training
diverged (one line: the step, the figures, what to change; nothing non-finite is saved),
74 when a write failed (a full disk, a quota, a read-only file system: one line; rerun with
space to resume), 75 when SIGTERM stopped the run or a fault may pass (rerun the same
command to resume; DIR/PREEMPTED says so too, for launchers that lose the status). SIGTERM
is a request from flag parsing on: JAX loads after the handler (run_safety).
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from care_jax import cli, errors, run_safety

SAFETY = run_safety.RunSafety()

_CONFIG = config_flags.DEFINE_config_file("config", str(cli.CONFIG_FILE),
                                          "Config file, optionally with :preset (presets "
                                          "below).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")


def run(config, workdir: str, safety: run_safety.RunSafety = SAFETY):
  """Runs config.mode in `workdir`; raises run_safety.Stopped when stopped early,
  divergence.Diverged when pretraining diverged."""
  import jax  # noqa: PLC0415  (after the SIGTERM handler: loading JAX takes seconds)
  if config.distributed:
    jax.distributed.initialize()  # cluster (SLURM, ...) detected from the environment
  if config.mode == "pretrain":
    from care_jax import train  # noqa: PLC0415
    return train.pretrain(config, workdir, safety)
  if config.mode == "linear_eval":
    from care_jax.evaluation import linear  # noqa: PLC0415
    return linear.evaluate(config, workdir, safety)
  if config.mode == "finetune":
    from care_jax.evaluation import finetune  # noqa: PLC0415
    return finetune.finetune(config, workdir, safety)
  raise errors.UserError(f"config.mode must be 'pretrain', 'linear_eval' or 'finetune', got "
                         f"{config.mode!r}.")


def _flat_fields(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _flat_fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _config_spec(argv) -> str:
  """The --config value of argv (default: the packaged configs/care.py)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return "configs/care.py"


def _config_from_argv(argv):
  """The config that --config names, built without absl (used to list valid fields)."""
  path, _, preset = _config_spec(argv).partition(":")
  return cli.load_config(path, preset)


def _print_help(argv):
  """absl's flag help (which exits 1), then the presets, and exit 0: help is no error."""
  app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True)
  try:
    print("\n" + cli.presets_help(_config_spec(argv).partition(":")[0]))
  except Exception as e:  # the config file cannot be read: say so, help still succeeded
    print(f"\n(no presets listed: {type(e).__name__}: {e})")
  sys.exit(0)


def parse_flags(argv):
  """absl's parsing, with config mistakes reported as one line (exit status 2) instead of a
  traceback, and the --config file found from any directory (cli.resolve_config_path).
  Installs the SIGTERM handler first: absl calls this before anything else."""
  SAFETY.listen()
  argv = cli.resolve_config_args(argv)
  if any(arg in cli.HELP_FLAGS for arg in argv[1:]):
    _print_help(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl or config_flags, raised from the config or an override
    lines = [line.strip() for line in str(e).replace("\\n", "\n").splitlines() if line.strip()]
    reason = lines[-1].strip("'\"") if lines else type(e).__name__
    try:
      fields = sorted(_flat_fields(_config_from_argv(argv)))
    except Exception:  # the config itself cannot be built; the reason says why
      cli.fail(reason)
    unknown = [arg.split("=")[0][len("--config."):] for arg in argv[1:]
               if arg.startswith("--config.")
               and arg.split("=")[0][len("--config."):] not in fields]
    if unknown:
      cli.fail(f"unknown config field(s) {', '.join(unknown)}. Valid fields: "
               f"{', '.join(fields)}")
    cli.fail(reason)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: where checkpoints and metrics go.")
  cli.configure_logging()
  run_safety.run(lambda: run(_CONFIG.value, _WORKDIR.value), _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
