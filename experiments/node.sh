#!/usr/bin/env bash
# Runs one care_jax job on this node, on all of its GPUs (one process).
#
#   experiments/node.sh PRESET [WORKDIR] [--config.FIELD=VALUE ...]
#
# PRESET is one of the 16 published settings in configs/care.py (r50_100ep ... r152_800ep)
# or fmnist_demo / tiny. WORKDIR defaults to runs/PRESET. Everything after WORKDIR is
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
presets="r50 r50x2 r101 r152"

usage() {
  echo "usage: $0 PRESET [WORKDIR] [--config.FIELD=VALUE ...]" >&2
  echo "PRESET: {$(echo "$presets" | tr ' ' ',')}_{100,200,400,800}ep, fmnist_demo or tiny" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
preset="$1"
shift
valid=0
for trunk in $presets; do
  for epochs in 100 200 400 800; do
    [[ "$preset" == "${trunk}_${epochs}ep" ]] && valid=1
  done
done
[[ "$preset" == fmnist_demo || "$preset" == tiny ]] && valid=1
[[ $valid == 1 ]] || { echo "unknown preset: $preset" >&2; usage; }

workdir="runs/$preset"
if [[ $# -ge 1 && "$1" != --* ]]; then
  workdir="$1"
  shift
fi

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
# care_jax is imported from the checkout; WORKDIR stays relative to the caller's directory.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

cmd=("$PYTHON" -m care_jax.main "--config=$root/configs/care.py:$preset" "--workdir=$workdir" "$@")
echo "[$(hostname) ${SLURM_PROCID:+process $SLURM_PROCID }$(date '+%F %T')] ${cmd[*]}"
exec "${cmd[@]}"
