"""Host throughput per core of grain's loader (experiments/grain_pipeline.py) against
care_jax's own (input_pipeline.random_view_batches), on the same folder of JPEGs.

  python experiments/grain_vs_ours.py [--images=DIR --make=N --workers=1,2 --repeats=3]

All run the same per-example work (read, decode, two random resized crops + flips at
--image_size) over a FolderSource, as care_jax/bench.py's bench_input times ours: one
warm-up batch, then --num_images images. Loaders: ours; grain (one grain element per
example, as ours threads); grain_step (one grain element per batch, per_step=True). Runs
rotate (ours, grain, grain_step, ours, ...) so that load from other tenants of the machine
falls on all. Each run reports images/s per worker thread (the bench's "per core") and CPU
ms per image of the whole process. Then the loaders' own cost with no work (identity
jobs), the part that holds the GIL: per example when batches are taken back to back, and
per batch when the loader is ahead of the trainer (a GPU-bound run). Prints JSON lines,
then a table.
"""
import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

import grain_pipeline  # experiments/, beside this script
from care_jax.data import input_pipeline, sources, synthetic, views


def cpu_model() -> str:
  out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  names = [line.split(":", 1)[1].strip() for line in out.splitlines()
           if line.startswith("Model name")]
  return names[0] if names else platform.processor()


def folder_source(folder: str, make: int) -> sources.FolderSource:
  if make and len(os.listdir(folder) if os.path.isdir(folder) else ()) < make:
    synthetic.write_jpegs(folder, make)
  paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))
  return sources.FolderSource(tuple((p, 0) for p in paths))


def batches(loader: str, source, workers: int, args):
  kwargs = dict(num_views=2, image_size=args.image_size, min_scale=0.08,
                global_batch_size=args.batch_size, seed=0, start_step=0, process_index=0,
                process_count=1, num_workers=workers)
  if loader == "ours":
    return input_pipeline.random_view_batches(source, **kwargs)
  return iter(grain_pipeline.grain_view_batches(source, per_step=loader == "grain_step",
                                                **kwargs))


