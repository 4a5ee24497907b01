"""Every GPU figure in one lease of the device tool: one command that ends within
--budget_s (540 s, 9 minutes) on one H100/H200, compilation included, and writes to --out
as it goes, so a stage cut short keeps what the earlier ones measured.

  python3 experiments/gpu_lease.py prepare        here: fills wheels/ (ignored by git) and
                                                  says what to carry
  python3 experiments/gpu_lease.py --out=$OUT     there, carrying ["wheels"] (and
                                                  "external" for the release's step)
  python3 experiments/gpu_lease.py --out=DIR --smoke   the same stages on a CPU, shrunk

Stages, most wanted first, each in its own time window (a stage gets the time its window
leaves it, never the next one's):
  env      the card, driver, and the versions of python, jax, jaxlib, flax, optax,
           orbax-checkpoint, chex, numpy, torch;
  fmnist   the Fashion-MNIST learning run with a schedule that completes: the fmnist_gpu
           step's rate is measured first (`care_jax.bench step`, synthetic device batches),
           the epochs are set so that pretraining fits its share, then the demo
           (pretraining with the kNN monitor and online probe, the three linear probes),
           the learning curve and the attention maps of the trained and the random encoder;
  r50      the R50 step at 224 px in bfloat16, 128 pairs per GPU (FLOPs per pair, fraction
           of the card's dense bf16 peak, memory), and the release's AMP step beside it
           (from external/CARE; skipped with a message if absent);
  extras   if time remains, each only when its estimate fits what is left (in a lease
           whose earlier stages used their windows, only the first): a profile trace of
           under 15 MiB, bfloat16 at 256, float16's peak memory with and without
           autotuning.

Writes under --out: lease.json (every figure, rewritten after each stage), lease.log,
results.json (the demo's), learning_curve.png, attention_trained.png,
attention_random.png, gpu_bench.md, trace.tar.gz.

The GPU machines lack clu, ml-collections, tensorflow, tfds and dm-pix and reach no index:
the two the trainer needs are installed from the carried wheels/ with `pip install
--no-index --no-deps --target` (gpu_bench.ensure_packages), as `make gpu-smoke` does in a
Python 3.12 / jax 0.11 environment built like the GPU machine's.
"""
import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import gpu_bench  # experiments/, the script's own directory

ROOT = gpu_bench.ROOT
WHEELS = os.path.join(ROOT, "wheels")
FMNIST_FILES = "/usr/share/datasets/fashion-mnist"
CARRY_LIMIT_BYTES = 64 * 2**20  # what a device call carries, all paths together
# The stages' windows, in seconds from the start, for the default --budget_s of 540 (they
# scale with it, as do the two below).
WINDOWS = {"env": 30, "fmnist": 340, "r50": 500, "extras": 540}
# Of the fmnist window: the calibration, the pretraining (compilation included), the three
# probes after it, and the curve and the two maps (a process each) at the end.
FMNIST_CALIBRATION_S, FMNIST_PRETRAIN_S, FMNIST_PROBES_S, FMNIST_DRAWINGS_S = 45, 160, 55, 50
FMNIST_TRAIN_EXAMPLES, FMNIST_BATCH = 60000, 1024
# The pretraining's expected rate is this fraction of the calibrated step's: compilation,
# the host input, monitors and checkpoints take the rest (estimated, not measured on a GPU).
RATE_MARGIN = 0.6
VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "torch")
SMOKE_SETS = ("--config.num_train_steps=4", "--config.global_batch_size=64",
              "--config.monitor.every_steps=2", "--config.monitor.knn_bank_size=2000",
              "--config.linear_eval.num_epochs=2")


def prepare() -> None:
  """wheels/: the ml-collections and dm-pix wheels for Python 3.12 and Debian's Fashion-MNIST
  idx files; says what to carry."""
  os.makedirs(os.path.join(WHEELS, "fashion-mnist"), exist_ok=True)
  subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--python-version", "3.12",
                  "--platform", "manylinux2014_x86_64", "--only-binary=:all:", "--no-deps",
                  "ml-collections==1.1.0", "dm-pix==0.4.5", "-d", WHEELS], check=True)
  for path in glob.glob(os.path.join(FMNIST_FILES, "*-ubyte.gz")):
    shutil.copy(path, os.path.join(WHEELS, "fashion-mnist"))
  carry = ["wheels"] + (["external"] if os.path.isdir(os.path.join(ROOT, "external")) else [])
  size = sum(os.path.getsize(os.path.join(d, f)) for path in carry
             for d, _, files in os.walk(os.path.join(ROOT, path)) for f in files)
  print(json.dumps({"carry": carry, "mib": round(size / 2**20, 1),
                    "fits": size <= CARRY_LIMIT_BYTES,
                    "fashion_mnist_files": len(os.listdir(os.path.join(WHEELS,
                                                                       "fashion-mnist")))}))
  if size > CARRY_LIMIT_BYTES:
    sys.exit(f"error: {size / 2**20:.0f} MiB to carry, over the device tool's 64 MiB: leave "
             "external/ out (the release's step is then skipped) or trim it to models/ and "
             "layers/.")


