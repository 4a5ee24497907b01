"""The benchmarks and the summary finish and report whatever the input, and say in one line
what to fix when they cannot start."""
import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from care_jax import bench, summary
from care_jax.data import synthetic
from care_jax.errors import UserError
from tests.conftest import ROOT

# Run first in a child interpreter: any later `import tensorflow` (or tfds, clu) fails, as
# on the GPU machines; and XLA gives no cost analysis at all, as JAX 0.11 on CUDA gives
# none for lowered programs.
NO_TENSORFLOW_NO_COST_ANALYSIS = """
import sys
for name in ('tensorflow', 'tensorflow_datasets', 'clu'):
  sys.modules[name] = None
import jax.stages
jax.stages.Lowered.cost_analysis = lambda self: None
jax.stages.Compiled.cost_analysis = lambda self: None
from care_jax import bench
bench.main(sys.argv[1:])
"""


def run_bench(capsys, *args):
  """(exit status, the JSON of the last stdout line or None, stderr)."""
  try:
    bench.main(list(args))
    code = 0
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  lines = out.strip().splitlines()
  return code, json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None, err


def write_pngs(folder, count):
  rng = np.random.default_rng(1)
  for i in range(count):
    PIL.Image.fromarray(synthetic.natural_image(rng, 40, 48)).save(folder / f"png{i}.png")


def test_input_bench_skips_a_bad_first_file_counts_it_and_times_pngs(tmp_path, capsys):
  synthetic.write_jpegs(str(tmp_path), 3, height=40, width=48)
  write_pngs(tmp_path, 2)
  (tmp_path / "0bad.jpg").write_bytes(b"not an image")  # sorted first
  (tmp_path / "notes.txt").write_text("not counted")
  # A batch of all 6 images: every batch draws the bad file once (or more, if a
  # replacement draws it again).
  code, result, err = run_bench(capsys, "input", f"--images={tmp_path}", "--batch_size=6",
                                "--num_images=12", "--workers=1", "--image_size=16")
  assert code == 0, err
  assert result["distinct_images"] == 6
  assert result["files_skipped"] == 1
  assert result["examples_replaced_while_timed"] >= 2  # 2 timed batches
  assert result["images_timed"] == 12 and result["images_per_sec"] > 0
  assert result["source_size_example"] == "48x40"
  assert "error" not in result


def test_input_bench_on_only_bad_files_reports_them_and_exits_2(tmp_path, capsys):
  for name in ("a.jpg", "b.jpeg", "c.png"):
    (tmp_path / name).write_bytes(b"\xff\xd8 truncated")
  code, result, err = run_bench(capsys, "input", f"--images={tmp_path}", "--batch_size=2",
                                "--num_images=4", "--workers=1", "--image_size=16")
  assert code == 2  # files to fix, as every program's UserError
  assert result["images_per_sec"] is None and result["images_timed"] == 0
  assert result["files_skipped"] == 3 and result["distinct_images"] == 3
  assert result["source_size_example"] is None
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: nothing to time: ") and "corrupt" in last
  assert "Traceback" not in err


@pytest.mark.parametrize("make_folder", [True, False])
def test_input_bench_without_images_says_how_to_make_some(tmp_path, capsys, make_folder):
  folder = tmp_path / "empty"
  if make_folder:
    folder.mkdir()
  code, result, err = run_bench(capsys, "input", f"--images={folder}")
  assert code == 2 and result is None
  assert err.count("\n") == 1 and "--make=N" in err and str(folder) in err


def test_step_bench_names_the_presets_for_an_unknown_one(capsys):
  code, result, err = run_bench(capsys, "step", "--config=configs/care.py:nope")
  assert code == 2 and result is None
  assert err.count("\n") == 1
  assert err.startswith("error: --config=configs/care.py:nope: Unknown preset 'nope'")
  assert "r50_100ep" in err and "tiny" in err


