"""What a run will need, before it starts: memory per device (the training step, the kNN
monitor, each evaluation), memory per host, disk, input rate and time.

  python -m care_jax.plan --config=configs/care.py:r50_100ep --devices=8xV100-16GB
      [--nodes=N] [--config.F=V ...] [--pairs_per_sec=P] [--workdir=DIR] [--json]

Nothing is compiled and nothing allocated: the networks are traced abstractly
(jax.eval_shape). The training step's memory is its arguments (the state and the batch),
its gradients, and activations per image pair scaled from what XLA:GPU's compiled R50 step
needs on an H100 (the one GPU measured) by the ratio of this config's backward-pass
residuals to R50's: docs/scale.md says how, and how close it comes.
Exit status 0 when the run fits, 2 with one line saying what does not and what to change.
"""
import dataclasses
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp

from care_jax.errors import UserError

GiB = 2**30
# XLA:GPU's temporaries of the R50 224 px training step for one H100, GiB at 128 and 256
# image pairs (experiments/gpu_compile.py). Where they come from and how they compare with
# the one H100 measurement: docs/scale.md, "How the estimates are made".
GPU_TEMP_GIB = {"bfloat16": (12.05, 24.01), "float32": (26.34, 52.62)}
# float16 compiles like bfloat16, but its one H100 run peaked at 41.9 GiB against
# bfloat16's 12.9 (docs/scale.md): its temporaries are scaled by that until a GPU says
# otherwise.
FLOAT16_EXCESS = (41.9 - 12.9 + 12.05) / 12.05
# Bytes per pair of the backward pass's residuals of the same R50 step (`trace`, as the
# step is since both views share one pass; GPU_TEMP_GIB is the step's before, until an
# H100 measures the new one: docs/scale.md): the unit in which other trunks, widths and
# image sizes are scaled.
REFERENCE_RESIDUALS = {"bfloat16": 303_439_360, "float32": 391_262_016}
# XLA:GPU's temporaries over this model's at 64 bfloat16 pairs (gpu_compile.py --preset;
# docs/scale.md): the residuals undercount the deeper trunks'.
DEPTH_CORRECTION = {"resnet101": 9.73 / 8.90, "resnet152": 13.75 / 12.12}
# Image pairs per second of one H100 on the R50 bfloat16 step at 128 pairs
# (docs/benchmarks.md).
H100_PAIRS_PER_SEC = 1416
# Relative speed on ResNet training, from NVIDIA's published ResNet-50 throughputs (mixed
# precision): estimates, not measurements; --pairs_per_sec replaces them.
GPU_SPEED = {"H200": 1.1, "H100": 1.0, "A100": 0.5, "L40S": 0.45, "A10": 0.2, "V100": 0.25}
PRECISION_SPEED = {"bfloat16": 1.0, "float16": 1495 / 1416, "float32": 0.45}
# Images one core decodes and crops into two 224 px views (`bench input`: README,
# Benchmarks).
IMAGES_PER_CORE = 650
PROCESS_BASE_GIB = 2.0  # python, jax, tensorflow and tfds loaded (docs/scale.md)
DATASETS = {  # name: (train, eval, classes, prepared GiB): for datasets not prepared here
    "imagenet2012": (1_281_167, 50_000, 1000, 150),
    "imagenet2012_subset/1pct": (12_811, 50_000, 1000, 8),
    "imagenet2012_subset/10pct": (128_116, 50_000, 1000, 20),
    "fashion_mnist": (60_000, 10_000, 10, 0.04), "fashion_mnist_idx": (60_000, 10_000, 10, 0.03)}