class Lease(gpu_bench.Run):
  """gpu_bench's output folder and log, with stage windows and lease.json."""

  def __init__(self, out: str, budget_s: float):
    super().__init__(out, budget_s, log_name="lease.log")
    self.start, self.budget_s = time.monotonic(), budget_s
    self.report = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                   "budget_s": budget_s, "stages": {}}

  def scaled(self, seconds: float) -> float:
    """A duration of the default 540 s budget, in this one's."""
    return seconds * self.budget_s / 540

  def until(self, stage: str) -> float:
    """Seconds left before `stage`'s window ends."""
    return self.scaled(WINDOWS[stage]) - (time.monotonic() - self.start)

  def record(self, stage: str, figures: dict) -> None:
    self.report["stages"][stage] = {**figures,
                                    "ended_at_s": round(time.monotonic() - self.start, 1)}
    with open(os.path.join(self.out, "lease.json"), "w") as f:
      json.dump(self.report, f, indent=1)


def env_stage(lease: Lease, env: dict) -> dict:
  """The card and driver (nvidia-smi), JAX's backend and devices, and the versions."""
  info = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  if shutil.which("nvidia-smi"):
    _, stdout, _ = lease.command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], env, max(1, lease.until("env")))
    info["nvidia_smi"] = stdout.strip()
  code = ("import json, sys, importlib.metadata as m\n"
          f"out = {{'python': sys.version.split()[0]}}\n"
          f"for name in {list(VERSIONS)!r}:\n"
          "  try:\n"
          "    out[name] = m.version(name)\n"
          "  except m.PackageNotFoundError:\n"
          "    out[name] = None\n"
          "import jax\n"
          "out['backend'] = jax.default_backend()\n"
          "out['devices'] = [d.device_kind for d in jax.devices()]\n"
          "print(json.dumps(out))\n")
  _, stdout, stderr = lease.command([sys.executable, "-c", code], env,
                                    max(1, lease.until("env")))
  info["versions"] = gpu_bench.last_json(stdout) or {"error": stderr.strip()[-500:]}
  lease.say(json.dumps(info))
  return info


def epochs_for(pairs_per_sec: float, pretrain_s: float) -> int:
  """Whole epochs of fmnist_gpu that pretraining finishes in pretrain_s at RATE_MARGIN of
  the calibrated rate; from 1 to the preset's 100."""
  epochs = math.floor(pairs_per_sec * RATE_MARGIN * pretrain_s / FMNIST_TRAIN_EXAMPLES)
  return max(1, min(100, epochs))


def fmnist_stage(lease: Lease, env: dict, smoke: bool) -> dict:
  """Calibrate, pretrain with a schedule that fits, probe, draw."""
  out = {}
  calibrate = [sys.executable, "-m", "care_jax.bench", "step",
               "--config=configs/care.py:fmnist_gpu", "--variants=care",
               "--config.precision=bfloat16"]
  calibrate += (["--batch_per_device=8", "--steps=2", "--warmup=1", "--fast_compile"] if smoke
                else [f"--batch_per_device={FMNIST_BATCH}", "--steps=20", "--warmup=3"])
  code, stdout, stderr = lease.command(
      calibrate, env, min(lease.scaled(FMNIST_CALIBRATION_S), lease.until("fmnist")))
  step = (gpu_bench.last_json(stdout) or {}).get("care", {})
  rate = step.get("image_pairs_per_sec")
  out["calibration"] = {"image_pairs_per_sec": rate, "exit_status": code,
                        "compile_seconds": step.get("compile_seconds")}
  after = lease.scaled(FMNIST_PROBES_S + FMNIST_DRAWINGS_S)
  pretrain_s = min(lease.scaled(FMNIST_PRETRAIN_S), max(10, lease.until("fmnist") - after))
  epochs = epochs_for(rate, pretrain_s) if rate else 10
  out["epochs"] = epochs
  workdir = os.path.join(tempfile.gettempdir(), "care_jax_lease_fmnist")
  shutil.rmtree(workdir, ignore_errors=True)
  steps_per_epoch = FMNIST_TRAIN_EXAMPLES // FMNIST_BATCH
  sets = [f"--config.data.data_dir={os.path.join(WHEELS, 'fashion-mnist')}",
          f"--config.num_epochs={epochs}",
          # about ten points on the learning curve, whatever the epochs
          f"--config.monitor.every_steps={max(1, epochs * steps_per_epoch // 10)}"]
  if smoke:
    sets += SMOKE_SETS
  code = terminated_in_time(
      lease, [sys.executable, "-m", "care_jax.demo", "--config=configs/care.py:fmnist_gpu",
              f"--workdir={workdir}", *sets, f"--max_pretrain_seconds={pretrain_s:.0f}"],
      env, lease.until("fmnist") - lease.scaled(FMNIST_DRAWINGS_S))
  out["demo_exit_status"] = code
  results_path = os.path.join(workdir, "results.json")
  stages_path = os.path.join(workdir, "demo_stages.json")
  if os.path.isfile(results_path):
    shutil.copy(results_path, lease.out)
    with open(results_path) as f:
      out["results"] = json.load(f)
  elif os.path.isfile(stages_path):  # stopped in a probe: the stages it finished
    with open(stages_path) as f:
      out["finished_stages"] = json.load(f)["stages"]
  card = (lease.report["stages"].get("env", {}).get("nvidia_smi") or "a CPU").split(",")[0]
  pretrain_dir = os.path.join(workdir, "pretrain")
  baselines = [f"--results={results_path}"] if os.path.isfile(results_path) else []
  drawings = [[sys.executable, "-m", "care_jax.plot", f"--workdir={pretrain_dir}", *baselines,
               f"--out={os.path.join(lease.out, 'learning_curve.png')}",
               f"--title=CARE, preset fmnist_gpu, {epochs} epochs, on {card}"]]
  for encoder, name in (("pretrained", "trained"), ("random_init", "random")):
    drawings.append([sys.executable, "-m", "care_jax.visualize", f"--workdir={pretrain_dir}",
                     f"--encoder={encoder}", "--images=0,1,2,3,4,5,6,7",
                     f"--out={os.path.join(lease.out, f'attention_{name}.png')}"])
  out["drawings"] = []
  for args in drawings:
    code, _, stderr = lease.command(args, env, max(1, lease.until("fmnist")))
    out["drawings"].append({"command": " ".join(args[1:3]), "exit_status": code})
  return out