@pytest.mark.parametrize("old,new", [("--preset=tiny", "--config=configs/care.py:PRESET"),
                                     ("--precision=bfloat16", "--config.precision=PRECISION"),
                                     ("--image_size=32", "--config.data.image_size=N")])
def test_step_and_scaling_refuse_old_flags_with_the_new_spelling(capsys, old, new):
  for command in ("step", "scaling"):
    code, result, err = run_bench(capsys, command, old)
    assert code == 2 and result is None and err.count("\n") == 1
    assert err.startswith(f"error: {old.split('=')[0]} is no longer a flag: use {new}")


def test_step_bench_takes_config_overrides_and_refuses_unknown_fields(capsys):
  code, result, err = run_bench(capsys, "step", "--config=configs/care.py:tiny",
                                "--config.no_such=1")
  assert code == 2 and err.startswith("error: unknown config field(s) no_such. Valid ")
  code, result, err = run_bench(capsys, "step", "--config=configs/care.py:tiny",
                                "--config.global_batch_size=big")
  assert code == 2 and err.count("\n") == 1
  assert "global_batch_size must be of type int, got 'big'" in err


def test_step_bench_refuses_a_batch_below_one(capsys):
  code, _, err = run_bench(capsys, "step", "--config=configs/care.py:tiny", "--batch_per_device=0")
  assert code == 2 and err == "error: --batch_per_device must be at least 1, got 0.\n"


