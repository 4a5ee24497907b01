"""Times the authors' PyTorch CARE step (github.com/ChongjianGE/CARE) on synthetic views,
for a side-by-side figure with `python -m care_jax.bench step` on the same card.

The step is the one its tools/train_new.py runs: the model's forward (which first moves
the target by EMA), the loss, then SGD with momentum on the online (student) encoder, under
fp16 autocast with a GradScaler (`--amp=fp16`, as shipped), bf16 autocast (`bf16`), bf16
autocast with channels_last tensors (`bf16_cl`, what a PyTorch user would try) or float32.
Inputs are 224 px tensors already on the device: no data loading. The release's T-stream
is built for 14x14 maps, so 224 px is the only size.

The release is not part of this repository: put a checkout (models/ and layers/ suffice) in
an ignored folder, by default external/CARE, and never commit it. Its care_module.py
imports ipdb without using it; an empty stand-in is supplied where ipdb is missing.

  python experiments/release_step.py [--release_dir=external/CARE] [--batch=128]
      [--amp=fp16|bf16|bf16_cl|fp32] [--steps=20] [--warmup=5]

The last line printed is a JSON object of the figures.
"""
import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import types


def load_release(release_dir: str):
  """The release's CARE class, imported from its checkout."""
  if not os.path.isfile(os.path.join(release_dir, "models", "care_module.py")):
    sys.exit(f"error: no release checkout at {release_dir} (models/care_module.py missing): "
             "check out github.com/ChongjianGE/CARE there (an ignored folder) or pass "
             "--release_dir.")
  if importlib.util.find_spec("ipdb") is None:
    sys.modules["ipdb"] = types.ModuleType("ipdb")
  sys.path.insert(0, os.path.abspath(release_dir))
  from models.care_module import CARE
  return CARE


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--release_dir", default="external/CARE")
  parser.add_argument("--batch", type=int, default=128, help="image pairs per step")
  parser.add_argument("--amp", default="fp16", choices=("fp16", "bf16", "bf16_cl", "fp32"))
  parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
  parser.add_argument("--device", default="", help="default: cuda if available, else cpu")
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 1 or args.warmup < 0:
    sys.exit("error: --batch and --steps must be at least 1, --warmup at least 0.")

  import numpy as np
  import torch
  care_class = load_release(args.release_dir)
  device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
  torch.backends.cudnn.benchmark = True  # the release's train script sets it too
  model = care_class(0.99, total_iters=10**6).to(device)
  model.train()
  # The release's get_optimizer_new: SGD on the student only, lr 0.05 x batch / 256.
  optimizer = torch.optim.SGD(model.student_encoder.parameters(), lr=0.05 * args.batch / 256,
                              momentum=0.9, weight_decay=1e-4)
  channels_last = args.amp == "bf16_cl"
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "bf16_cl": torch.bfloat16}.get(
      args.amp)
  scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
  generator = torch.Generator().manual_seed(0)
  views = [torch.randn(args.batch, 3, 224, 224, generator=generator).to(device)
           for _ in range(2)]
  if channels_last:
    views = [v.contiguous(memory_format=torch.channels_last) for v in views]

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  def step():
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
      loss = model(views, update_param=True)[0]
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss

  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(args.warmup + args.steps):
    start = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - start)
  median = float(np.median(times[args.warmup:]))
  peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
  result = {"benchmark": "release_step", "amp": args.amp, "batch": args.batch,
            "image_size": 224, "device": (torch.cuda.get_device_name() if device.type == "cuda"
                                          else platform.processor() or "cpu"),
            "step_seconds_median": round(median, 4),
            "image_pairs_per_sec": round(args.batch / median, 1),
            "first_step_seconds": round(times[0], 2), "steps_timed": args.steps,
            "peak_memory_gib": None if peak is None else round(peak, 2),
            "finite_loss": bool(torch.isfinite(loss).item()), "torch": torch.__version__}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
