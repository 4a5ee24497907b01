"""The step measurements of a GPU lease (experiments/gpu_lease.py runs the most wanted of
them within its budget; this runs them alone, about 8 minutes on one H100): the card and
versions, care_jax's R50 CARE step (224 px) in bfloat16 at 128 and 256 pairs per GPU, in
float16 with loss scaling, without the T-stream blocks and in float32, the release's
PyTorch step beside it, FLOPs per pair and the fraction of the card's rate, peak memory,
and a jax.profiler trace of a few bfloat16 steps.

  python3 experiments/gpu_bench.py --out=$OUT [--budget_s=480] [--smoke]

Runs each measurement in its own process (the device keeps one peak memory per process),
most wanted first, and skips what no longer fits in --budget_s. Writes, under --out:
gpu_bench.json (every figure, the card, date and commands; rewritten after each
measurement, so a run cut short keeps what it measured), gpu_bench.md (the table for the
README), gpu_bench.log (all output) and trace.tar.gz (the profile).

Needs only the standard library itself. Missing ml-collections / dm-pix are installed
from wheels/ (`pip install --no-index --no-deps --target`), as the GPU machines have no
index; the release is timed if a checkout is in external/CARE (ignored by git, never
committed), else skipped with a message. --smoke runs the same path with the tiny preset
and the smallest sizes: a check of this script on a CPU, not a measurement.
"""
import argparse
import datetime
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE_LIMIT_BYTES = 15 * 2**20  # what the device tool brings back per file: 16 MiB


def jax_step(name, precision, batch, variants="care", estimate_s=90, env=None, **extra):
  """A `python -m care_jax.bench step` measurement."""
  return {"name": name, "kind": "jax", "precision": precision, "batch": batch,
          "variants": variants, "estimate_s": estimate_s, "env": env or {}, **extra}


def release_step(name, amp, batch, estimate_s=45):
  return {"name": name, "kind": "release", "amp": amp, "batch": batch,
          "estimate_s": estimate_s, "env": {}}


# Most wanted first: what the targets are judged by, then the diagnostics.
PLAN = [
    jax_step("jax_bf16_b128", "bfloat16", 128, estimate_s=100),
    # The bfloat16 step again, profiled (its compilation is in the persistent cache by now).
    jax_step("jax_bf16_b128_profiled", "bfloat16", 128, profile=True, estimate_s=40),
    jax_step("jax_f16_b128", "float16", 128, estimate_s=110),
    release_step("release_fp16_b128", "fp16", 128),
    jax_step("jax_bf16_b256", "bfloat16", 256, estimate_s=100),
    jax_step("jax_bf16_b128_without_t_stream", "bfloat16", 128, "without_t_stream", 70),
    release_step("release_bf16_channels_last_b128", "bf16_cl", 128),
    # Is float16's peak the step's or the convolution autotuner's? The same step with
    # autotuning off: the program's own buffers are in program_memory_gib either way.
    jax_step("jax_f16_b128_autotune_off", "float16", 128, estimate_s=90,
             env={"XLA_FLAGS": "--xla_gpu_autotune_level=0"}),
    jax_step("jax_f32_b128", "float32", 128, estimate_s=100),
]


class Run:
  """The output folder, the log, and the time left."""

  def __init__(self, out: str, budget_s: float, log_name: str = "gpu_bench.log"):
    self.out, self.deadline = out, time.monotonic() + budget_s
    os.makedirs(out, exist_ok=True)
    self.log = open(os.path.join(out, log_name), "a")

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def say(self, text: str) -> None:
    print(text, flush=True)
    self.log.write(text + "\n")
    self.log.flush()

  def command(self, args, env, timeout):
    """(exit status, stdout, stderr) of args, all output logged; 124 if it timed out."""
    self.say("$ " + " ".join(args))
    try:
      done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=max(1, timeout))
      code, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
      decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
      code, stdout, stderr = 124, decode(e.stdout), decode(e.stderr)
    self.log.write(stdout + stderr)
    self.log.flush()
    return code, stdout, stderr


def last_json(stdout: str):
  """The last complete JSON object printed, or None (a process killed mid-line prints half
  of one)."""
  for line in reversed(stdout.strip().splitlines()):
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return None


def child_env() -> dict:
  """The environment of the measured commands: this checkout importable, output
  unbuffered (a killed command still leaves its lines), XLA's compilation cache shared."""
  return dict(os.environ, PYTHONUNBUFFERED="1",
              PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
              JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "care_jax_xla"))


