#!/usr/bin/env bash
# The first real run, rehearsed on a CPU at ImageNet's full counts (docs/scale.md):
#   bash experiments/rehearse_imagenet.sh [ROOT]        (default ROOT: /tmp/rehearsal)
# Fake ILSVRC2012 tars with the real counts and small JPEGs, prepared as docs/data.md tells
# users; then on 8 simulated devices with the `tiny` network at 16 px: one pretraining
# epoch at global batch 1024 with the kNN monitor (100,000-example bank) and the online
# probe, stopped by SIGTERM mid-epoch and resumed; linear evaluation with augment on and
# off; fine-tuning on the 1% subset. Each stage's wall time, peak host RSS and exit status
# go to ROOT/stages.tsv, the disk to ROOT/disk.txt. Stages already done are skipped.
# Not part of CI: about an hour on 2 cores and 12 GB of disk.
set -euo pipefail
ROOT=${1:-/tmp/rehearsal}
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
# XLA:CPU aborts a collective whose participants arrive over 40 s apart: 8 simulated devices
# sharing 2 cores with the decoding threads can lag that much (docs/scale.md).
export XLA_FLAGS="--xla_force_host_platform_device_count=8 \
--xla_cpu_collective_call_terminate_timeout_seconds=3600 ${XLA_FLAGS:-}"
mkdir -p "$ROOT"
TFDS="$ROOT/tfds"
COMMON=(--config=configs/care.py:tiny --config.data.name=imagenet2012
        --config.data.data_dir="$TFDS" --config.data.image_size=16
        --config.data.eval_split=validation --config.data.crop_min_scale=0.08
        --config.data.blur_scale=0.0714286)  # 16/224: the release's blur at this size
PRETRAIN=(--config.global_batch_size=1024 --config.num_train_steps=-1 --config.num_epochs=1
          --config.checkpoint_every_steps=250 --config.log_every_steps=50
          --config.monitor.every_steps=1251 --config.monitor.knn_bank_size=100000)

stage() {  # name, then the command; records wall seconds, peak RSS (KiB) and exit status
  local name=$1; shift
  if grep -q "^$name	.*	0$" "$ROOT/stages.tsv" 2>/dev/null; then return 0; fi
  echo "== $name: $*"
  local status=0
  /usr/bin/time -f "%e %M" -o "$ROOT/$name.time" "$@" > "$ROOT/$name.log" 2>&1 || status=$?
  read -r secs rss < <(tail -1 "$ROOT/$name.time")
  printf "%s\t%s\t%s\t%s\n" "$name" "$secs" "$rss" "$status" >> "$ROOT/stages.tsv"
  echo "   $secs s, peak RSS $((rss / 1024)) MiB, exit $status"
  return 0
}

stage generate "$PY" experiments/fake_imagenet.py --manual_dir="$ROOT/ilsvrc"
stage prepare "$PY" -m care_jax.data.prepare imagenet2012 --manual_dir="$ROOT/ilsvrc" \
  --data_dir="$TFDS"
# Our 1percent.txt cannot match the real file's checksum: only that check is skipped.
stage prepare_1pct "$PY" -c "
import sys
from tensorflow_datasets.core.download import download_manager
download_manager.DownloadManager._register_or_validate_checksums = lambda *a, **k: None
from care_jax.data import prepare
prepare.main(sys.argv[1:])" imagenet2012_subset/1pct --manual_dir="$ROOT/ilsvrc" \
  --data_dir="$TFDS"

# Pretraining, stopped by SIGTERM once it has logged step 600, then resumed.
if ! grep -q "^pretrain_until_sigterm	.*	75$" "$ROOT/stages.tsv" 2>/dev/null; then
  ( until grep -q "\] \[600\] " "$ROOT/pretrain_until_sigterm.log" 2>/dev/null; do sleep 5; done
    pkill -TERM -f "^[^ ]*python[^ ]* -m care_jax.main .*--workdir=$ROOT/pretrain" ) &
  stage pretrain_until_sigterm "$PY" -m care_jax.main "${COMMON[@]}" "${PRETRAIN[@]}" \
    --workdir="$ROOT/pretrain"
  wait
fi
stage pretrain_resumed "$PY" -m care_jax.main "${COMMON[@]}" "${PRETRAIN[@]}" \
  --workdir="$ROOT/pretrain"

EVAL=(--config.linear_eval.pretrained_workdir="$ROOT/pretrain" --config.linear_eval.num_epochs=1
      --config.linear_eval.eval_every_epochs=1)
stage linear_augment "$PY" -m care_jax.main "${COMMON[@]}" --config.mode=linear_eval \
  "${EVAL[@]}" --config.linear_eval.augment=True --workdir="$ROOT/linear_augment"
stage linear_cached "$PY" -m care_jax.main "${COMMON[@]}" --config.mode=linear_eval \
  "${EVAL[@]}" --config.linear_eval.augment=False --workdir="$ROOT/linear_cached"
stage finetune_1pct "$PY" -m care_jax.main "${COMMON[@]}" --config.mode=finetune \
  --config.finetune.labels=1pct \
  --config.finetune.pretrained_workdir="$ROOT/pretrain" --config.finetune.num_epochs=5 \
  --config.finetune.eval_every_epochs=5 --workdir="$ROOT/finetune_1pct"

du -s --block-size=1M "$ROOT"/ilsvrc "$TFDS"/imagenet2012* "$ROOT"/pretrain \
  "$ROOT"/linear_augment "$ROOT"/linear_cached "$ROOT"/finetune_1pct > "$ROOT/disk.txt"
column -t "$ROOT/stages.tsv"
cat "$ROOT/disk.txt"
