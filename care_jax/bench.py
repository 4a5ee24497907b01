"""Benchmarks, one subcommand each; the last line printed is a JSON object of the figures.

  python -m care_jax.bench input --images=DIR   host side of the pretraining input pipeline,
                                                 next to the release's two-view transforms
                                                 on the same files
  python -m care_jax.bench step [--config=configs/care.py:r50_100ep --batch_per_device=128
                                 --config.precision=... --no_augmentation]
                                                 the jitted train step on synthetic crops,
                                                 next to the same step without the T-stream:
                                                 pairs/s (and per device), FLOPs/pair,
                                                 TFLOP/s, fraction of the card's rate (a
                                                 CPU's: a matrix product timed in the run),
                                                 peak memory per device; with R50 at 224 px,
                                                 no augmentation and the release checked
                                                 out in external/CARE, the release's step
                                                 and the ratio
  python -m care_jax.bench scaling [--config=configs/care.py:r50_100ep --batch_per_device=4
                                    --devices=1,2,4,8]
                                                 the step (--programs=all: every program
                                                 jitted over the mesh) compiled for each
                                                 device count at the same per-device batch:
                                                 per-device memory, the collectives' bytes
                                                 per step, any that move examples (CPU:
                                                 simulated devices, one process per count)

Each subcommand imports what it needs when it runs, so one benchmark's dependencies do not
slow down or break another.
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Optional

from care_jax import run_safety
from care_jax.errors import UserError


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


# Matrix rates (TFLOP/s) the step's FLOP rate is compared with, by device kind (the first
# name found in it): NVIDIA's datasheet dense bfloat16 rates, H100 SXM and H200 989, H100
# PCIe 756. Other devices: pass --peak_tflops.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class _SkipCountingSource:
  """A source that remembers which examples the pipeline reported as undecodable (it
  describes an example only to name it in a skip warning or error)."""

  def __init__(self, source):
    self._source, self.skipped = source, set()

  def __len__(self):
    return len(self._source)

  def read(self, index):
    return self._source.read(index)

  def describe(self, index):
    self.skipped.add(index)
    return self._source.describe(index)


def _example_size(paths, limit: int = 1000):
  """'WxH' of the first of `paths` whose header reads, None if none of the first `limit`."""
  from care_jax.data import views
  for path in paths[:limit]:
    try:
      with open(path, "rb") as f:
        height, width = views.image_size(f.read())
      return f"{width}x{height}"
    except (views.UndecodableImageError, OSError):
      continue
  return None


def _release_two_views(encoded: bytes, rnd) -> None:
  """What the release's data loader does per image (its data/transforms.py
  standard_transform, torchvision on PIL images), written with the PIL calls torchvision
  makes: decode; per view RGB conversion, RandomResizedCrop(224), ColorJitter(0.4, 0.4,
  0.2, 0.1) in a random order with p=0.8, GaussianBlur (p=1 / 0.1), RandomGrayscale(0.2),
  flip, Solarization (view 2, p=0.2), ToTensor and Normalize."""
  import io
  import math

  import numpy as np
  import PIL.Image
  import PIL.ImageEnhance
  import PIL.ImageFilter
  import PIL.ImageOps

  from care_jax.data import augment

  def hue(image, delta):
    h, s, v = image.convert("HSV").split()
    shifted = (np.asarray(h).astype(np.int64) + int(delta * 255)) % 256
    merged = [PIL.Image.fromarray(shifted.astype(np.uint8)), s, v]
    return PIL.Image.merge("HSV", merged).convert("RGB")

  def view(image, blur_prob, solarize_prob):
    image = image.convert("RGB")
    width, height = image.size
    for _ in range(10):
      area = height * width * rnd.uniform(0.08, 1.0)
      ratio = math.exp(rnd.uniform(math.log(3 / 4), math.log(4 / 3)))
      w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
      if 0 < w <= width and 0 < h <= height:
        top, left = rnd.randint(0, height - h), rnd.randint(0, width - w)
        break
    else:
      top, left, h, w = 0, 0, height, width
    image = image.crop((left, top, left + w, top + h)).resize((224, 224), PIL.Image.BILINEAR)
    if rnd.random() < augment.JITTER_PROB:
      ops = [lambda x: PIL.ImageEnhance.Brightness(x).enhance(rnd.uniform(0.6, 1.4)),
             lambda x: PIL.ImageEnhance.Contrast(x).enhance(rnd.uniform(0.6, 1.4)),
             lambda x: PIL.ImageEnhance.Color(x).enhance(rnd.uniform(0.8, 1.2)),
             lambda x: hue(x, rnd.uniform(-0.1, 0.1))]
      rnd.shuffle(ops)
      for op in ops:
        image = op(image)
    if rnd.random() < blur_prob:
      image = image.filter(PIL.ImageFilter.GaussianBlur(radius=rnd.uniform(0.1, 2.0)))
    if rnd.random() < augment.GRAYSCALE_PROB:
      image = image.convert("L").convert("RGB")
    if rnd.random() < 0.5:
      image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    if rnd.random() < solarize_prob:
      image = PIL.ImageOps.solarize(image, 128)
    tensor = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.
    return (tensor - augment.IMAGENET_MEAN[:, None, None]) / augment.IMAGENET_STD[:, None, None]

  with PIL.Image.open(io.BytesIO(encoded)) as image:
    image.load()
    view(image, **augment.VIEW1)
    view(image, **augment.VIEW2)


def _release_rate(paths: list[str], count: int) -> Optional[float]:
  """Images per second of _release_two_views on one core (the release's loader runs one
  such process per worker), over `count` decodable files from `paths`, after one warm-up."""
  import random

  rnd, done, seconds = random.Random(0), 0, 0.0
  for i in range(count + 1):
    with open(paths[i % len(paths)], "rb") as f:
      encoded = f.read()
    start = time.perf_counter()
    try:
      _release_two_views(encoded, rnd)
    except Exception:  # A file the release would fail on: not timed.
      continue
    if i:
      done, seconds = done + 1, seconds + time.perf_counter() - start
  return done / seconds if done else None


def _input_files(args) -> list:
  """The images to time (made first with --make); the arguments' mistakes first."""
  from care_jax.data import synthetic

  if args.release_images < 0:
    raise UserError(f"--release_images must be 0 or more, got {args.release_images}.")
  for name in ("image_size", "workers", "batch_size", "num_images"):
    if getattr(args, name) < 1:
      raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}.")
  if args.make:
    synthetic.write_jpegs(args.images, args.make)
  if not os.path.isdir(args.images):
    raise UserError(f"--images={args.images} is not a folder (make one with --make=N).")
  paths = sorted(os.path.join(root, f) for root, _, files in os.walk(args.images)
                 for f in files if f.lower().endswith(IMAGE_SUFFIXES))
  if not paths:
    raise UserError(f"No .jpg, .jpeg or .png files in {args.images} (make some with --make=N).")
  return paths


