"""care_jax.demo's choices and what it says the numbers show (the runs themselves are the
trainer's and linear evaluation's, tested elsewhere)."""
import pathlib
import subprocess
import sys
import threading
import time
import types

import pytest
from absl import flags

from care_jax import demo, errors, main, run_safety
from tests.conftest import ROOT, load_config


def results(ours, random_init, raw, epochs=100.0, **extra):
  return {"linear_top1": ours, "random_init_linear_top1": random_init,
          "raw_pixels_linear_top1": raw, "pretrain_epochs": epochs, **extra}


def demo_cli(*args):
  return subprocess.run([sys.executable, "-m", "care_jax.demo", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_cpu_gets_the_cpu_preset():
  assert demo.choose_preset("auto") == "fmnist_demo"  # the tests run on a CPU
  assert demo.choose_preset("fmnist_gpu") == "fmnist_gpu"


@pytest.mark.parametrize("old,new", [("--set=num_epochs=5", "--config.FIELD=VALUE"),
                                     ("--preset=fmnist_cpu", "--config=configs/care.py:PRESET"),
                                     ("--pretrain_steps=7", "--config.num_train_steps=N")])
def test_old_flag_spellings_are_refused_with_the_new_one(tmp_path, old, new):
  out = demo_cli(old, f"--workdir={tmp_path}")
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
  assert out.stderr.startswith(f"error: {old.split('=')[0]} is no longer a flag: use {new}")
  assert not any(tmp_path.iterdir())


def test_conclusion_says_whether_pretraining_beat_the_baselines():
  ahead = " ".join(demo.conclusion(results(0.91, 0.80, 0.84), "fmnist_gpu"))
  assert "ahead of both baselines: +11.0 points over random init, +7.0 over raw" in ahead
  assert "all met" in ahead
  short = " ".join(demo.conclusion(results(0.88, 0.82, 0.84), "fmnist_gpu"))
  assert "not met: top1, over_random_init, over_raw_pixels" in short
  assert "but not of raw pixels" not in short  # 0.88 is above raw pixels
  # Three test images above raw pixels is not ahead of them (fmnist_cpu, 2026-12-05).
  level = " ".join(demo.conclusion(results(0.8370, 0.7765, 0.8367), "fmnist_cpu"))
  assert "ahead of random init (+6.0 points) and level with raw pixels (+0.03" in level
  assert "ahead of both" not in level
  assert "but not of raw pixels (-0.5)" in " ".join(
      demo.conclusion(results(0.8317, 0.7765, 0.8367), "fmnist_cpu"))
  # Behind random init: first what the run shows (its curves), then why and what is ahead.
  behind = demo.conclusion(results(0.72, 0.77, 0.83, epochs=0.43,
                                   knn_curve=[[0.21, 0.5723], [0.43, 0.5982]],
                                   online_probe_curve=[[0.21, 0.3501], [0.43, 0.4788]]),
                           "fmnist_demo")
  assert len(behind) == 2
  assert behind[0] == ("Pretraining is learning: over its 0.43 epochs the kNN top-1 0.572 -> "
                       "0.598 and the online-probe top-1 0.350 -> 0.479 rose on the test "
                       "images.")
  assert "too few for the linear probe to pass random init (-5.0 points)" in behind[1]
  assert "--config=configs/care.py:fmnist_cpu" in behind[1]
  assert "docs/fashion_mnist.md" in behind[1]
  # A curve that fell is not said to rise (make demo, 2026-12-05: kNN 0.595 -> 0.558).
  mixed = demo.conclusion(results(0.7354, 0.7765, 0.8367, epochs=0.427,
                                  knn_curve=[[0.214, 0.5945], [0.427, 0.5577]],
                                  online_probe_curve=[[0.214, 0.3414], [0.427, 0.3718]]),
                          "fmnist_demo")
  assert mixed[0] == ("Pretraining is learning: over its 0.427 epochs the online-probe top-1 "
                      "0.341 -> 0.372 rose on the test images; the kNN top-1 0.595 -> 0.558 "
                      "did not.")
  fell = demo.conclusion(results(0.72, 0.77, 0.83, epochs=0.43,
                                 knn_curve=[[0.21, 0.60], [0.43, 0.55]]), "fmnist_demo")
  assert fell[0] == ("Over its 0.43 epochs the kNN top-1 0.600 -> 0.550 did not rise on the "
                     "test images: too short a run to judge by its curves.")
  no_curves = demo.conclusion(results(0.72, 0.77, 0.83, epochs=0.43), "fmnist_demo")
  assert no_curves[0].startswith("This run pretrained for 0.43 epochs")
  stopped = demo.conclusion(results(0.89, 0.80, 0.83, epochs=61.0, pretrain_scheduled_epochs=100,
                                    pretrain_stopped_by_time_limit=True), "fmnist_gpu")
  assert "stopped the pretraining at epoch 61 of 100" in stopped[-1]


def test_the_demo_and_the_main_program_import_into_one_process():
  """Their absl flags (both have --workdir) are defined only by the one that runs."""
  assert main._WORKDIR.name in flags.FLAGS and "max_pretrain_seconds" not in flags.FLAGS
  out = demo_cli("--help")
  assert out.returncode == 0, out.stderr[-2000:]
  for text in ("--workdir", "--config", "--max_pretrain_seconds", "fmnist_cpu",
               "docs/config.md"):
    assert text in out.stdout


def test_unknown_field_or_a_value_of_another_type_is_refused(tmp_path):
  out = demo_cli("--config.no_such_field=1", f"--workdir={tmp_path}")
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
  assert out.stderr.startswith("error: unknown config field(s) no_such_field. Valid fields: ")
  out = demo_cli("--config=configs/care.py:fmnist_cpu", "--config.num_epochs=50.5",
                 f"--workdir={tmp_path}")
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
  assert "num_epochs" in out.stderr and not any(tmp_path.iterdir())


def stopped_at_step_290(config, workdir, safety):  # as train.pretrain does when asked to stop
  from care_jax import metric_writers
  writer = metric_writers.create_default_writer(workdir)
  for step in (50, 100, 150, 200, 250):
    writer.write_scalars(step, {"images_per_sec": 1000.0 if step == 50 else 20000.0 + step})
  writer.write_scalars(290, {"knn_top1": 0.8, "online_probe_top1": 0.7})
  writer.flush()
  deadline = time.monotonic() + 5
  while (source := safety.stop_source(290)) is None:
    assert time.monotonic() < deadline
    time.sleep(0.01)
  raise run_safety.Stopped(290, source)


def test_a_pretraining_stopped_by_the_time_limit_reports_the_epoch_reached(
    tmp_path, monkeypatch):
  from care_jax import train
  monkeypatch.setattr(train, "pretrain", stopped_at_step_290)
  out = demo.pretrain(None, tmp_path, steps_per_epoch=58, total_steps=5800, max_seconds=0.05,
                      safety=run_safety.RunSafety())
  assert out == {"pretrain_epochs": 5.0, "pretrain_scheduled_epochs": 100.0,
                 "pretrain_stopped_by_time_limit": True,
                 "pretrain_pairs_per_sec_median": 20175.0,  # the first period left out
                 "knn_top1": pytest.approx(0.8), "knn_epoch": 5.0,
                 "online_probe_top1": pytest.approx(0.7), "online_probe_epoch": 5.0,
                 "knn_curve": [[5.0, 0.8]], "online_probe_curve": [[5.0, 0.7]]}


def test_a_schedulers_stop_during_pretraining_stops_the_demo(tmp_path, monkeypatch):
  """Not the time limit's, even with a limit set: the demo does not go on to the probes;
  Stopped reaches the program, which exits 75."""
  from care_jax import train
  monkeypatch.setattr(train, "pretrain", stopped_at_step_290)
  safety = run_safety.RunSafety()
  threading.Timer(0.05, safety._on_sigterm, (15, None)).start()
  with pytest.raises(run_safety.Stopped, match="^Stopped by SIGTERM"):
    demo.pretrain(None, tmp_path, steps_per_epoch=58, total_steps=5800, max_seconds=60,
                  safety=safety)


def test_a_rerun_keeps_the_finished_stages_and_refuses_other_settings(tmp_path, monkeypatch):
  from care_jax import train
  from care_jax.evaluation import linear
  calls = []

  def config(seed):
    c = load_config("tiny")
    c.seed = seed
    return c

  def fake_pretrain(config, workdir, safety):
    calls.append("pretrain")
    pathlib.Path(workdir).mkdir()  # where its events would be

  def fake_evaluate(config, workdir, safety):
    calls.append(config.linear_eval.encoder)
    if config.linear_eval.encoder == "random_init" and calls.count("random_init") == 1:
      raise run_safety.Stopped(7)  # the first run is stopped in the second probe
    return {"final_top1": 0.5, "best_top1": 0.6}

  def fake_knn_top1(features_fn, data, mesh, *, k, temperature, num_classes, bank, safety):
    calls.append("raw_pixels_knn")
    assert (k, temperature, num_classes, len(bank)) == (200, 0.07, 10, 10_000)  # the monitor's
    return 0.42

  monkeypatch.setattr(train, "pretrain", fake_pretrain)
  monkeypatch.setattr(linear, "evaluate", fake_evaluate)
  from care_jax.data import input_pipeline
  from care_jax.evaluation import knn
  monkeypatch.setattr(knn, "top1", fake_knn_top1)
  monkeypatch.setattr(input_pipeline, "dataset_info", lambda data: types.SimpleNamespace(
      num_train_examples=60_000, num_classes=10))
  with pytest.raises(run_safety.Stopped):
    demo.run_demo(tmp_path, config(1), "fmnist_demo")
  assert calls == ["pretrain", "pretrained", "random_init"]
  results = demo.run_demo(tmp_path, config(1), "fmnist_demo")
  # The finished stages were kept.
  assert calls[3:] == ["random_init", "raw_pixels", "raw_pixels_knn"]
  assert results["linear_top1"] == results["raw_pixels_linear_top1"] == 0.5
  assert results["raw_pixels_knn_top1"] == 0.42
  demo.run_demo(tmp_path, config(1), "fmnist_demo")
  assert len(calls) == 6  # a finished demo runs nothing again
  with pytest.raises(errors.UserError, match="holds a demo run with other settings"):
    demo.run_demo(tmp_path, config(2), "fmnist_demo")
