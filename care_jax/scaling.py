"""What each program jitted over the mesh asks of every device as the device count grows:
its memory and its collectives, read from the compiled program (nothing runs).

Data parallelism means a device computes only its own examples: the per-device memory of a
program stays that of one device at the same per-device batch, and the collectives are
all-reduces (gradients, BatchNorm statistics, counts), plus kNN's, which moves each batch
of queries and their candidates to the sharded bank (never the bank). Any other all-gather,
all-to-all or collective-permute moves examples' activations between devices: what
`python -m care_jax.bench scaling` and tests/test_scaling.py look for.
"""
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from care_jax import parallel
from care_jax.evaluation import classifier, features, finetune, knn, linear, monitor
from care_jax.training import pretraining
from care_jax.training.online_probe import OnlineProbe

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVE = re.compile(r"= (?P<shape>\([^)]*\)|\S+) (?P<kind>all-gather|all-reduce|all-to-all|"
                         r"collective-permute|reduce-scatter)(?:-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Collectives that move examples' data between devices; the data-parallel programs have
# none of them.
MOVES_EXAMPLES = ("all-gather", "all-to-all", "collective-permute")
PROGRAMS = ("pretrain_step", "trunk_features", "knn_count", "online_probe_count",
            "linear_step", "linear_epoch_on_cached_features", "linear_counts",
            "finetune_step", "finetune_logits")


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str  # all-gather, all-reduce, ...
  shapes: tuple  # of the result: ((dtype, (dims...)), ...)
  bytes: int  # of the result, per device
  op_name: str  # the JAX operation it came from

  def describe(self) -> str:
    shapes = ", ".join(f"{d}[{','.join(map(str, dims))}]" for d, dims in self.shapes)
    return f"{self.kind} {shapes} ({self.op_name})"


def collectives(hlo_text: str) -> list:
  """Every collective of a compiled program's HLO text (compiled.as_text())."""
  found = []
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    shapes = tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
                   for dtype, dims in _ARRAY.findall(match["shape"]))
    size = sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(dims) for dtype, dims in shapes)
    op_name = _OP_NAME.search(line)
    found.append(Collective(match["kind"], shapes, size, op_name[1] if op_name else ""))
  return found


def _abstract(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      tree)


def programs(config, mesh, batch_per_device: int, num_classes: int = 1000,
             cached_examples: int = 1024) -> dict:
  """name -> (jitted program, abstract arguments) for every program that pretraining and
  the evaluations jit over `mesh`, at `batch_per_device` examples per device. The kNN
  bank and linear evaluation's cached features hold `cached_examples` examples (the same
  for any device count: they are a dataset's, not a batch's), sharded over the devices."""
  devices = mesh.devices.size
  batch = batch_per_device * devices
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  size = config.data.image_size
  array = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  images = array((batch, size, size, 3), jnp.uint8, sharded)
  labels, mask = array((batch,), jnp.int32, sharded), array((batch,), jnp.bool_, sharded)

  config = config.copy_and_resolve_references()
  config.global_batch_size = batch
  probe = OnlineProbe(num_classes, config.monitor.online_probe_lr, 100_000)
  setup = pretraining.build(config, steps_per_epoch=1000, total_steps=100_000, probe=probe)
  state = _abstract(setup.abstract_state(), replicated)
  out = {"pretrain_step": (setup.jitted_step(mesh),
                           (state, {"view1": images, "view2": images, "label": labels}))}

  encoder = {"params": state.online_params, "batch_stats": state.online_stats}
  embed = features.trunk_features_fn(setup.online_net, mesh)
  feature = jax.eval_shape(embed, encoder, images)
  feats = array(feature.shape, jnp.float32, sharded)
  out["trunk_features"] = (embed, (encoder, images))
  stacked = NamedSharding(mesh, P(None, parallel.DATA_AXIS))  # features.stack_batches
  batches = -(-cached_examples // batch)
  cache = array((batches, batch, feature.shape[-1]), jnp.float32, stacked)
  cache_labels = array((batches, batch), jnp.int32, stacked)
  out["knn_count"] = (
      knn.count_fn(mesh, k=config.monitor.knn_k, temperature=config.monitor.knn_temperature,
                   num_classes=num_classes),
      (feats, labels, mask, cache, cache_labels, array((batches, batch), jnp.bool_, stacked)))
  out["online_probe_count"] = (monitor.probe_count_fn(probe, mesh),
                               (state.probe.params, feats, labels, mask))

  tx = optax.sgd(0.1, momentum=0.9)
  head = linear.LinearHead(num_classes)
  head_train, head_epoch, head_counts = linear.head_programs(head, tx, mesh)
  head_state = _abstract(jax.eval_shape(lambda: _classifier_state(
      head.init(jax.random.key(0), jnp.zeros((2, feature.shape[-1])), train=False), tx)),
      replicated)
  out["linear_step"] = (head_train, (head_state, feats, labels))
  out["linear_epoch_on_cached_features"] = (head_epoch, (
      head_state, cache, cache_labels, array((4, batch), jnp.int32, replicated)))
  out["linear_counts"] = (head_counts, (head_state, feats, labels, mask))

  model = classifier.classifier_model(setup.online_net.trunk, num_classes, config.precision)
  tune_train, tune_logits, _ = finetune.programs(model, tx, mesh)
  tune_state = _abstract(jax.eval_shape(lambda: _classifier_state(
      model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False), tx)),
      replicated)
  out["finetune_step"] = (tune_train, (tune_state, images, labels))
  out["finetune_logits"] = (tune_logits, (tune_state, images))
  return out