def terminated_in_time(lease: Lease, args, env, seconds: float, grace: float = 15) -> int:
  """Runs args with output to the log; SIGTERM `grace` seconds before `seconds` run out (the
  demo then stops where it is and keeps its finished stages), SIGKILL at the end."""
  lease.say("$ " + " ".join(args))
  process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=lease.log,
                             stderr=subprocess.STDOUT)
  try:
    return process.wait(timeout=max(1, seconds - grace))
  except subprocess.TimeoutExpired:
    process.terminate()
  try:
    return process.wait(timeout=grace)
  except subprocess.TimeoutExpired:
    process.kill()
    return process.wait()


def bench_stage(lease: Lease, env: dict, smoke: bool, stage: str, names: list) -> dict:
  """gpu_bench's measurements `names`, in order, each only if it fits in `stage`'s window."""
  trace_dir = tempfile.mkdtemp(prefix="care_jax_trace_")
  release_there = os.path.isfile(os.path.join(ROOT, "external", "CARE", "models",
                                              "care_module.py"))
  results = {}
  for item in sorted((i for i in gpu_bench.PLAN if i["name"] in names),
                     key=lambda i: names.index(i["name"])):
    name, left = item["name"], lease.until(stage)
    if item["kind"] == "release" and not release_there:
      results[name] = {"error": "skipped: no release checkout in external/CARE"}
    elif left < (1 if smoke else item["estimate_s"]):
      results[name] = {"error": f"skipped: {left:.0f} s left, it needs about "
                                f"{item['estimate_s']} s"}
    else:
      args = gpu_bench.command_for(item, smoke, trace_dir)
      code, stdout, stderr = lease.command(args, dict(env, **item["env"]), left)
      results[name] = gpu_bench.last_json(stdout) or {}
      if code:
        results[name]["error"] = (f"exit status {code}: "
                                  + (stderr.strip().splitlines() or ["(no output)"])[-1][:500])
    lease.say(f"{name}: {gpu_bench.table({name: results[name]}).splitlines()[-1]}")
  if any(item.get("profile") for item in gpu_bench.PLAN if item["name"] in names):
    results["trace"] = gpu_bench.pack_trace(lease, trace_dir)
  return results


def main(argv=None):
  if argv is None:
    argv = sys.argv[1:]
  if argv[:1] == ["prepare"]:
    prepare()
    return
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_lease"))
  parser.add_argument("--budget_s", type=float, default=540,
                      help="wall-clock seconds for everything; the stage windows scale with it")
  parser.add_argument("--smoke", action="store_true",
                      help="the same stages, shrunk: checks this command on a CPU")
  args = parser.parse_args(argv)
  lease = Lease(args.out, args.budget_s)
  env = gpu_bench.child_env()
  lease.report["smoke"] = args.smoke
  lease.report["packages"] = gpu_bench.ensure_packages(lease, env)
  lease.record("env", env_stage(lease, env))
  lease.record("fmnist", fmnist_stage(lease, env, args.smoke))
  lease.record("r50", bench_stage(lease, env, args.smoke, "r50",
                                  ["jax_bf16_b128", "release_fp16_b128"]))
  extras = bench_stage(lease, env, args.smoke, "extras",
                       ["jax_bf16_b128_profiled", "jax_bf16_b256", "jax_f16_b128",
                        "jax_f16_b128_autotune_off"])
  lease.record("extras", extras)
  measured = {**lease.report["stages"]["r50"], **extras}
  with open(os.path.join(lease.out, "gpu_bench.md"), "w") as f:  # the measurements' table
    f.write(gpu_bench.table({k: v for k, v in measured.items() if isinstance(v, dict)}) + "\n")
  lease.say(f"done in {time.monotonic() - lease.start:.0f} s of {args.budget_s:.0f}")


if __name__ == "__main__":
  main()
