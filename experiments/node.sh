#!/usr/bin/env bash
# Runs one care_jax job on this node, on all of its GPUs (one process).
#
#   experiments/node.sh PRESET [WORKDIR] [--config.FIELD=VALUE ...]
#
# PRESET is a preset of configs/care.py: the 16 published settings (r50_100ep ...
# r152_800ep), the fine-tuning ones, fmnist_gpu, fmnist_demo, tiny (`python -m care_jax.main
# --help` lists them; care_jax.main refuses an unknown one, naming the valid ones).
# WORKDIR defaults to runs/PRESET. Everything after WORKDIR is
# passed to `python -m care_jax.main` unchanged, for example:
#   --config.precision=bfloat16                  (A100/H100; default float32)
#   --config.data.data_dir=/data/tfds            (or export TFDS_DATA_DIR)
#   --config.mode=linear_eval --config.linear_eval.pretrained_workdir=runs/r50_100ep
#   --config.distributed=True                    (set by experiments/slurm.sbatch)
# Rerunning the same command resumes from the latest checkpoint in WORKDIR.
#
# PYTHON selects the interpreter (default: the repo's .venv if present, else python3).
# This script downloads nothing; it prints the command, then runs it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  echo "usage: $0 PRESET [WORKDIR] [--config.FIELD=VALUE ...]" >&2
  exit 2
}

[[ $# -ge 1 && "$1" != --* ]] || usage
preset="$1"
shift

workdir="runs/$preset"
if [[ $# -ge 1 && "$1" != --* ]]; then
  workdir="$1"
  shift
fi

if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; fi
fi
# care_jax is imported from the checkout; WORKDIR stays relative to the caller's directory.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

cmd=("$PYTHON" -m care_jax.main "--config=$root/configs/care.py:$preset" "--workdir=$workdir" "$@")
echo "[$(hostname) ${SLURM_PROCID:+process $SLURM_PROCID }$(date '+%F %T')] ${cmd[*]}"
exec "${cmd[@]}"