def bench_input(args) -> dict:
  """Times reading, decoding and cropping both pretraining views of the images (JPEG or
  PNG) in a folder, and, on the same files, the release's two-view transforms.

  Runs the pipeline's own engine (input_pipeline.random_view_batches) on the files, so the
  figure includes file reads, header parsing, decoding, crops, resizes, flips, batching.
  Undecodable files are replaced as in training and counted; if nothing decodes, the
  result says so (images_per_sec null) instead of timing nothing. The release's rate is
  per core as well: its loader (torchvision, PIL) runs one process per core and also
  does the colour augmentations there, which care_jax does on the accelerator.
  """
  import cv2
  import PIL

  from care_jax.data import input_pipeline, sources, views
  from care_jax.data.errors import DataError

  paths = _input_files(args)
  source = _SkipCountingSource(sources.FolderSource(tuple((p, 0) for p in paths)))
  batch_size = min(args.batch_size, len(paths))
  batches = input_pipeline.random_view_batches(
      source, num_views=2, image_size=args.image_size, min_scale=0.08,
      global_batch_size=batch_size, seed=0, start_step=0, process_index=0, process_count=1,
      num_workers=args.workers)
  num_batches = max(1, -(-args.num_images // batch_size))
  rate, seconds, replaced, error = None, None, 0, None
  try:
    next(batches)  # Warm-up: thread pool, page cache, first prefetches.
    start = time.perf_counter()
    for _ in range(num_batches):
      replaced += sum(result[3] for result in next(batches))
    seconds = time.perf_counter() - start
    rate = num_batches * batch_size / seconds
  except DataError as e:
    error = f"nothing to time: {e}"
  finally:
    batches.close()
  release = _release_rate(paths, args.release_images) if args.release_images else None
  per_core = None if rate is None else rate / args.workers
  result = {"benchmark": "input",
            "images_per_sec": None if rate is None else round(rate, 1),
            "images_per_sec_per_core": None if per_core is None else round(per_core, 1),
            "release_images_per_sec_per_core": None if release is None else round(release, 1),
            "times_release_per_core": None if per_core is None or release is None
            else round(per_core / release, 2),
            "cores_used": args.workers, "views_per_image": 2, "image_size": args.image_size,
            "images_timed": 0 if rate is None else num_batches * batch_size,
            "distinct_images": len(paths), "files_skipped": len(source.skipped),
            "examples_replaced_while_timed": replaced,
            "source_size_example": _example_size(paths),
            "seconds": None if seconds is None else round(seconds, 2),
            "resampler": views.resampler(), "opencv": cv2.__version__,
            "pillow": PIL.__version__, **machine_info()}
  if error:
    result["error"] = error
  return result


def _config(args):
  """The config of --config with its --config.FIELD=VALUE overrides."""
  from care_jax import cli
  return cli.config_from_spec(args.config, args.overrides)


def peak_tflops(device_kind: str, given: float = 0.0, dtype: Optional[str] = None):
  """(TFLOP/s the step's rate is compared with, where that figure comes from). A CPU has no
  datasheet rate here: with `dtype`, one large matrix product in it is timed in this run."""
  if given:
    return given, "--peak_tflops"
  for name, rate in PEAK_TFLOPS.items():
    if name in device_kind:
      return rate, f"NVIDIA's datasheet dense bfloat16 rate of the {name}"
  if device_kind == "cpu" and dtype:
    return (matmul_tflops(dtype), f"a {dtype} {MATMUL_SIZE}x{MATMUL_SIZE} matrix product "
            "timed in this run, the median of 5 (what XLA:CPU reaches at best here)")
  return None, f"unknown for {device_kind!r}: pass --peak_tflops"


MATMUL_SIZE = 2048


def matmul_tflops(dtype: str, size: int = MATMUL_SIZE, repeats: int = 5) -> float:
  """TFLOP/s of one jitted size x size matrix product, median of `repeats` after one warm-up
  (2 size^3 FLOPs each): this device's practical peak for the step's dense maths."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
  product = jax.jit(jnp.matmul)
  jax.block_until_ready(product(a, a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(product(a, a))
    times.append(time.perf_counter() - start)
  return float(f"{2 * size**3 / float(np.median(times)) / 1e12:.4g}")


def _step_figures(global_batch: int, median: float, flops: Optional[float],
                  peak: Optional[float], devices: int = 1) -> dict:
  """Throughput (all devices and per device), FLOPs per image pair, achieved TFLOP/s (per
  device) and the fraction of `peak` (one device's rate)."""
  tflops = None if flops is None else flops / median / 1e12
  return {"step_seconds_median": round(median, 4),
          "image_pairs_per_sec": round(global_batch / median, 1),
          "image_pairs_per_sec_per_device": round(global_batch / median / devices, 1),
          "flops_per_image_pair": None if flops is None else float(f"{flops / global_batch:.4g}"),
          "achieved_tflops": None if tflops is None else float(f"{tflops:.4g}"),
          "fraction_of_peak": None if tflops is None or not peak else round(tflops / peak, 4)}


def bench_step(args) -> dict:
  """Median time of the jitted step (device augmentation, unless --no_augmentation, + train
  step) on synthetic uint8 crops, for the CARE network and, in the same process, the same
  step with no T-stream blocks (the T-head on pooled layer3: about the cost of plain BYOL
  plus one head); then, where it does the same work, the release's step (_beside_release).

  FLOPs are XLA's count for the timed program itself (augmentation included if on), from the
  lowered program or, where the backend gives none there (JAX 0.11 on CUDA), the compiled
  one; null if neither has one, and the timing is reported all the same. The device keeps
  one peak memory per process: it is reported for the first variant only, next to the peak
  before its first step (state and compilation) and XLA's own buffer sizes of the
  compiled step (program_memory_gib: temp, argument, output, alias). Imports no
  tensorflow, tfds or clu: runs on a bare GPU machine.
  """
  import jax
  import jaxlib

  from care_jax import parallel

  variants = _check_step_args(args)
  mesh = parallel.create_mesh()
  devices = mesh.devices.size
  device_kind = jax.devices()[0].device_kind
  config = _config(args)
  peak, peak_basis = peak_tflops(device_kind, args.peak_tflops, config.precision)
  results, retimers = {}, {}
  for i, variant in enumerate(variants):
    results[variant], retimers[variant] = _measure_step(args, variant, mesh, peak,
                                                        first=i == 0)
    print(f"{variant}: {_describe(results[variant], peak)}", flush=True)
  result = {"benchmark": "step", "config": args.config, "overrides": args.overrides,
            "precision": config.precision, "devices": devices, "device": device_kind,
            "batch_per_device": args.batch_per_device, "image_size": config.data.image_size,
            "assumed_peak_tflops": peak, "peak_tflops_basis": peak_basis, **results}
  if len(results) == 2:
    result["t_stream_share_of_step"] = round(
        1 - results["without_t_stream"]["step_seconds_median"]
        / results["care"]["step_seconds_median"], 3)
  if "care" in results:
    result.update(_beside_release(args, config, devices, results["care"], retimers["care"]))
  return {**result, "jax": jax.__version__, "jaxlib": jaxlib.__version__, **machine_info()}


# care_jax's precision -> experiments/release_step.py's --amp: the same arithmetic.
RELEASE_AMP = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _beside_release(args, config, devices: int, care: dict, retime=None) -> dict:
  """The release's step on the same batch and arithmetic, timed after ours in a separate
  process (experiments/release_step.py on a checkout in --release_dir), and care_jax's
  pairs/s over the release's; {} where there is nothing to compare with: the release is
  ResNet-50 at 224 px on one device, and its step has no augmentation (--no_augmentation).

  With --rounds=N the two alternate N times (`retime` times our compiled step again) and
  the ratio is the median of each round's: a CPU whose speed drifts over minutes (a shared
  VM's) then moves both sides of a round alike instead of one side of the only one."""
  script = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "release_step.py"
  same_work = (config.model.arch == "resnet50" and config.model.width == 1 and devices == 1
               and config.data.image_size == 224 and args.no_augmentation)
  if not same_work or not script.exists() or not os.path.isfile(
      os.path.join(args.release_dir, "models", "care_module.py")):
    return {}
  command = [sys.executable, str(script), f"--release_dir={args.release_dir}",
             f"--batch={args.batch_per_device}", f"--amp={RELEASE_AMP[config.precision]}",
             f"--steps={args.steps}", f"--warmup={args.warmup}"]
  print("release:", " ".join(command[1:]), flush=True)
  rounds, ours = [], care["step_seconds_median"]
  for i in range(args.rounds):
    if i:
      ours = retime()
      print(f"care (round {i + 1}): median step {1000 * ours:.1f} ms", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
      return {"release": {"command": " ".join(command[1:]),
                          "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}}
    release = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = release["step_seconds_median"] / ours
    rounds.append({"care_step_seconds": round(ours, 4),
                   "release_step_seconds": release["step_seconds_median"],
                   "care_over_release": round(ratio, 3)})
    print(f"release: {release['image_pairs_per_sec']} image pairs/s, median step "
          f"{1000 * release['step_seconds_median']:.1f} ms; care_jax / release: {ratio:.2f}x",
          flush=True)
  ratio = statistics.median(r["care_over_release"] for r in rounds)
  out = {"release": release, "care_over_release": round(ratio, 3)}
  if args.rounds > 1:
    print(f"care_jax / release over {args.rounds} rounds: median {ratio:.2f}x", flush=True)
    out["rounds"] = rounds
  return out


def _check_step_args(args) -> list:
  """The variants to time; the arguments' mistakes before any compilation."""
  for name, least in (("batch_per_device", 1), ("steps", 1), ("warmup", 0),
                      ("profile_steps", 0), ("rounds", 1)):
    if getattr(args, name) < least:
      raise UserError(f"--{name} must be at least {least}, got {getattr(args, name)}.")
  if args.peak_tflops < 0:
    raise UserError(f"--peak_tflops must be positive, got {args.peak_tflops}.")
  variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in variants if v not in ("care", "without_t_stream")]
  if unknown or not variants:
    raise UserError(f"--variants takes care and/or without_t_stream, comma-separated; got "
                    f"{args.variants!r}.")
  _config(args)  # An unknown preset or field stops here, before any compilation.
  return variants


def _step_config(args, variant: str, devices: int):
  config = _config(args)
  config.global_batch_size = args.batch_per_device * devices
  if variant == "without_t_stream":
    config.model.t_stream.num_blocks = 0
  return config


def _measure_step(args, variant: str, mesh, peak, first: bool) -> tuple:
  """(One variant's figures, a function that times its compiled step again); the device's
  peak memory only for the first variant (one a process)."""
  import jax
  import numpy as np

  from care_jax import parallel, summary
  from care_jax.training import pretraining

  devices = mesh.devices.size
  config = _step_config(args, variant, devices)
  setup = pretraining.build(config, steps_per_epoch=1000, total_steps=100000)
  state = setup.init_state(jax.random.key(0), parallel.replicated(mesh))
  size = config.data.image_size
  crops = np.random.default_rng(0).integers(
      0, 256, (config.global_batch_size, size, size, 3), dtype=np.uint8)
  batch = parallel.host_to_global(mesh, {"view1": crops, "view2": crops})
  start = time.perf_counter()
  lowered = setup.jitted_step(mesh, augmentation=not args.no_augmentation).lower(state, batch)
  train_step = lowered.compile(
      compiler_options=pretraining.FAST_COMPILE if args.fast_compile else None)
  compile_seconds = time.perf_counter() - start
  # Before any step: the state, plus whatever compilation (GPU autotuning) held at once.
  peak_before = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  def time_steps() -> float:
    """The median time of --steps steps after --warmup untimed ones."""
    nonlocal state, metrics
    times = []
    for _ in range(args.warmup + args.steps):
      start = time.perf_counter()
      state, metrics = train_step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    return float(np.median(times[args.warmup:]))

  metrics = {}
  median = time_steps()
  if args.profile_dir and first and args.profile_steps:
    with jax.profiler.trace(os.path.join(args.profile_dir, variant)):
      for _ in range(args.profile_steps):
        state, metrics = train_step(state, batch)
      jax.block_until_ready(metrics)
  stats = (jax.local_devices()[0].memory_stats() or {}) if first else {}
  figures = _step_figures(config.global_batch_size, median,
                          summary.program_flops(lowered, train_step, devices), peak, devices)
  gib = lambda n: None if n is None else round(n / 2**30, 2)
  return {**figures, "compile_seconds": round(compile_seconds, 1),
          "steps_timed": args.steps, "peak_memory_gib": gib(stats.get("peak_bytes_in_use")),
          "peak_memory_before_first_step_gib": gib(peak_before) if first else None,
          "program_memory_gib": _program_memory(train_step),
          "finite_loss": bool(np.isfinite(np.asarray(metrics["loss"])))
          if "loss" in metrics else None}, time_steps


def _program_memory(compiled) -> Optional[dict]:
  """XLA's buffer sizes of the compiled step (GiB, per device): what the program itself
  needs, apart from the allocator's history."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # not every backend analyses its programs
    return None
  if stats is None:
    return None
  return {name: float(f"{getattr(stats, f'{name}_size_in_bytes') / 2**30:.4g}")
          for name in ("temp", "argument", "output", "alias")}


def _describe(r: dict, peak) -> str:
  """One readable line of a variant's figures."""
  line = (f"{r['image_pairs_per_sec']} image pairs/s, median step "
          f"{r['step_seconds_median'] * 1e3:.1f} ms")
  if r["flops_per_image_pair"] is None:
    line += ", FLOPs unavailable (XLA gave no cost analysis)"
  else:
    line += f", {r['flops_per_image_pair']:.3g} FLOPs/pair, {r['achieved_tflops']} TFLOP/s"
    line += (f" = {100 * r['fraction_of_peak']:.1f}% of {peak:g}" if peak
             else " (card's rate unknown: --peak_tflops)")
  if r["peak_memory_gib"] is not None:
    line += f", peak {r['peak_memory_gib']} GiB"
  return line


def bench_scaling(args) -> dict:
  """Per-device memory and collectives of the programs jitted over the mesh, compiled (not
  run) for each device count at the same per-device batch (care_jax.scaling). On a CPU
  each count is a child process with that many simulated devices; on GPUs the first N
  devices of this machine."""
  import jax

  counts, names = _scaling_arguments(args)
  simulated = jax.default_backend() == "cpu"
  if not simulated and len(jax.devices()) < counts[-1]:
    raise UserError(f"{counts[-1]} devices asked for; this machine has {len(jax.devices())} "
                    f"{jax.default_backend()} devices.")
  reports = {}
  for n in counts:
    reports[n] = _scaling_report(args, n, names, simulated)
    for name, r in reports[n].items():
      reduced = r["collectives"].get("all-reduce", [0, 0])
      print(f"{n} devices, {name}: temp {r['temp_bytes'] / 2**30:.3f} GiB per device, "
            f"all-reduce {reduced[1] / 2**20:.1f} MiB in {reduced[0]}, "
            f"{len(r['moves'])} collectives that move examples", flush=True)
  first = reports[counts[0]]
  ratios = {name: {n: round(reports[n][name]["temp_bytes"] / max(first[name]["temp_bytes"], 1),
                            3) for n in counts} for name in first}
  import jaxlib
  return {"benchmark": "scaling", "config": args.config, "overrides": args.overrides,
          "batch_per_device": args.batch_per_device,
          "device": ("simulated CPU devices" if simulated else jax.devices()[0].device_kind),
          "per_device_temp_relative_to_fewest": ratios,
          "by_device_count": {str(n): r for n, r in reports.items()},
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, **machine_info()}


def _scaling_arguments(args):
  """(sorted device counts, comma-separated program names or '' for all), checked."""
  from care_jax.scaling import PROGRAMS
  try:
    counts = sorted({int(n) for n in args.devices.split(",") if n})
  except ValueError:
    counts = []
  if not counts or counts[0] < 1:
    raise UserError(f"--devices takes device counts, comma-separated (e.g. 1,2,4,8); got "
                    f"{args.devices!r}.")
  if args.batch_per_device < 1:
    raise UserError(f"--batch_per_device must be at least 1, got {args.batch_per_device}.")
  _config(args)
  names = "" if args.programs == "all" else args.programs
  unknown = sorted(set(n for n in names.split(",") if n) - set(PROGRAMS))
  if unknown:
    raise UserError(f"--programs: unknown {unknown}; choose from {', '.join(PROGRAMS)} "
                    "or all.")
  return counts, names


def _scaling_report(args, devices: int, names: str, simulated: bool) -> dict:
  """care_jax.scaling's audit for one device count: in a child process with that many
  simulated CPU devices, or on this machine's first `devices` devices."""
  if not simulated:
    from care_jax import scaling
    return scaling.report_for_devices(_config(args), args.batch_per_device, devices,
                                      [x for x in names.split(",") if x] or None,
                                      args.fast_compile)
  import subprocess
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                       f"--xla_force_host_platform_device_count={devices}".strip())
  out = subprocess.run(
      [sys.executable, "-m", "care_jax.scaling", f"--config={args.config}",
       *(f"--config.{o}" for o in args.overrides), f"--batch_per_device={args.batch_per_device}",
       f"--devices={devices}", f"--programs={names}"]
      + (["--fast_compile"] if args.fast_compile else []),
      env=env, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"compiling for {devices} devices failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _config_argument(p) -> None:
  p.add_argument("--config", default="configs/care.py:r50_100ep",
                 help="FILE:PRESET (presets: configs/care.py); change a field with "
                      "--config.FIELD=VALUE, e.g. --config.precision=bfloat16 "
                      "(docs/config.md)")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m care_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  from care_jax import cli
  presets = dict(epilog=cli.presets_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
  _input_command(commands)
  _step_command(commands, presets)
  _scaling_command(commands, presets)
  return parser


def _input_command(commands) -> None:
  p = commands.add_parser("input", help="host side of the pretraining input pipeline")
  p.add_argument("--images", required=True,
                 help="folder of JPEGs or PNGs (searched recursively)")
  p.add_argument("--make", type=int, default=0,
                 help="first write this many synthetic 500x375 JPEGs into --images")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="decoding threads (= cores used)")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--num_images", type=int, default=2048, help="images to time")
  p.add_argument("--release_images", type=int, default=256,
                 help="images to time the release's transforms on (one core); 0: skip")
  p.set_defaults(run=bench_input)


def _step_command(commands, presets: dict) -> None:
  p = commands.add_parser("step", **presets,
                          help="the jitted train step, with and without the T-stream blocks")
  _config_argument(p)
  p.add_argument("--batch_per_device", type=int, default=128)
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
  p.add_argument("--variants", default="care,without_t_stream",
                 help="comma-separated: care, without_t_stream (in this order of timing; "
                      "peak memory is reported for the first only)")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="the card's matrix rate for the fraction of peak; 0: the datasheet's "
                      "dense bf16 rate on H100 (989 SXM, 756 PCIe) and H200 (989), unknown "
                      "elsewhere")
  p.add_argument("--profile_dir", default="",
                 help="also write a jax.profiler trace of --profile_steps steps here")
  p.add_argument("--profile_steps", type=int, default=3)
  p.add_argument("--fast_compile", action="store_true",
                 help="compile without XLA's backend optimisations: a quicker start and a "
                      "slower step, for smoke tests of this command only")
  p.add_argument("--no_augmentation", action="store_true",
                 help="time the step on normalised crops, without the device augmentation: "
                      "the work the release's step (experiments/release_step.py) is timed on")
  p.add_argument("--rounds", type=int, default=1,
                 help="with the release: time ours and the release's this many times in "
                      "turn and report the median of the rounds' ratios")
  p.add_argument("--release_dir", default="external/CARE",
                 help="a checkout of the authors' release (never committed): with R50 at "
                      "224 px, one device and --no_augmentation, its step is timed after "
                      "ours on the same batch and arithmetic, and the ratio reported")
  p.set_defaults(run=bench_step)


def _scaling_command(commands, presets: dict) -> None:
  p = commands.add_parser("scaling", **presets,
                          help="per-device memory and collectives against the device count "
                               "(compiled, not run)")
  _config_argument(p)
  p.add_argument("--batch_per_device", type=int, default=4)
  p.add_argument("--devices", default="1,2,4,8", help="device counts, comma-separated")
  p.add_argument("--programs", default="pretrain_step",
                 help="comma-separated names of care_jax.scaling.programs, or all")
  p.add_argument("--fast_compile", action="store_true",
                 help="compile without XLA's backend optimisations (other memory figures): "
                      "for smoke tests of this command only")
  p.set_defaults(run=bench_scaling)


# Flags of step and scaling in earlier care_jax versions, and what replaced them.
RENAMED_FLAGS = {"--preset": "--config=configs/care.py:PRESET",
                 "--precision": "--config.precision=PRECISION",
                 "--image_size": "--config.data.image_size=N"}


def main(argv=None) -> None:
  from care_jax import cli
  argv, overrides = cli.split_overrides(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in ("step", "scaling"):
    cli.refuse_old_flags([""] + argv, RENAMED_FLAGS)
  elif overrides:
    cli.fail(f"--config.{overrides[0]}: only `step` and `scaling` take a config.")
  args = _parser().parse_args(argv)
  args.overrides = overrides
  result = {}
  run_safety.run(lambda: result.update(args.run(args)))
  print(json.dumps(result))
  sys.stdout.flush()
  if result.get("error"):  # nothing could be timed: a file to fix, as UserError
    print(f"error: {result['error']}", file=sys.stderr)
    sys.exit(run_safety.EXIT_USER)


if __name__ == "__main__":
  main()