def timed_run(loader: str, source, workers: int, args) -> dict:
  stream = batches(loader, source, workers, args)
  num_batches = max(1, -(-args.num_images // args.batch_size))
  try:
    first = next(stream)  # Warm-up: thread pool, page cache, first prefetches.
    wall, cpu = time.perf_counter(), time.process_time()
    replaced = 0
    for _ in range(num_batches):
      replaced += sum(result[3] for result in next(stream))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  finally:
    stream.close()
  images = num_batches * args.batch_size
  return {"loader": loader, "workers": workers, "images": images,
          "seconds": round(wall, 2), "images_per_sec": round(images / wall, 1),
          "images_per_sec_per_core": round(images / wall / workers, 1),
          "cpu_ms_per_image": round(1000 * cpu / images, 2), "replaced": replaced,
          "first_indices": [int(result[1]) for result in first]}


def identity_streams(workers: int, batch: int) -> dict:
  """Each loader's threading with identity jobs (no decoding), built as the real loaders
  are (input_pipeline._prefetched; grain_pipeline's MapDataset pipelines)."""
  import grain  # noqa: PLC0415
  ahead = input_pipeline._PREFETCH_STEPS + 1
  identity = lambda x: x
  return {
      "ours": lambda: input_pipeline._prefetched(
          itertools.count(), lambda step: [lambda i=i: i for i in range(batch)], list,
          workers),
      "grain": lambda: iter(grain.MapDataset.range(0, sys.maxsize).map(identity)
                            .to_iter_dataset(grain.ReadOptions(
                                num_threads=workers, prefetch_buffer_size=ahead * batch))
                            .batch(batch, batch_fn=list)),
      "grain_step": lambda: iter(grain.MapDataset.range(0, sys.maxsize).map(
          lambda step: [identity(i) for i in range(batch)]).to_iter_dataset(
              grain.ReadOptions(num_threads=workers,
                                prefetch_buffer_size=max(ahead, workers))))}


def machinery_us_per_example(workers: int, batch: int = 64, steps: int = 200) -> dict:
  """Wall us per example of each loader's own machinery, taking batches back to back (the
  loader is the bottleneck)."""
  cost = {}
  for name, make in identity_streams(workers, batch).items():
    stream = make()
    next(stream)
    start = time.perf_counter()
    for _ in range(steps):
      next(stream)
    cost[name] = round(1e6 * (time.perf_counter() - start) / steps / batch, 1)
    stream.close()
  return cost


def ready_batch_ms(workers: int, batch: int, step_seconds: float = 0.3, tries: int = 3
                   ) -> dict:
  """ms the trainer's thread spends taking a batch that the loader has already prepared
  (the accelerator is the bottleneck: a step_seconds step between batches); min of tries."""
  cost = {}
  for name, make in identity_streams(workers, batch).items():
    stream = make()
    next(stream)
    seconds = []
    for _ in range(tries):
      time.sleep(step_seconds)
      start = time.perf_counter()
      next(stream)
      seconds.append(time.perf_counter() - start)
    cost[name] = round(1e3 * min(seconds), 2)
    stream.close()
  return cost


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", default="/tmp/grain_vs_ours_jpegs")
  p.add_argument("--make", type=int, default=512, help="JPEGs to write if fewer are there")
  p.add_argument("--workers", default="1,2", help="comma-separated thread counts")
  p.add_argument("--repeats", type=int, default=3, help="runs of each loader per count")
  p.add_argument("--loaders", default="ours,grain,grain_step")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--num_images", type=int, default=2048, help="images timed per run")
  args = p.parse_args()
  import grain  # noqa: PLC0415

  source = folder_source(args.images, args.make)
  info = {"grain": grain.__version__, "nproc": os.cpu_count(), "cpu": cpu_model(),
          "python": platform.python_version(), "resampler": views.resampler(),
          "distinct_images": len(source), "image_size": args.image_size,
          "views_per_image": 2, "batch_size": args.batch_size,
          "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
  print(json.dumps(info), flush=True)
  loaders = args.loaders.split(",")
  runs = []
  for workers in (int(w) for w in args.workers.split(",")):
    for _ in range(args.repeats):
      for loader in loaders:
        run = timed_run(loader, source, workers, args)
        runs.append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "first_indices"}), flush=True)
  assert all(r["first_indices"] == runs[0]["first_indices"] for r in runs), "different work"
  print(f"\ngrain {grain.__version__}, {os.cpu_count()} cores ({info['cpu']}), "
        f"{args.image_size} px, 2 views, batch {args.batch_size}, "
        f"loadavg after {[round(x, 2) for x in os.getloadavg()]}")
  print("| workers | loader | run | images/s | images/s per core | CPU ms/image |")
  print("|---|---|---|---|---|---|")
  counts = {}
  for r in runs:
    key = (r["workers"], r["loader"])
    counts[key] = counts.get(key, 0) + 1
    print(f"| {r['workers']} | {r['loader']} | {counts[key]} | {r['images_per_sec']} | "
          f"{r['images_per_sec_per_core']} | {r['cpu_ms_per_image']} |")
  for workers in sorted({r["workers"] for r in runs}):
    rate = {name: [r["images_per_sec_per_core"] for r in runs
                   if r["workers"] == workers and r["loader"] == name] for name in loaders}
    line = ", ".join(f"{name} {np.median(rate[name]):.1f}" for name in loaders)
    ratios = ", ".join(  # Runs next to each other share the machine's load best.
        f"{name}/ours {np.median(np.divide(rate[name], rate['ours'])):.3f}"
        for name in loaders if name != "ours" and "ours" in loaders)
    print(f"workers {workers}: median images/s per core: {line}; median of run-by-run "
          f"ratios: {ratios}")
  for workers in sorted({r["workers"] for r in runs}):
    costs = [machinery_us_per_example(workers) for _ in range(2)]
    print(f"workers {workers}: loader machinery, wall us per example with no work "
          f"(2 runs): {json.dumps(costs)}")
  workers = max(int(w) for w in args.workers.split(","))
  for batch in (64, 256, 1024):
    print(f"workers {workers}, batch {batch}: ms to take a batch the loader has ready "
          f"(no work per example): {json.dumps(ready_batch_ms(workers, batch))}")


if __name__ == "__main__":
  main()
