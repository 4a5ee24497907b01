"""`make demo`: CARE on real Fashion-MNIST, judged by linear probes.

The preset follows the machine: `fmnist_gpu` (100 epochs in bfloat16) when JAX sees a GPU,
else `fmnist_demo` (half an epoch, minutes on a CPU); --config=configs/care.py:PRESET
chooses, and --config.FIELD=VALUE changes a field, as for care_jax.main.
Stages: (1) pretrain, with the kNN monitor and online probe reporting top-1 on the test
split as it trains; (2) linear evaluation of its encoder, of the same encoder at random
initialisation and of raw pixels, all under one protocol; (3) the accuracies, printed,
written to WORKDIR/results.json, and what they show.

--max_pretrain_seconds stops the pretraining early through the trainer's stop path
(the checkpoint of the step reached is saved), and the probes run on it, so a lease of
fixed length always ends with results.

Each finished stage is recorded in WORKDIR/demo_stages.json. A SIGTERM (a scheduler's, or
a device lease's end) stops the demo where it is with exit status 75 and WORKDIR/PREEMPTED;
the same command then keeps the finished stages and resumes the one it was in from its
checkpoint.
"""
import datetime
import json
import pathlib
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from care_jax import cli, errors, run_safety

STAGES = (
    ("pretrained", "linear_top1", "the CARE-pretrained encoder"),
    ("random_init", "random_init_linear_top1", "the same encoder at random initialisation"),
    ("raw_pixels", "raw_pixels_linear_top1", "raw pixels (no encoder)"),
)
# The GPU preset's bar: probe top-1, and its margins over the two baselines.
GPU_TARGETS = {"top1": 0.90, "over_random_init": 0.08, "over_raw_pixels": 0.06}


def banner(text: str) -> None:
  print(f"\n=== {text} ===", flush=True)


def choose_preset(preset: str) -> str:
  if preset != "auto":
    return preset
  import jax  # noqa: PLC0415
  return "fmnist_gpu" if jax.default_backend() == "gpu" else "fmnist_demo"


def pretrain(config, workdir: pathlib.Path, steps_per_epoch: int, total_steps: int,
             max_seconds: float, safety: run_safety.RunSafety) -> dict:
  """Pretrains; returns the epochs reached, whether the time limit stopped it, and the
  last kNN / online-probe top-1 with the epoch they were measured at. A scheduler's SIGTERM
  stops it (run_safety.Stopped) with the checkpoint saved."""
  from care_jax import plot, train  # noqa: PLC0415
  with safety.time_limit(max_seconds):
    try:
      train.pretrain(config, str(workdir), safety)
      steps, stopped = total_steps, False
    except run_safety.Stopped as e:
      if e.source != run_safety.TIME_LIMIT:
        raise
      # None or the last step: the limit ran out in an evaluation after the last step.
      steps = total_steps if e.step is None else e.step
      stopped = steps < total_steps
  out = {"pretrain_epochs": round(steps / steps_per_epoch, 3),
         "pretrain_scheduled_epochs": round(total_steps / steps_per_epoch, 3),
         "pretrain_stopped_by_time_limit": stopped}
  scalars = plot.read_scalars(str(workdir))
  rates = [rate for _, rate in scalars.get("images_per_sec", [])[1:]]  # [0]: compilation
  if rates:  # image pairs: each example is two views
    out["pretrain_pairs_per_sec_median"] = round(float(np.median(rates)), 1)
  for key in ("knn_top1", "online_probe_top1"):
    if scalars.get(key):
      step, value = scalars[key][-1]
      out[key], out[key.replace("top1", "epoch")] = value, round(step / steps_per_epoch, 3)
      out[key.replace("top1", "curve")] = [[round(s / steps_per_epoch, 3), round(v, 4)]
                                           for s, v in scalars[key]]
  return out


class StageRecord:
  """WORKDIR/demo_stages.json: the settings of the demo in WORKDIR and what each finished
  stage returned, written after every stage, so that a rerun keeps them."""

  def __init__(self, workdir: pathlib.Path, settings: dict):
    self._path, self.stages = workdir / "demo_stages.json", {}
    if self._path.exists():
      recorded = json.loads(self._path.read_text())
      if recorded["settings"] != settings:
        raise errors.UserError(
            f"{workdir} holds a demo run with other settings ({recorded['settings']}); rerun "
            "it with those to resume it, or pass a new --workdir.")
      self.stages = recorded["stages"]
    self._settings = settings

  def finish(self, stage: str, out: dict) -> dict:
    self.stages[stage] = out
    _write_json(self._path, {"settings": self._settings, "stages": self.stages})
    return out