@dataclasses.dataclass(frozen=True)
class Devices:
  count: int  # per node
  name: str
  memory_gib: float

  @classmethod
  def parse(cls, spec: str) -> "Devices":
    match = re.fullmatch(r"(?:(\d+)x)?([A-Za-z0-9]+)-(\d+(?:\.\d+)?)GB", spec.strip())
    if not match:
      raise UserError(f"--devices={spec!r}: write COUNTxNAME-MEMORYGB, e.g. 8xV100-16GB, "
                      f"8xA100-40GB, 8xH100-80GB (any name; {', '.join(GPU_SPEED)} have a "
                      f"speed estimate).")
    return cls(int(match[1] or 1), match[2].upper(), float(match[3]))

  def usable_gib(self) -> float:
    """JAX's allocator takes XLA_PYTHON_CLIENT_MEM_FRACTION of the card (default 0.75)."""
    return self.memory_gib * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75))


def tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _dataset(config):
  """(train examples, eval examples, classes, prepared GiB) of config.data."""
  if config.data.name in DATASETS:
    return DATASETS[config.data.name]
  from care_jax.data import input_pipeline
  info = input_pipeline.dataset_info(config.data)
  return info.num_train_examples, info.num_eval_examples, info.num_classes, 0.0


def _residuals(fn, params, *inputs):
  """Shapes of what the backward pass of `fn` with respect to `params` keeps: the leaves
  of its vjp function."""
  return jax.tree.leaves(jax.eval_shape(
      lambda p, *x: jax.vjp(lambda q: fn(q, *x), p, has_aux=True)[1], params, *inputs))


def _per_example(small, large, extra: int):
  """(bytes per example of all residuals, of the largest one): from two traces that
  differ by `extra` examples."""
  growth = [tree_bytes(b) - tree_bytes(a) for a, b in zip(small, large)]
  return sum(growth) / extra, max(growth) / extra


@dataclasses.dataclass(frozen=True)
class Networks:
  """What a config's networks need, traced once (bytes)."""
  state: int  # the training state: online, target, momentum, probe, BN statistics
  online_params: int  # = their gradients
  trunk: int  # trunk params + BN statistics (what evaluations load)
  feature_dim: int
  residuals_per_pair: float  # the step's backward-pass residuals per image pair
  largest_per_image: float  # its largest single activation per image
  finetune_residuals_per_image: float  # trunk + linear head, one view
  precision: str  # of the residuals: float16 is traced as bfloat16 (same sizes)
  arch: str


def trace(config, num_classes: int) -> Networks:
  """Traces the training step's and the fine-tuning step's backward passes at 2 and 4
  examples per device (a one-device mesh), so the per-example growth is exact."""
  from care_jax.models import cpu_conv
  with cpu_conv.xla_forms():  # the program of a GPU, wherever this runs
    return _trace(config, num_classes)


