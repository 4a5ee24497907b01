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


def parse_flags(argv):
  """cli.parse_config_flags, with the SIGTERM handler installed first: absl calls this
  before anything else."""
  SAFETY.listen()
  return cli.parse_config_flags(argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: where checkpoints and metrics go.")
  cli.configure_logging()
  run_safety.run(lambda: run(_CONFIG.value, _WORKDIR.value), _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