def _write_json(path: pathlib.Path, content: dict) -> None:
  run_safety.write_atomic(path, json.dumps(content, indent=2))


def targets_met(results: dict) -> dict:
  """Which of GPU_TARGETS the linear-probe results reach."""
  ours = results["linear_top1"]
  return {"top1": ours >= GPU_TARGETS["top1"],
          "over_random_init": (ours - results["random_init_linear_top1"]
                               >= GPU_TARGETS["over_random_init"]),
          "over_raw_pixels": (ours - results["raw_pixels_linear_top1"]
                              >= GPU_TARGETS["over_raw_pixels"])}


# One standard error of a top-1 near 0.84 on the 10,000 test images (about 0.37 points),
# rounded up: closer than that to raw pixels, a probe is level with them, not ahead.
SAMPLING_ERROR = 0.004


def conclusion(results: dict, preset: str) -> list:
  """What the numbers show, in a few lines."""
  ours, random_init = results["linear_top1"], results["random_init_linear_top1"]
  raw = results["raw_pixels_linear_top1"]
  epochs = results["pretrain_epochs"]
  lines = []
  if ours >= random_init + 0.03 and ours >= raw + SAMPLING_ERROR:
    lines.append(f"After {epochs:g} epochs the CARE-pretrained encoder is ahead of both "
                 f"baselines: {100 * (ours - random_init):+.1f} points over random init, "
                 f"{100 * (ours - raw):+.1f} over raw pixels; pretraining learned features "
                 "a linear classifier reads better than pixels.")
  elif ours >= random_init + 0.03 and ours > raw - SAMPLING_ERROR:
    lines.append(f"After {epochs:g} epochs the pretrained encoder is ahead of random init "
                 f"({100 * (ours - random_init):+.1f} points) and level with raw pixels "
                 f"({100 * (ours - raw):+.2f}, within the test set's sampling error of "
                 f"{100 * SAMPLING_ERROR:.1f}): it needs more epochs to pass them.")
  elif ours >= random_init + 0.03:
    lines.append(f"After {epochs:g} epochs the pretrained encoder is ahead of random init "
                 f"({100 * (ours - random_init):+.1f} points) but not of raw pixels "
                 f"({100 * (ours - raw):+.1f}): it needs more epochs.")
  else:
    lines += _not_yet_ahead(results, preset, ours - random_init)
  if preset == "fmnist_gpu":
    met = targets_met(results)
    lines.append(f"Targets (top-1 >= {GPU_TARGETS['top1']}, +{GPU_TARGETS['over_random_init']} "
                 f"over random init, +{GPU_TARGETS['over_raw_pixels']} over raw pixels): "
                 + ("all met." if all(met.values()) else
                    "not met: " + ", ".join(k for k, ok in met.items() if not ok) + "."))
  if results.get("pretrain_stopped_by_time_limit"):
    lines.append(f"The time limit stopped the pretraining at epoch {epochs:g} of "
                 f"{results['pretrain_scheduled_epochs']:g}, before its learning rate had "
                 "decayed.")
  return lines


def _first_and_last(curve) -> tuple[float, float] | None:
  return (curve[0][1], curve[-1][1]) if curve and len(curve) >= 2 else None


def _not_yet_ahead(results: dict, preset: str, margin: float) -> list:
  """Two lines: what the run shows (its kNN and probe curves), then why the probe is not
  ahead yet and what is."""
  epochs = results["pretrain_epochs"]
  ends = [(name, _first_and_last(results.get(key))) for name, key in
          (("kNN top-1", "knn_curve"), ("online-probe top-1", "online_probe_curve"))]
  ends = [(name, ab) for name, ab in ends if ab]
  rose = [f"{name} {a:.3f} -> {b:.3f}" for name, (a, b) in ends if b > a]
  fell = [f"{name} {a:.3f} -> {b:.3f}" for name, (a, b) in ends if b <= a]
  if rose:
    first = (f"Pretraining is learning: over its {epochs:g} epochs the {' and the '.join(rose)} "
             "rose on the test images" + (f"; the {fell[0]} did not." if fell else "."))
  elif fell:
    first = (f"Over its {epochs:g} epochs the {' and the '.join(fell)} did not rise on the "
             "test images: too short a run to judge by its curves.")
  else:
    first = f"This run pretrained for {epochs:g} epochs, too few to judge by its curves."
  longer = ("--config=configs/care.py:fmnist_cpu (14 epochs) and, on a GPU, fmnist_gpu "
            "(100) are ahead of it" if preset == "fmnist_demo" else "a longer run is needed")
  return [first, f"{epochs:g} epochs are too few for the linear probe to pass random init "
                 f"({100 * margin:+.1f} points); {longer}: docs/fashion_mnist.md has the "
                 "figures."]


