"""Benchmarks, one subcommand each; the last line printed is a JSON object of the figures.

  python -m care_jax.bench input --images=DIR   host side of the pretraining input pipeline
  python -m care_jax.bench step [--preset=r50_100ep --batch_per_device=128 --precision=...]
                                                 the jitted train step on synthetic crops,
                                                 next to the same step without the T-stream

Each subcommand imports what it needs when it runs, so one benchmark's dependencies do not
slow down or break another.
"""
import argparse
import json
import os
import platform
import sys
import time


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info() -> dict:
  return {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "platform": platform.platform()}


def bench_input(args) -> dict:
  """Times reading, decoding and cropping both pretraining views of the JPEGs in a folder.

  Runs the pipeline's own engine (input_pipeline.random_view_batches) on the files, so the
  figure includes file reads, header parsing, decoding, crops, resizes, flips, batching.
  """
  import cv2
  import PIL

  from care_jax.data import input_pipeline, sources, synthetic

  if args.make:
    synthetic.write_jpegs(args.images, args.make)
  paths = sorted(os.path.join(root, f) for root, _, files in os.walk(args.images)
                 for f in files if f.lower().endswith((".jpg", ".jpeg")))
  if not paths:
    raise SystemExit(f"No .jpg files in {args.images} (make some with --make=N).")
  source = sources.FolderSource(tuple((p, 0) for p in paths))
  batch_size = min(args.batch_size, len(paths))
  batches = input_pipeline.random_view_batches(
      source, num_views=2, image_size=args.image_size, min_scale=0.08,
      global_batch_size=batch_size, seed=0, start_step=0, process_index=0, process_count=1,
      num_workers=args.workers)
  next(batches)  # Warm-up: thread pool, page cache, first prefetches.
  num_batches = max(1, -(-args.num_images // batch_size))
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  seconds = time.perf_counter() - start
  batches.close()
  rate = num_batches * batch_size / seconds
  sample = PIL.Image.open(paths[0]).size
  return {"benchmark": "input", "images_per_sec": round(rate, 1),
          "images_per_sec_per_core": round(rate / args.workers, 1), "cores_used": args.workers,
          "views_per_image": 2, "image_size": args.image_size, "images_timed":
          num_batches * batch_size, "distinct_images": len(paths),
          "source_size_example": f"{sample[0]}x{sample[1]}", "seconds": round(seconds, 2),
          "opencv": cv2.__version__, "pillow": PIL.__version__, **machine_info()}


def bench_step(args) -> dict:
  """Median time of the jitted step (device augmentation + train step) on synthetic uint8
  crops, and the same with no T-stream blocks (the T-head on pooled layer3: about the
  cost of plain BYOL plus one head),
  measured in the same process. Imports no tensorflow or tfds: runs on a bare GPU box."""
  import jax
  import numpy as np

  from care_jax import cli, parallel, summary
  from care_jax.training import pretraining

  mesh = parallel.create_mesh()
  devices = mesh.devices.size

  def measure(t_blocks):
    config = cli.load_config(preset=args.preset)
    config.precision = args.precision
    config.global_batch_size = args.batch_per_device * devices
    if args.image_size:
      config.data.image_size = args.image_size
    if t_blocks is not None:
      config.model.t_stream.num_blocks = t_blocks
    setup = pretraining.build(config, steps_per_epoch=1000, total_steps=100000)
    state = setup.init_state(jax.random.key(0), parallel.replicated(mesh))

    size = config.data.image_size
    crops = np.random.default_rng(0).integers(
        0, 256, (config.global_batch_size, size, size, 3), dtype=np.uint8)
    batch = parallel.host_to_global(mesh, {"view1": crops, "view2": crops})
    train_step = setup.jitted_step(mesh)
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(args.warmup + args.steps):
      start = time.perf_counter()
      state, metrics = train_step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    median = float(np.median(times[args.warmup:]))
    stats = jax.local_devices()[0].memory_stats() or {}
    flops = summary.train_step_flops(setup, setup.abstract_state())
    return {"step_seconds_median": round(median, 4),
            "image_pairs_per_sec": round(config.global_batch_size / median, 1),
            "first_step_seconds": round(compile_seconds, 1),
            "flops_per_image_pair": flops,
            "achieved_tflops": round(flops * config.global_batch_size / median / 1e12, 3),
            "peak_memory_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2) or None}

  care = measure(None)
  without_t = measure(0)
  return {"benchmark": "step", "preset": args.preset, "precision": args.precision,
          "devices": devices, "device": jax.devices()[0].device_kind,
          "batch_per_device": args.batch_per_device, "care": care,
          "without_t_stream": without_t,
          "t_stream_share_of_step": round(1 - without_t["step_seconds_median"]
                                          / care["step_seconds_median"], 3),
          "jax": jax.__version__, **machine_info()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m care_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)

  p = commands.add_parser("input", help="host side of the pretraining input pipeline")
  p.add_argument("--images", required=True, help="folder of JPEGs (searched recursively)")
  p.add_argument("--make", type=int, default=0,
                 help="first write this many synthetic 500x375 JPEGs into --images")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="decoding threads (= cores used)")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--num_images", type=int, default=2048, help="images to time")
  p.set_defaults(run=bench_input)

  p = commands.add_parser("step", help="the jitted train step, with and without the T-stream blocks")
  p.add_argument("--preset", default="r50_100ep", help="a preset of configs/care.py")
  p.add_argument("--precision", default="float32",
                 choices=("float32", "bfloat16", "float16"))
  p.add_argument("--batch_per_device", type=int, default=128)
  p.add_argument("--image_size", type=int, default=0, help="0: the preset's")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
  p.set_defaults(run=bench_step)

  args = parser.parse_args(argv)
  result = args.run(args)
  print(json.dumps(result))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
