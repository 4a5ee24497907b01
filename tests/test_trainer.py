"""The program: command line, errors, metrics, checkpoints, preemption and resumption."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from care_jax import checkpointing
from care_jax.training import pretraining
from tests.conftest import ROOT, load_config, tiny_run_args


def run(args, timeout=300, **kwargs):
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        **kwargs)


def test_missing_imagenet_exits_fast_with_instructions(tmp_path):
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
  start = time.monotonic()
  out = run([sys.executable, "-m", "care_jax.main", "--config=configs/care.py",
             f"--workdir={tmp_path / 'w'}"], env=env, timeout=60)
  assert out.returncode != 0
  assert time.monotonic() - start < 30
  assert "imagenet2012" in out.stderr and "python -m care_jax.data.prepare" in out.stderr
  assert "Traceback" not in out.stderr


def test_unknown_config_field_lists_the_valid_ones(tmp_path):
  out = run([sys.executable, "-m", "care_jax.main", "--config=configs/care.py:tiny",
             f"--workdir={tmp_path}", "--config.global_bach_size=8"], timeout=60)
  assert out.returncode == 2  # a setting to fix (care_jax.main's docstring)
  assert "unknown config field(s) global_bach_size" in out.stderr
  assert "global_batch_size" in out.stderr.split("Valid fields:")[1]
  assert "Traceback" not in out.stderr


def test_batch_that_does_not_divide_over_devices_is_a_clear_error(tmp_path, image_folder):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3")
  out = run(tiny_run_args(image_folder, tmp_path), env=env, timeout=120)
  assert out.returncode != 0
  assert "global batch size 8 does not divide over the 3 devices" in out.stderr
  assert "Traceback" not in out.stderr


def test_tensorboard_events_hold_the_training_scalars(pretrained_workdir):
  """The events of the shared tiny run (conftest); every metric the step returns is written
  (float16's loss_scale: test_train_step)."""
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(pretrained_workdir)
  events.Reload()
  tags = set(events.Tags()["scalars"]) | set(events.Tags()["tensors"])
  wanted = {"loss", "c_loss", "t_loss", "cross_loss", "learning_rate", "tau", "grad_norm",
            "images_per_sec", "data_wait_fraction", "skipped_images", "steps_per_sec",
            "online_probe_loss", "online_probe_train_top1"}
  assert wanted <= tags, wanted - tags


def final_state(workdir):
  config = checkpointing.load_config(workdir)
  setup = pretraining.build(config, steps_per_epoch=1, total_steps=1)
  return jax.device_get(checkpointing.restore_from_workdir(workdir, setup.abstract_state()))


def wait_for_checkpoint(workdir, process, at_least=2, timeout=240):
  directory = pathlib.Path(workdir) / "checkpoints"
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = [int(p.name) for p in directory.glob("*") if p.name.isdigit()]
    if steps and max(steps) >= at_least:
      return max(steps)
    assert process.poll() is None, process.communicate()[1][-3000:]
    time.sleep(0.2)
  raise AssertionError("no checkpoint appeared")


LONG_RUN = ("--config.num_train_steps=12", "--config.checkpoint_every_steps=2",
            "--config.log_every_steps=4")


@pytest.mark.slow  # ~110 s: two runs of the trainer in subprocesses
def test_sigkill_then_rerun_ends_bitwise_identical(tmp_path, image_folder):
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  out = run(tiny_run_args(image_folder, reference, *LONG_RUN))
  assert out.returncode == 0, out.stderr[-3000:]

  process = subprocess.Popen(tiny_run_args(image_folder, killed, *LONG_RUN), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  killed_at = wait_for_checkpoint(killed, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert killed_at < 12
  out = run(tiny_run_args(image_folder, killed, *LONG_RUN))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Resumed from step" in out.stderr
  # The progress line's rate and ETA are of this process's steps only.
  resumed_at = int(out.stderr.split("Resumed from step ")[1].split(" ")[0])
  assert killed_at <= resumed_at < 12
  assert f"step 12/12 (100.0%, resumed at step {resumed_at})" in out.stderr
  assert f"over the {12 - resumed_at - 1} steps since step {resumed_at + 1}" in out.stderr

  a, b = final_state(reference), final_state(killed)
  assert int(a.step) == int(b.step) == 12
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # ~125 s: a run of the trainer in a subprocess, stopped, then rerun
def test_sigterm_saves_at_the_step_reached_and_exits_75(tmp_path, image_folder):
  process = subprocess.Popen(tiny_run_args(image_folder, tmp_path, *LONG_RUN), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait_for_checkpoint(tmp_path, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  # Not 0: the run is unfinished; 75 tells a scheduler to rerun it (run_safety.EXIT_RERUN).
  assert process.returncode == 75, stderr[-3000:]
  assert "Stopped by SIGTERM: saved the checkpoint of step" in stderr
  assert "(exit status 75)" in stderr
  assert "Traceback" not in stderr
  step = int(stderr.split("Stopped by SIGTERM: saved the checkpoint of step ")[1].split(";")[0])
  assert 2 <= step < 12
  assert int(final_state(tmp_path).step) == step
  assert (tmp_path / "PREEMPTED").read_text().startswith(
      f"Stopped by SIGTERM: saved the checkpoint of step {step};")

  # Resuming under settings that change the computation is refused, and nothing is lost.
  out = run(tiny_run_args(image_folder, tmp_path, *LONG_RUN, "--config.optimizer.base_lr=0.1"),
            timeout=120)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "optimizer.base_lr: 0.05 -> 0.1" in out.stderr and "Traceback" not in out.stderr
  assert int(final_state(tmp_path).step) == step
  assert '"base_lr": 0.05' in (tmp_path / "config.json").read_text()


def test_resume_check_allows_only_bookkeeping_changes(tmp_path):
  config = load_config("tiny")
  checkpointing.save_config(tmp_path, config)
  config.log_every_steps, config.data.num_workers = 7, 3  # do not change the run
  checkpointing.check_same_run(tmp_path, config)
  config.global_batch_size, config.model.t_stream.heads = 16, 1
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"global_batch_size: 8 -> 16; model.t_stream.heads: 2 -> 1"):
    checkpointing.check_same_run(tmp_path, config)


def test_profile_traces_its_window_and_close_ends_a_trace_left_running(tmp_path, monkeypatch):
  from care_jax import metric_writers
  calls = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda logdir: calls.append(("start", logdir)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
  whole = metric_writers.Profile(logdir=tmp_path, num_profile_steps=2, first_profile=3)
  for step in range(1, 8):
    whole(step)
  whole.close()  # nothing left running
  assert calls == [("start", str(tmp_path)), ("stop",)]
  calls.clear()
  preempted = metric_writers.Profile(logdir=tmp_path, num_profile_steps=5, first_profile=2)
  for step in range(1, 4):  # stopped at step 3, inside the window
    preempted(step)
  preempted.close()
  preempted.close()
  assert calls == [("start", str(tmp_path)), ("stop",)]