def run_demo(workdir: pathlib.Path, config, preset: str, max_pretrain_seconds: float = 0,
             safety: run_safety.RunSafety | None = None) -> dict:
  """The demo of `config` (preset `preset`, overrides applied) in `workdir`."""
  import jax  # noqa: PLC0415
  safety = safety or run_safety.RunSafety()
  workdir.mkdir(parents=True, exist_ok=True)
  record = StageRecord(workdir, {"preset": preset, "config": json.loads(config.to_json())})
  results = {"preset": preset, "device": jax.devices()[0].device_kind,
             "date": datetime.date.today().isoformat(),
             "command": " ".join(["python -m care_jax.demo"] + sys.argv[1:]),
             "knn_k": config.monitor.knn_k}
  results.update(_pretrain_stage(config, preset, workdir, record, max_pretrain_seconds, safety))
  if "knn_top1" in results:
    print(f"After pretraining: kNN top-1 {results['knn_top1']:.4f}, online probe top-1 "
          f"{results.get('online_probe_top1', float('nan')):.4f} on the test images", flush=True)
  results.update(_probe_stages(config, workdir, record, safety))
  results.update(_raw_pixels_knn_stage(config, record, safety))
  results["total_seconds"] = round(results["pretrain_seconds"] + sum(
      results[key.replace("top1", "seconds")] for _, key, _ in STAGES)
      + results["raw_pixels_knn_seconds"], 1)
  if preset == "fmnist_gpu":
    results["targets_met"] = targets_met(results)
  lines = conclusion(results, preset)
  results["conclusion"] = " ".join(lines)
  _write_json(workdir / "results.json", results)
  _print_results(results, workdir, lines)
  return results


def _pretrain_stage(config, preset, workdir, record, max_seconds, safety) -> dict:
  from care_jax import train  # noqa: PLC0415
  from care_jax.data import input_pipeline  # noqa: PLC0415
  steps_per_epoch, total_steps = train.schedule_length(
      config, input_pipeline.dataset_info(config.data).num_train_examples)
  model = config.model
  banner(f"1/5 Pretraining CARE ({model.arch} width {model.channels} + "
         f"{model.t_stream.num_blocks}-block T-stream, {config.precision}) on Fashion-MNIST, "
         f"{config.data.image_size} px, {total_steps / steps_per_epoch:.3g} epochs (preset "
         f"{preset}); progress, loss terms and ETA below")
  if "pretrain" in record.stages:
    print("Done in an earlier run of this command (demo_stages.json).", flush=True)
    return record.stages["pretrain"]
  start = time.monotonic()
  out = pretrain(config, workdir / "pretrain", steps_per_epoch, total_steps, max_seconds,
                 safety)
  return record.finish("pretrain", {**out, "pretrain_seconds": round(time.monotonic() - start,
                                                                      1)})


def _probe_stages(config, workdir, record, safety) -> dict:
  """The linear probe of each encoder of STAGES, under one protocol."""
  from care_jax.evaluation import linear  # noqa: PLC0415
  results = {}
  for i, (encoder, key, description) in enumerate(STAGES, start=2):
    banner(f"{i}/5 Linear evaluation of {description}")
    if encoder not in record.stages:
      t = time.monotonic()
      eval_config = config.copy_and_resolve_references()
      eval_config.mode = "linear_eval"
      eval_config.linear_eval.encoder = encoder
      eval_config.linear_eval.pretrained_workdir = str(workdir / "pretrain")
      out = linear.evaluate(eval_config, str(workdir / f"linear_{encoder}"), safety)
      record.finish(encoder, {key: out["final_top1"],
                              key.replace("top1", "best_top1"): out["best_top1"],
                              key.replace("top1", "seconds"): round(time.monotonic() - t, 1)})
    results.update(record.stages[encoder])
    print(f"{description}: final top-1 {results[key]:.4f} "
          f"({results[key.replace('top1', 'seconds')]:.0f} s)", flush=True)
  return results