def ensure_packages(run: Run, env: dict) -> str:
  """Installs the wheels in wheels/ into a folder on PYTHONPATH when the packages they
  provide are missing; returns what it did."""
  probe = "import ml_collections, dm_pix"
  if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0:
    return "ml_collections and dm_pix already installed"
  wheels = sorted(glob.glob(os.path.join(ROOT, "wheels", "*.whl")))
  if not wheels:
    raise SystemExit("error: ml_collections or dm_pix is missing and wheels/ holds no wheels: "
                     "on a machine with an index run `pip download --python-version 3.12 "
                     "--platform manylinux2014_x86_64 --only-binary=:all: --no-deps "
                     "ml-collections dm-pix -d wheels/` and carry wheels/.")
  site = os.path.join(tempfile.gettempdir(), "care_jax_site")
  code, _, stderr = run.command([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                                 "--no-deps", "--no-compile", "--upgrade", "--target", site,
                                 *wheels], env, 120)
  if code:
    raise SystemExit(f"error: installing {wheels} failed: {stderr.strip()[-500:]}")
  env["PYTHONPATH"] = os.pathsep.join([site, env["PYTHONPATH"]])
  return f"installed {', '.join(os.path.basename(w) for w in wheels)}"


def environment(run: Run, env: dict) -> dict:
  """The card (nvidia-smi) and the versions, one line each."""
  info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  if shutil.which("nvidia-smi"):
    _, stdout, _ = run.command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                "--format=csv,noheader"], env, 30)
    info["nvidia_smi"] = stdout.strip()
  code = ("import json, importlib.metadata as m, jax, jaxlib\n"
          "names = [d.metadata['Name'] for d in m.distributions()]\n"
          "cuda = {n: m.version(n) for n in names if n and 'cuda' in n.lower() "
          "and ('jax' in n.lower() or 'cudnn' in n.lower())}\n"
          "print(json.dumps({'jax': jax.__version__, 'jaxlib': jaxlib.__version__, "
          "'backend': jax.default_backend(), 'devices': [d.device_kind for d in jax.devices()], "
          "'cuda_packages': cuda}))\n")
  _, stdout, stderr = run.command([sys.executable, "-c", code], env, 120)
  info["jax"] = last_json(stdout) or {"error": stderr.strip()[-500:]}
  code = ("import json, torch; "
          "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda}))")
  _, stdout, _ = run.command([sys.executable, "-c", code], env, 60)
  info["torch"] = last_json(stdout)
  return info


def command_for(item: dict, smoke: bool, trace_dir: str) -> list:
  if item["kind"] == "release":
    if smoke:  # float32: autocast on a CPU is slow, fp16 there barely supported
      return [sys.executable, "experiments/release_step.py", "--amp=fp32", "--batch=2",
              "--steps=1", "--warmup=0"]
    return [sys.executable, "experiments/release_step.py", f"--amp={item['amp']}",
            f"--batch={item['batch']}", "--steps=20", "--warmup=5"]
  args = [sys.executable, "-m", "care_jax.bench", "step",
          f"--config.precision={item['precision']}", f"--variants={item['variants']}"]
  if smoke:
    args += ["--config=configs/care.py:tiny",
             f"--batch_per_device={max(1, item['batch'] // 64)}", "--steps=2", "--warmup=1",
             "--fast_compile"]
  else:
    args += ["--config=configs/care.py:r50_100ep", f"--batch_per_device={item['batch']}",
             "--steps=20", "--warmup=3"]
  if item.get("profile"):
    args += [f"--profile_dir={trace_dir}", "--profile_steps=2"]
  return args


def pack_trace(run: Run, trace_dir: str) -> str:
  """trace.tar.gz under --out (the device tool brings back files 2 folders down at most)."""
  if not os.path.isdir(trace_dir) or not os.listdir(trace_dir):
    return "no trace written"
  path = os.path.join(run.out, "trace.tar.gz")
  with tarfile.open(path, "w:gz") as tar:
    tar.add(trace_dir, arcname="trace")
  size = os.path.getsize(path)
  if size > TRACE_LIMIT_BYTES:
    os.remove(path)
    return f"trace of {size / 2**20:.1f} MiB left out (over {TRACE_LIMIT_BYTES / 2**20:.0f} MiB)"
  return f"trace.tar.gz, {size / 2**20:.1f} MiB"