def _classifier_state(variables, tx):
  return classifier.initial_state(variables["params"], variables["batch_stats"], tx)


def audit(config, mesh, batch_per_device: int, names=None, compiler_options=None,
          **kwargs) -> dict:
  """name -> {temp_bytes, argument_bytes, collectives: {kind: [count, bytes]}, moves:
  [descriptions of the collectives that move examples]} of each program (or `names`)."""
  unknown = set(names or ()) - set(PROGRAMS)
  if unknown:
    raise ValueError(f"unknown programs {sorted(unknown)}; choose from {PROGRAMS}")
  report = {}
  for name, (program, args) in programs(config, mesh, batch_per_device, **kwargs).items():
    if names and name not in names:
      continue
    compiled = program.lower(*args).compile(compiler_options=compiler_options)
    memory = compiled.memory_analysis()
    found = collectives(compiled.as_text())
    totals = {}
    for c in found:
      count, size = totals.get(c.kind, (0, 0))
      totals[c.kind] = (count + 1, size + c.bytes)
    report[name] = {
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "collectives": {kind: list(v) for kind, v in sorted(totals.items())},
        "moves": [c.describe() for c in found if c.kind in MOVES_EXAMPLES]}
  return report


def report_for_devices(config, batch_per_device: int, devices: int, names,
                       fast_compile: bool = False) -> dict:
  """The audit of `names` on a mesh of this process's first `devices` devices."""
  if len(jax.devices()) < devices:
    raise ValueError(f"{devices} devices asked for, {len(jax.devices())} present")
  mesh = parallel.create_mesh(jax.devices()[:devices])
  return audit(config, mesh, batch_per_device, names=names,
               compiler_options=pretraining.FAST_COMPILE if fast_compile else None)


def main(argv=None) -> None:
  """One device count of `python -m care_jax.bench scaling`, in a process of its own (XLA
  fixes a CPU's number of simulated devices when it starts): prints its audit as JSON."""
  import argparse
  import json
  import sys

  from care_jax import cli
  argv, overrides = cli.split_overrides(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(prog="python -m care_jax.scaling")
  p.add_argument("--config", required=True, help="FILE:PRESET; --config.FIELD=VALUE too")
  p.add_argument("--batch_per_device", type=int, required=True)
  p.add_argument("--devices", type=int, required=True)
  p.add_argument("--programs", default="", help="comma-separated; empty: all")
  p.add_argument("--fast_compile", action="store_true")
  args = p.parse_args(argv)
  names = [n for n in args.programs.split(",") if n] or None
  config = cli.config_from_spec(args.config, overrides)
  print(json.dumps(report_for_devices(config, args.batch_per_device, args.devices, names,
                                      args.fast_compile)))


if __name__ == "__main__":
  main()