def _trace(config, num_classes: int) -> Networks:
  from care_jax import parallel
  from care_jax.evaluation import classifier
  from care_jax.training import pretraining, train_step
  from care_jax.training.online_probe import OnlineProbe
  config = config.copy_and_resolve_references()
  precision = "bfloat16" if config.precision == "float16" else config.precision
  config.precision = precision
  config.model.t_stream.bn_group_size = 0  # groups do not change the memory
  probe = (OnlineProbe(num_classes, 1e-2, 1) if config.monitor.online_probe
           and num_classes > 1 else None)
  setup = pretraining.build(config, steps_per_epoch=1, total_steps=1, probe=probe)
  state = setup.abstract_state()
  mesh = parallel.create_mesh(jax.devices()[:1])
  size = config.data.image_size

  def step_residuals(pairs):
    views = jax.ShapeDtypeStruct((2, pairs, size, size, 3), jnp.float32)
    loss = lambda params, state, views: train_step.care_objective(
        params, state.target_params, state.online_stats, state.target_stats, views,
        online_net=setup.online_net, target_net=setup.target_net, cross_weight=1.0,
        mesh=mesh)
    return _residuals(loss, state.online_params, state, views)

  per_pair, largest = _per_example(step_residuals(2), step_residuals(4), 2)
  model = classifier.classifier_model(setup.online_net.trunk, max(num_classes, 2), precision)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, size, size, 3)), train=False))

  def finetune_residuals(images):
    x = jax.ShapeDtypeStruct((images, size, size, 3), jnp.float32)
    logits = lambda params, stats, x: model.apply(
        {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    return _residuals(logits, variables["params"], variables["batch_stats"], x)

  finetune_per_image, _ = _per_example(finetune_residuals(2), finetune_residuals(4), 2)
  features = jax.eval_shape(lambda v: setup.online_net.apply(
      v, jnp.zeros((1, size, size, 3)), method=setup.online_net.trunk_features),
      {"params": state.online_params, "batch_stats": state.online_stats})
  return Networks(tree_bytes(state), tree_bytes(state.online_params),
                  tree_bytes((state.online_params["trunk"], state.online_stats["trunk"])),
                  features.shape[-1], per_pair, largest / 2, finetune_per_image, precision,
                  config.model.arch)


def _activations(networks: Networks, precision: str, per_example: float) -> float:
  """Bytes XLA:GPU needs per example, for `per_example` residual bytes (see GPU_TEMP_GIB)."""
  t128, t256 = GPU_TEMP_GIB[networks.precision]
  ratio = (per_example / REFERENCE_RESIDUALS[networks.precision]
           * DEPTH_CORRECTION.get(networks.arch, 1.0))
  return (t256 - t128) / 128 * GiB * ratio * (FLOAT16_EXCESS if precision == "float16" else 1)


@dataclasses.dataclass
class Plan:
  rows: list  # (section, what, figure, basis)
  limits: list  # (what, needed, available, unit, what to change): checked against each other

  def add(self, section, what, figure, basis):
    self.rows.append((section, what, figure, basis))

  def failures(self) -> list:
    return [limit for limit in self.limits if limit[2] is not None and limit[1] > limit[2]]

  def first_failure_line(self) -> str:
    what, need, have, unit, change = self.failures()[0]
    return f"{what} needs {need:.1f} {unit}, {have:.1f} {unit} available: {change}."


def _gib(x: float) -> str:
  return f"{x / GiB:.2f} GiB"


def device_memory(config, networks: Networks, devices: int, train_examples: int) -> dict:
  """Bytes per device: name -> (bytes, basis), for the training step, the kNN monitor,
  linear evaluation and fine-tuning, at this config's batches over `devices` devices."""
  size, precision = config.data.image_size, config.precision
  pairs = config.global_batch_size // devices
  activations = _activations(networks, precision, networks.residuals_per_pair)
  batch = pairs * 2 * size * size * 3  # uint8 crops
  step = networks.state + batch + networks.online_params + pairs * activations
  out = {"training step": (step, (
      f"state {_gib(networks.state)} + gradients {_gib(networks.online_params)} + {pairs} "
      f"pairs x {activations / 2**20:.0f} MiB of activations ({precision})"))}
  forward = 3 * networks.largest_per_image  # a layer's input, output and one temporary
  images = -(-1024 // devices)  # features._IMAGES_PER_PASS per device
  m = config.monitor
  bank = train_examples if m.knn_bank_size <= 0 else min(m.knn_bank_size, train_examples)
  shard = bank * (networks.feature_dim * 4 + 5) / devices
  similarities = 2 * images * devices * (bank / devices) * 4
  off = "" if m.every_steps > 0 and m.knn else "; off in this config (monitor.every_steps)"
  out["kNN monitor"] = (networks.state + shard + similarities + images * forward, (
      f"state + {bank:,}-example bank / {devices} ({_gib(shard)}) + similarities of "
      f"{images * devices} queries ({_gib(similarities)}){off}"))
  lin = config.linear_eval
  lin_images = max(lin.global_batch_size // devices, 1)
  cache = train_examples * (networks.feature_dim * 4 + 4) / devices
  encoder = networks.trunk + max(lin_images, images) * forward
  out["linear evaluation"] = (encoder + (0 if lin.augment else cache), (
      f"encoder + forward passes; augment={lin.augment}"))
  out[f"linear, augment={not lin.augment}"] = (encoder + (cache if lin.augment else 0), (
      "the other choice" + (f": + cached features / {devices} ({_gib(cache)})"
                            if lin.augment else "")))
  ft = config.finetune
  ft_images = max(ft.global_batch_size // devices, 1)
  ft_activations = _activations(networks, precision, networks.finetune_residuals_per_image)
  out["fine-tuning"] = (3 * networks.trunk + ft_images * ft_activations, (
      f"trunk, momentum, gradients + {ft_images} images x "
      f"{ft_activations / 2**20:.0f} MiB of activations"))
  return out


REFERENCE_FLOPS_PER_PAIR = 9.308e10  # the R50 224 px step (python -m care_jax.summary)


def pairs_per_second(config, devices: Devices) -> tuple:
  """(image pairs/s per device, basis), or (None, why not)."""
  from care_jax import summary
  from care_jax.training import pretraining
  if devices.name not in GPU_SPEED:
    return None, f"no speed estimate for {devices.name}: pass --pairs_per_sec"
  setup = pretraining.build(config, steps_per_epoch=1, total_steps=1)
  flops = summary.train_step_flops(setup, setup.abstract_state())
  if flops is None:
    return None, "XLA gave no FLOP count here: pass --pairs_per_sec"
  rate = (H100_PAIRS_PER_SEC * REFERENCE_FLOPS_PER_PAIR / flops * GPU_SPEED[devices.name]
          * PRECISION_SPEED[config.precision])
  return rate, (f"H100 measured {H100_PAIRS_PER_SEC}/s on R50 bf16, x {devices.name} "
                f"{GPU_SPEED[devices.name]} x {config.precision} "
                f"{PRECISION_SPEED[config.precision]:.2f} x FLOPs {flops:.3g}/pair: estimate")


def host_and_disk(config, networks: Networks, devices: Devices, nodes: int, dataset,
                  steps_per_sec) -> tuple:
  """([(section, what, bytes or figure, basis)], {what: bytes}) per host (one process)."""
  from care_jax.data import input_pipeline
  from care_jax.evaluation import features
  train, evals, _, prepared_gib = dataset
  size, local = config.data.image_size, config.global_batch_size // nodes
  decoded = (input_pipeline._PREFETCH_STEPS + 1) * local * 2 * size * size * 3
  view_bytes = size * size * 3
  bank = train if config.monitor.knn_bank_size <= 0 else min(config.monitor.knn_bank_size,
                                                             train)
  caches = 0
  if config.monitor.every_steps > 0:
    caches = sum(min(n * view_bytes / nodes, features._CACHE_BYTES) for n in (evals, bank))
  host = PROCESS_BASE_GIB * GiB + decoded + caches + networks.state
  rows = [("host", "memory per process", _gib(host), (
      f"{PROCESS_BASE_GIB} GiB of libraries + {input_pipeline._PREFETCH_STEPS + 1} "
      f"batches of {local} pairs ({_gib(decoded)}) + monitor's decoded views "
      f"({_gib(caches)}) + one checkpoint's copy ({_gib(networks.state)})"))]
  kept = config.keep_checkpoints + 1
  disk = networks.state * kept
  rows.append(("disk", "checkpoints", _gib(disk),
               f"{kept} x {_gib(networks.state)} (keep_checkpoints + the one being written)"))
  rows.append(("disk", "prepared dataset", f"{prepared_gib:g} GiB", config.data.name))
  save = networks.state / (DISK_MB_PER_SEC * 1e6)
  interval = (f", every {config.checkpoint_every_steps / steps_per_sec / 60:.0f} min"
              if steps_per_sec else "")
  rows.append(("disk", "one save", f"{save:.1f} s",
               f"at {DISK_MB_PER_SEC} MB/s{interval}"))
  return rows, {"host": host, "disk": disk}


DISK_MB_PER_SEC = 500  # a local SSD or a good network file system; NVMe: 2,000+


def _changes(config, pairs: int, device_name: str = "") -> dict:
  """What to change when each figure does not fit."""
  precision = ("" if config.precision == "bfloat16" or device_name == "V100" else
               "--config.precision=bfloat16, ")
  return {
      "training step": f"fewer pairs per device ({pairs} now: more devices or --nodes), "
                       f"{precision}or XLA_PYTHON_CLIENT_MEM_FRACTION=0.95",
      "kNN monitor": "a smaller --config.monitor.knn_bank_size, or --config.monitor.knn=False",
      "linear evaluation": ("--config.linear_eval.augment=True (no feature cache) or more "
                            "devices" if not config.linear_eval.augment else
                            "a smaller --config.linear_eval.global_batch_size"),
      "fine-tuning": f"a smaller --config.finetune.global_batch_size, {precision}or more devices",
      "host": "more hosts, or a smaller --config.monitor.knn_bank_size",
      "disk": "a smaller --config.keep_checkpoints, or a workdir on a bigger disk"}


def make_plan(config, devices: Devices, nodes: int = 1, pairs_per_sec=None,
              host_memory_gib=None, workdir=None) -> Plan:
  from care_jax.errors import check_positive
  check_positive(nodes, "--nodes")
  total = devices.count * nodes
  if config.global_batch_size % total:
    raise UserError(f"global_batch_size {config.global_batch_size} does not divide over "
                    f"{total} devices: plan for a device count that divides it, or set "
                    f"--config.global_batch_size to a multiple of {total}.")
  dataset = _dataset(config)
  networks = trace(config, dataset[2])
  plan, pairs = Plan([], []), config.global_batch_size // total
  changes = _changes(config, pairs, devices.name)
  usable = devices.usable_gib()
  monitor_on = config.monitor.every_steps > 0 and config.monitor.knn
  for what, (need, basis) in device_memory(config, networks, total, dataset[0]).items():
    plan.add(f"per device ({usable:.1f} GiB usable)", what, _gib(need), basis)
    if what in changes and (what != "kNN monitor" or monitor_on):
      plan.limits.append((what, need / GiB, usable, "GiB", changes[what]))
  basis = "--pairs_per_sec"
  if pairs_per_sec is None:
    pairs_per_sec, basis = pairs_per_second(config, devices)
  steps_per_sec = (None if pairs_per_sec is None
                   else pairs_per_sec * total / config.global_batch_size)
  rows, needs = host_and_disk(config, networks, devices, nodes, dataset, steps_per_sec)
  plan.rows.extend(rows)
  host_have = host_memory_gib or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
  plan.limits.append(("host memory", needs["host"] / GiB, host_have, "GiB", changes["host"]))
  if workdir:
    import shutil
    free = shutil.disk_usage(_existing_parent(workdir)).free / GiB
    plan.limits.append(("disk", needs["disk"] / GiB, free, "GiB", changes["disk"]))
  _input_and_time(plan, config, dataset[0], nodes, total, pairs_per_sec, basis)
  return plan


def _existing_parent(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def _input_and_time(plan, config, train_examples, nodes, total, pairs_per_sec, basis):
  steps_per_epoch = train_examples // config.global_batch_size
  steps = (config.num_train_steps if config.num_train_steps > 0
           else int(config.num_epochs * steps_per_epoch))
  if pairs_per_sec is None:
    plan.add("time", "pairs/s per device", "unknown", basis)
    return
  per_host = pairs_per_sec * total / nodes
  cores = per_host / IMAGES_PER_CORE
  plan.add("input", "images/s per host", f"{per_host:,.0f}",
           f"{total // nodes} devices x {pairs_per_sec:,.0f} pairs/s")
  plan.add("input", "host cores for decoding", f"{cores:.0f} (this host: {os.cpu_count()})",
           f"{IMAGES_PER_CORE} images/s per core (`bench input`, 224 px)")
  plan.add("time", "pairs/s per device", f"{pairs_per_sec:,.0f}", basis)
  epoch = steps_per_epoch * config.global_batch_size / (pairs_per_sec * total)
  plan.add("time", "one epoch", f"{epoch / 3600:.2f} h", f"{steps_per_epoch:,} steps")
  plan.add("time", "the run", f"{steps / steps_per_epoch * epoch / 3600:.1f} h",
           f"{steps:,} steps, pretraining only")


def device_limit_bytes():
  """What JAX's allocator may use on this process's first device; None where it does not
  say (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return (stats or {}).get("bytes_limit")


def check_fits(config, mesh, num_train_examples: int, num_classes: int) -> None:
  """Raises UserError before the first step when the training step or the kNN monitor
  would not fit in device memory (the plan's estimate); nothing where the device does not
  report its memory."""
  limit = device_limit_bytes()
  if limit is None:
    return
  networks = trace(config, num_classes)
  memory = device_memory(config, networks, mesh.devices.size, num_train_examples)
  kind = jax.local_devices()[0].device_kind  # e.g. 'Tesla V100-SXM2-16GB'
  changes = _changes(config, config.global_batch_size // mesh.devices.size,
                     "V100" if "V100" in kind else "")
  monitor_on = config.monitor.every_steps > 0 and config.monitor.knn
  checked = ("training step", "kNN monitor") if monitor_on else ("training step",)
  for what in checked:
    if what in memory and memory[what][0] > limit:
      raise UserError(f"the {what} would need about {memory[what][0] / GiB:.1f} GiB per "
                      f"device ({memory[what][1]}), the device allows {limit / GiB:.1f} GiB: "
                      f"{changes[what]}. `python -m care_jax.plan` says more.")


def render(plan: Plan, config, devices: Devices, nodes: int) -> str:
  arch = config.model.arch + (f" {config.model.width}x" if config.model.width > 1 else "")
  lines = [f"CARE {arch}, {config.data.image_size} px, {config.precision}, batch "
           f"{config.global_batch_size} on {nodes} x {devices.count} {devices.name}-"
           f"{devices.memory_gib:g}GB ({config.data.name})"]
  section = None
  for where, what, figure, basis in plan.rows:
    if where != section:
      lines.append(f"\n{where}")
      section = where
    lines.append(f"  {what:<26}{figure:>18}   {basis}")
  failures = plan.failures()
  lines.append("\nfits" if not failures else "\ndoes not fit: " + "; ".join(
      f"{what} ({need:.1f} > {have:.1f} {unit})" for what, need, have, unit, _ in failures))
  return "\n".join(lines)


def main(argv):
  from absl import flags
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  config, f = flags.FLAGS.config, flags.FLAGS
  devices = Devices.parse(f.devices)
  plan = make_plan(config, devices, f.nodes, f.pairs_per_sec, f.host_memory_gib, f.workdir)
  failures = plan.failures()
  step = next(float(figure.split()[0]) for _, what, figure, _ in plan.rows
              if what == "training step")
  if f.json:
    print(json.dumps({"fits": not failures, "device_step_gib": step,
                      "rows": [dict(zip(("section", "what", "figure", "basis"), row))
                               for row in plan.rows],
                      "failures": [dict(zip(("what", "needs", "available", "unit", "change"),
                                            failure)) for failure in failures]}))
  else:
    print(render(plan, config, devices, f.nodes))
  if failures:
    print(f"error: {plan.first_failure_line()}", file=sys.stderr)
    sys.exit(2)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("devices", "8xH100-80GB", "devices per node: COUNTxNAME-MEMORYGB")
  flags.DEFINE_integer("nodes", 1, "nodes (one process each)")
  flags.DEFINE_float("pairs_per_sec", None, "measured image pairs/s per device "
                     "(`python -m care_jax.bench step`); default: an estimate")
  flags.DEFINE_float("host_memory_gib", None, "each host's RAM; default: this machine's")
  flags.DEFINE_bool("json", False, "print one JSON object instead of the table")


if __name__ == "__main__":
  from absl import app

  from care_jax import cli
  from care_jax import main as care_main  # --config, --workdir and their parsing
  _define_flags()

  def run(argv):
    try:
      main(argv)
    except UserError as e:
      cli.fail(str(e))
  app.run(run, flags_parser=care_main.parse_flags)