def table(results: dict) -> str:
  """docs/benchmarks.md's table: one row per measurement."""
  rows = ["| measurement | image pairs/s | median step (ms) | FLOPs/pair | TFLOP/s | "
          "fraction of peak | peak memory (GiB) | before 1st step (GiB) | XLA temp (GiB) |",
          "|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda v, f="{}": "-" if v is None else f.format(v)
  for name, r in results.items():
    if "benchmark" not in r:  # skipped, or failed before printing its figures
      rows.append(f"| {name} | {r.get('error', 'no result')} | | | | | | | |")
      continue
    figures = r.get("care") or r.get("without_t_stream") or r
    median = figures.get("step_seconds_median")
    rows.append(f"| {name} | {fmt(figures.get('image_pairs_per_sec'))} | "
                f"{fmt(None if median is None else median * 1e3, '{:.1f}')} | "
                f"{fmt(figures.get('flops_per_image_pair'), '{:.3g}')} | "
                f"{fmt(figures.get('achieved_tflops'))} | "
                f"{fmt(figures.get('fraction_of_peak'))} | "
                f"{fmt(figures.get('peak_memory_gib'))} | "
                f"{fmt(figures.get('peak_memory_before_first_step_gib'))} | "
                f"{fmt((figures.get('program_memory_gib') or {}).get('temp'))} |")
  return "\n".join(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_bench"))
  parser.add_argument("--budget_s", type=float, default=480,
                      help="seconds for all measurements; those that no longer fit are skipped")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes: checks this script on a CPU, measures nothing useful")
  parser.add_argument("--only", default="", help="comma-separated names of PLAN to run")
  args = parser.parse_args(argv)
  unknown = set(filter(None, args.only.split(","))) - {item["name"] for item in PLAN}
  if unknown:
    sys.exit(f"error: --only names no measurement {', '.join(sorted(unknown))}; choose from "
             f"{', '.join(item['name'] for item in PLAN)}.")
  run = Run(args.out, args.budget_s)
  env = child_env()
  report = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "smoke": args.smoke, "packages": ensure_packages(run, env)}
  report["environment"] = environment(run, env)
  run.say(json.dumps(report["environment"]))
  results = report["results"] = {}
  trace_dir = tempfile.mkdtemp(prefix="care_jax_trace_")
  release_there = os.path.isfile(os.path.join(ROOT, "external", "CARE", "models",
                                              "care_module.py"))
  plan = [item for item in PLAN if not args.only or item["name"] in args.only.split(",")]
  for item in plan:
    name = item["name"]
    if item["kind"] == "release" and not release_there:
      results[name] = {"error": "skipped: no release checkout in external/CARE (check out "
                                "github.com/ChongjianGE/CARE there and carry it)"}
      run.say(f"{name}: {results[name]['error']}")
      continue
    estimate = item["estimate_s"] if not args.smoke else 0
    if run.left() < estimate:
      results[name] = {"error": f"skipped: {run.left():.0f} s left, it needs about {estimate} s"}
      run.say(f"{name}: {results[name]['error']}")
      continue
    start = time.monotonic()
    code, stdout, stderr = run.command(command_for(item, args.smoke, trace_dir),
                                       dict(env, **item["env"]), run.left())
    result = last_json(stdout) or {}
    if code:
      result["error"] = (f"exit status {code}: "
                         + (stderr.strip().splitlines() or ["(no output)"])[-1][:500])
    result["command"] = " ".join(command_for(item, args.smoke, trace_dir)[1:])
    result["env"] = item["env"]
    result["wall_seconds"] = round(time.monotonic() - start, 1)
    results[name] = result
    run.say(f"{name}: {table({name: result}).splitlines()[-1]}")
    with open(os.path.join(run.out, "gpu_bench.json"), "w") as f:
      json.dump(report, f, indent=1)
  report["trace"] = pack_trace(run, trace_dir)
  with open(os.path.join(run.out, "gpu_bench.json"), "w") as f:
    json.dump(report, f, indent=1)
  markdown = table(results)
  with open(os.path.join(run.out, "gpu_bench.md"), "w") as f:
    f.write(f"{report['environment'].get('nvidia_smi', 'no GPU')}, "
            f"{report['environment']['date']}\n\n{markdown}\n")
  run.say(markdown)
  run.say(f"trace: {report['trace']}")


if __name__ == "__main__":
  main()