def _raw_pixels_knn_stage(config, record, safety) -> dict:
  """The kNN of raw pixels with the monitor's k, temperature and bank: the baseline of the
  pretrained encoder's kNN."""
  from care_jax import parallel  # noqa: PLC0415
  from care_jax.data import input_pipeline  # noqa: PLC0415
  from care_jax.evaluation import knn, linear  # noqa: PLC0415
  m = config.monitor
  banner(f"5/5 kNN of raw pixels (k={m.knn_k}, temperature {m.knn_temperature}, the "
         "monitor's bank)")
  if "raw_pixels_knn" not in record.stages:
    t = time.monotonic()
    mesh = parallel.create_mesh()
    info = input_pipeline.dataset_info(config.data)
    features_fn, _ = linear.encoder_features(config, {"encoder": "raw_pixels"},
                                             config.data.image_size, mesh)
    top1 = knn.top1(features_fn, config.data, mesh, k=m.knn_k, temperature=m.knn_temperature,
                    num_classes=info.num_classes, safety=safety,
                    bank=knn.bank_indices(info.num_train_examples, m.knn_bank_size,
                                          config.seed))
    record.finish("raw_pixels_knn", {"raw_pixels_knn_top1": top1,
                                     "raw_pixels_knn_seconds": round(time.monotonic() - t, 1)})
  out = record.stages["raw_pixels_knn"]
  print(f"raw pixels: kNN top-1 {out['raw_pixels_knn_top1']:.4f}", flush=True)
  return out


def _print_results(results: dict, workdir: pathlib.Path, lines: list) -> None:
  banner("Results (top-1 on the 10,000 test images, final epoch of the linear probe)")
  for _, key, description in STAGES:
    print(f"  {description:<45} {results[key]:.4f}")
  k = results["knn_k"]
  if "knn_top1" in results:
    print(f"  {f'kNN (k={k}) on the pretrained encoder':<45} {results['knn_top1']:.4f} "
          f"(epoch {results['knn_epoch']:g})")
  print(f"  {f'kNN (k={k}) on raw pixels':<45} {results['raw_pixels_knn_top1']:.4f}")
  for key, name in (("knn_curve", "kNN top-1"), ("online_probe_curve", "online probe top-1")):
    if results.get(key):
      print(f"  {name} over the run (epoch: top-1): "
            + ", ".join(f"{epoch:g}: {value:.4f}" for epoch, value in results[key]))
  print(f"  total time {results['total_seconds']:.0f} s on {results['device']}; written to "
        f"{workdir / 'results.json'}")
  for line in lines:
    print(f"  {line}")


# Flags of earlier care_jax versions, and what replaced them.
RENAMED_FLAGS = {"--set": "--config.FIELD=VALUE",
                 "--preset": "--config=configs/care.py:PRESET",
                 "--pretrain_steps": "--config.num_train_steps=N"}


def _define_flags() -> None:
  """The demo's flags, defined only when it runs as a program: care_jax.main defines
  --workdir and --config too, and one process (the tests) imports both modules."""
  flags.DEFINE_string("workdir", "runs/demo", "Where the demo's runs go.")
  config_flags.DEFINE_config_file(
      "config", None, "configs/care.py:PRESET (default: fmnist_gpu when JAX sees a GPU, "
      "else fmnist_demo; fmnist_cpu: 14 epochs on a CPU); --config.FIELD=VALUE changes a "
      "field (docs/config.md).")
  flags.DEFINE_float("max_pretrain_seconds", 0, "> 0: stop pretraining after this long (a "
                     "checkpoint is saved) and probe what it reached.")


def parse_flags(argv):
  """cli.parse_config_flags, with --config defaulting to the preset for this machine."""
  if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]) and not any(
      a in cli.HELP_FLAGS or a in RENAMED_FLAGS or a.split("=")[0] in RENAMED_FLAGS
      for a in argv[1:]):
    argv = [argv[0], f"--config=configs/care.py:{choose_preset('auto')}", *argv[1:]]
  return cli.parse_config_flags(argv, RENAMED_FLAGS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  cli.configure_logging()
  f = flags.FLAGS
  preset = config_flags.get_config_filename(f["config"]).partition(":")[2] or "r50_100ep"
  run_safety.run(lambda: run_demo(pathlib.Path(f.workdir), f.config, preset,
                                  f.max_pretrain_seconds, SAFETY), f.workdir)


SAFETY = run_safety.RunSafety()

if __name__ == "__main__":
  SAFETY.listen()  # before JAX loads: SIGTERM is a request from here on
  _define_flags()
  app.run(main, flags_parser=parse_flags)
