#!/usr/bin/env bash
# Issue 12's measurement in one call on a one-GPU machine without internet, tensorflow,
# tfds, clu, ml-collections or dm-pix (gpu-runbook): CARE pretrained on Fashion-MNIST with
# the fmnist_gpu preset (100 epochs, bfloat16, kNN monitor and online probe every 10
# epochs), linear probes of the pretrained encoder / random init / raw pixels, attention
# maps of the trained and the random encoder, and the learning curve.
#
#   experiments/gpu_fmnist.sh prepare   here, once: fills wheels/ (git-ignored) with the
#                                       ml-collections and dm-pix wheels for Python 3.12
#                                       and a copy of Debian's Fashion-MNIST idx files
#   experiments/gpu_fmnist.sh           there, with wheels/ carried: the measurement
#
# Everything lands in $OUT (at most 8 files, as the device tool returns them): results.json,
# demo.log, learning_curve.png, attention_trained.png, attention_random.png, env.txt and
# runs.tar.gz (TensorBoard events and configs of every run, no checkpoints).
# Environment: EPOCHS (an integer, default 100); MAX_PRETRAIN_SECONDS (default 400:
# pretraining, compilation included, is stopped there with a checkpoint and the probes
# run on it); DEADLINE (default 570 s: later stages get what is left of it, so the script
# ends before the device tool's 600 s); SMOKE=1 (a few steps at a small batch: a dry run on
# a CPU); PYTHON (default python3); OUT, WORK (the output and scratch folders).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
carry="$root/wheels"
python="${PYTHON:-python3}"

if [[ "${1:-}" == prepare ]]; then
  set -e
  mkdir -p "$carry/fashion-mnist"
  "$python" -m pip download -q --python-version 3.12 --platform manylinux2014_x86_64 \
    --only-binary=:all: --no-deps ml-collections==1.1.0 dm-pix==0.4.5 -d "$carry"
  cp /usr/share/datasets/fashion-mnist/*-ubyte.gz "$carry/fashion-mnist/"
  du -sh "$carry"
  exit 0
fi

out="${OUT:-$root/runs/gpu_fmnist_out}"
work="${WORK:-/tmp/gpu_fmnist}"
mkdir -p "$out"
rm -rf "$work"
log="$out/demo.log"
{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  git log -1 --format="commit %H" 2>/dev/null
} >"$out/env.txt"

# The packages the GPU machine lacks, from the carried wheels (a CPU venv has them).
if ! "$python" -c "import ml_collections, dm_pix" 2>/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    "$carry"/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -c "import sys, jax; print('python', sys.version.split()[0], 'jax', jax.__version__,
'devices', jax.devices())" >>"$out/env.txt" 2>&1
cat "$out/env.txt"
card="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
card="${card:-a CPU}"

sets=(--set=data.data_dir="$carry/fashion-mnist" --set=num_epochs="${EPOCHS:-100}")
if [[ "${SMOKE:-0}" == 1 ]]; then  # minutes on a CPU: the same stages, shrunk
  sets+=(--set=num_train_steps=4 --set=global_batch_size=64 --set=monitor.every_steps=2
         --set=monitor.knn_bank_size=2000 --set=linear_eval.num_epochs=2)
fi
deadline="${DEADLINE:-570}"  # seconds: each later stage gets what is left of it
left() { echo $((deadline - SECONDS > 5 ? deadline - SECONDS : 5)); }
export PYTHONUNBUFFERED=1
timeout -k 10 "$(left)" "$python" -m care_jax.demo --preset=fmnist_gpu --workdir="$work" \
  "${sets[@]}" --max_pretrain_seconds="${MAX_PRETRAIN_SECONDS:-400}" 2>&1 | tee "$log"
echo "demo exit status ${PIPESTATUS[0]} at ${SECONDS} s" | tee -a "$log"
cp "$work/results.json" "$out/" 2>/dev/null
tar czf "$out/runs.tar.gz" --exclude=checkpoints -C "$(dirname "$work")" "$(basename "$work")"
baselines=()
[[ -f "$work/results.json" ]] && baselines=(--results="$work/results.json")
timeout -k 5 "$(left)" "$python" -m care_jax.plot --workdir="$work/pretrain" \
  "${baselines[@]}" --out="$out/learning_curve.png" \
  --title="CARE, preset fmnist_gpu, on $card ($(date -u +%F))" 2>&1 | tail -n 3 | tee -a "$log"
for encoder in pretrained random_init; do
  name=$([[ $encoder == pretrained ]] && echo trained || echo random)
  timeout -k 5 "$(left)" "$python" -m care_jax.visualize --workdir="$work/pretrain" \
    --encoder="$encoder" --images=0,1,2,3,4,5,6,7 --out="$out/attention_$name.png" 2>&1 \
    | tail -n 3 | tee -a "$log"
done
echo "done at ${SECONDS} s" | tee -a "$log"
ls -la "$out"