def test_summary_lists_the_valid_fields_for_an_unknown_one():
  out = subprocess.run([sys.executable, "-m", "care_jax.summary",
                        "--config=configs/care.py:tiny", "--config.foo=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and out.stdout == ""
  assert out.stderr.count("\n") == 1, out.stderr[-3000:]
  assert out.stderr.startswith("error: unknown config field(s) foo. Valid fields: ")
  assert "global_batch_size" in out.stderr and "model.t_stream.num_blocks" in out.stderr


def test_program_flops_falls_back_to_the_compiled_program_then_to_none(monkeypatch):
  x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
  w = jax.ShapeDtypeStruct((16, 32), jnp.float32)
  lowered = jax.jit(jnp.matmul).lower(x, w)
  assert summary.program_flops(lowered) == 2 * 8 * 16 * 32
  monkeypatch.setattr(type(lowered), "cost_analysis", lambda self: None)
  compiled = lowered.compile()
  assert summary.program_flops(lowered, compiled) == 2 * 8 * 16 * 32
  assert summary.program_flops(lowered) == 2 * 8 * 16 * 32  # compiles it itself
  monkeypatch.setattr(type(compiled), "cost_analysis", lambda self: None)
  assert summary.program_flops(lowered, compiled) is None


def test_step_figures_with_and_without_flops():
  with_flops = bench._step_figures(global_batch=128, median=0.1, flops=128 * 9.3e10,
                                   peak=790.0)
  assert with_flops["image_pairs_per_sec"] == 1280.0
  assert with_flops["flops_per_image_pair"] == 9.3e10
  assert with_flops["achieved_tflops"] == pytest.approx(119.04, abs=0.05)
  assert with_flops["fraction_of_peak"] == pytest.approx(119.04 / 790, abs=1e-4)
  assert with_flops["image_pairs_per_sec_per_device"] == 1280.0
  on_eight = bench._step_figures(global_batch=1024, median=0.1, flops=None, peak=None,
                                 devices=8)
  assert on_eight["image_pairs_per_sec"] == 10240.0
  assert on_eight["image_pairs_per_sec_per_device"] == 1280.0
  without = bench._step_figures(global_batch=128, median=0.1, flops=None, peak=790.0)
  assert without["image_pairs_per_sec"] == 1280.0
  assert without["flops_per_image_pair"] is None and without["fraction_of_peak"] is None
  rate, basis = bench.peak_tflops("NVIDIA H100 80GB HBM3")  # the SXM card's name
  assert rate == 989.0 and "H100" in basis and "datasheet" in basis
  assert bench.peak_tflops("NVIDIA H200")[0] == 989.0
  assert bench.peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
  assert bench.peak_tflops("cpu")[0] is None
  assert bench.peak_tflops("cpu", 0.2)[0] == 0.2


def test_a_cpu_peak_is_a_matrix_product_timed_in_the_run(monkeypatch):
  ticks = iter(range(1000))
  monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
  # Each product takes one tick (1 s) of the fake clock: 2 x 64^3 FLOP/s.
  assert bench.matmul_tflops("float32", size=64) == float(f"{2 * 64**3 / 1e12:.4g}")
  monkeypatch.undo()
  rate, basis = bench.peak_tflops("cpu", dtype="float32")
  assert 0 < rate < 100 and "matrix product timed in this run" in basis
  assert bench.peak_tflops("cpu", 0.2, "float32") == (0.2, "--peak_tflops")


@pytest.mark.slow  # ~60 s: a subprocess that compiles the step twice
def test_step_bench_without_cost_analysis_or_tensorflow_still_reports_the_timing():
  """The real command on the tiny preset, as a GPU machine with JAX 0.11 runs it."""
  out = subprocess.run(
      [sys.executable, "-c", NO_TENSORFLOW_NO_COST_ANALYSIS, "step",
       "--config=configs/care.py:tiny",
       "--batch_per_device=2", "--warmup=0", "--steps=2", "--variants=without_t_stream",
       "--fast_compile"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert "FLOPs unavailable" in lines[-2]
  result = json.loads(lines[-1])["without_t_stream"]
  assert result["flops_per_image_pair"] is None and result["achieved_tflops"] is None
  assert result["step_seconds_median"] > 0 and result["image_pairs_per_sec"] > 0
  assert result["finite_loss"] is True
  program = result["program_memory_gib"]  # XLA's buffer sizes of the compiled step
  assert program["argument"] > 0 and program["temp"] > 0 and program["output"] > 0


@pytest.mark.parametrize("args, message", [
    (["--devices=0,2"], "error: --devices takes device counts, comma-separated (e.g. 1,2,4,8); "
                        "got '0,2'.\n"),
    (["--devices=two"], "error: --devices takes device counts, comma-separated (e.g. 1,2,4,8); "
                        "got 'two'.\n"),
    (["--programs=pretrain_step,nope"], "error: --programs: unknown ['nope']; choose from "),
])
def test_scaling_bench_says_what_to_fix(capsys, args, message):
  code, result, err = run_bench(capsys, "scaling", "--config=configs/care.py:tiny", *args)
  assert code == 2 and result is None
  assert err.count("\n") == 1 and err.startswith(message), err


@pytest.mark.slow  # ~140 s: the step compiled for 1, 2 and 4 devices
def test_scaling_bench_compiles_the_step_for_each_device_count(capsys):
  """Simulated CPU devices, one child process per count: the step keeps each device on its
  own examples as the count doubles."""
  code, result, err = run_bench(capsys, "scaling", "--config=configs/care.py:tiny",
                                "--batch_per_device=2",
                                "--devices=1,2", "--fast_compile")
  assert code == 0, err
  assert result["device"] == "simulated CPU devices"
  assert set(result["by_device_count"]) == {"1", "2"}
  for count, report in result["by_device_count"].items():
    step = report["pretrain_step"]
    assert step["moves"] == [] and step["temp_bytes"] > 0
  assert "all-reduce" in result["by_device_count"]["2"]["pretrain_step"]["collectives"]
  ratio = result["per_device_temp_relative_to_fewest"]["pretrain_step"]
  assert ratio["1"] == 1.0 and 0.5 < ratio["2"] < 1.5, ratio


def test_release_is_timed_beside_ours_only_on_the_same_work(tmp_path, monkeypatch):
  """R50 at 224 px on one device without augmentation, a checkout present: the release's
  step runs with our batch, arithmetic and step counts, and the ratio is pairs/s over its."""
  from care_jax import cli
  release_dir = tmp_path / "CARE"
  (release_dir / "models").mkdir(parents=True)
  (release_dir / "models" / "care_module.py").write_text("")
  calls = []

  def fake_run(command, **kwargs):
    calls.append(command)
    out = json.dumps({"step_seconds_median": 6.0, "image_pairs_per_sec": 1.3})
    return subprocess.CompletedProcess(command, 0, stdout="figures\n" + out + "\n", stderr="")

  monkeypatch.setattr(bench.subprocess, "run", fake_run)
  args = bench._parser().parse_args(["step", "--batch_per_device=8", "--steps=4", "--warmup=1",
                                     "--no_augmentation", f"--release_dir={release_dir}"])
  config = cli.config_from_spec("configs/care.py:r50_100ep")
  figures = bench._beside_release(args, config, 1, {"step_seconds_median": 5.0})
  assert figures["care_over_release"] == 1.2 and figures["release"]["image_pairs_per_sec"] == 1.3
  assert calls[0][2:] == [f"--release_dir={release_dir}", "--batch=8", "--amp=fp32",
                          "--steps=4", "--warmup=1"]
  config.precision = "bfloat16"
  bench._beside_release(args, config, 1, {"step_seconds_median": 5.0})
  assert calls[1][4] == "--amp=bf16"

  # Not the same work, or no checkout: nothing is run.
  small = cli.config_from_spec("configs/care.py:tiny")
  assert bench._beside_release(args, small, 1, {"step_seconds_median": 5.0}) == {}
  assert bench._beside_release(args, config, 2, {"step_seconds_median": 5.0}) == {}
  args.no_augmentation = False
  assert bench._beside_release(args, config, 1, {"step_seconds_median": 5.0}) == {}
  args.no_augmentation, args.release_dir = True, str(tmp_path / "missing")
  assert bench._beside_release(args, config, 1, {"step_seconds_median": 5.0}) == {}
  assert len(calls) == 2

  # A release that fails says why, in the figures, instead of stopping the benchmark.
  args.release_dir = str(release_dir)
  monkeypatch.setattr(bench.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
      command, 1, stdout="", stderr="Traceback\nModuleNotFoundError: No module named 'timm'\n"))
  failed = bench._beside_release(args, config, 1, {"step_seconds_median": 5.0})
  assert failed["release"]["error"] == "ModuleNotFoundError: No module named 'timm'"


def test_rounds_alternate_ours_and_the_release_and_report_the_median_ratio(tmp_path,
                                                                             monkeypatch):
  """A CPU that slows down between rounds slows both sides of a round: each round's ratio
  pairs adjacent timings, and the median of the rounds' ratios is reported."""
  from care_jax import cli
  release_dir = tmp_path / "CARE"
  (release_dir / "models").mkdir(parents=True)
  (release_dir / "models" / "care_module.py").write_text("")
  order, release_steps = [], iter([6.0, 12.0, 9.0])

  def fake_run(command, **kwargs):
    order.append("release")
    out = json.dumps({"step_seconds_median": next(release_steps), "image_pairs_per_sec": 1.0})
    return subprocess.CompletedProcess(command, 0, stdout=out + "\n", stderr="")

  ours = iter([10.0, 10.0])  # rounds 2 and 3; round 1 is the first timing, 5.0

  def retime():
    order.append("care")
    return next(ours)

  monkeypatch.setattr(bench.subprocess, "run", fake_run)
  args = bench._parser().parse_args(["step", "--batch_per_device=8", "--rounds=3",
                                     "--no_augmentation", f"--release_dir={release_dir}"])
  config = cli.config_from_spec("configs/care.py:r50_100ep")
  figures = bench._beside_release(args, config, 1, {"step_seconds_median": 5.0}, retime)
  assert order == ["release", "care", "release", "care", "release"]
  assert [r["care_over_release"] for r in figures["rounds"]] == [1.2, 1.2, 0.9]
  assert figures["care_over_release"] == 1.2
  with pytest.raises(UserError, match="--rounds must be at least 1, got 0"):
    bench._check_step_args(bench._parser().parse_args(["step", "--rounds=0"]))
