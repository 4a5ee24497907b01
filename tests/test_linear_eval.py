"""Linear evaluation: results, exact resumption after SIGKILL, TensorBoard scalars, and the
mistakes that used to end in a traceback or a silent wrong result."""
import json
import logging
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from care_jax import run_safety
from care_jax.errors import UserError
from care_jax.evaluation import linear
from tests.conftest import ROOT, StopAt, load_config


def eval_config(image_folder, pretrained_workdir=None, **linear_eval):
  config = load_config("tiny")
  config.data.update(name="image_folder", folder_root=image_folder, eval_split="test")
  config.mode = "linear_eval"
  config.linear_eval.update(pretrained_workdir=pretrained_workdir, num_epochs=2,
                            global_batch_size=6, eval_every_epochs=1)
  config.linear_eval.update(**linear_eval)
  return config


@pytest.mark.parametrize("encoder,augment", [("pretrained", False), ("pretrained", True),
                                             ("raw_pixels", False)])
def test_linear_evaluation_separates_six_colours(tmp_path, separable_folder,
                                                 pretrained_workdir, encoder, augment):
  """Six classes a linear probe tells apart (conftest.SEPARABLE_TINTS): well above chance
  (1/6) for pixels and for the tiny pretrained trunk's features."""
  # 5 does not divide the 48 test images: the last batch is padded and must be masked.
  config = eval_config(separable_folder, pretrained_workdir, encoder=encoder, augment=augment,
                       num_epochs=4, global_batch_size=5, base_lr=10.0)
  results = linear.evaluate(config, str(tmp_path))
  assert json.loads((tmp_path / "results.json").read_text()) == results
  assert [h["epoch"] for h in results["history"]] == [1, 2, 3, 4]
  assert all(h["examples"] == 48 for h in results["history"])
  # Chance is 1/6. Pixels separate the colours fully (measured 1.0); the tiny trunk (width
  # 4, 16 px, pretrained for 4 steps) reached 0.44-0.60 over runs (48 test images: one is
  # 0.02): at least twice chance.
  assert results["final_top1"] >= (0.95 if encoder == "raw_pixels" else 1 / 3), results
  assert (pretrained_workdir in results["encoder"]) == (encoder == "pretrained")


def test_top1_top5_counts_by_hand():
  """classifier.correct_counts on logits whose ranks are known: 7 classes, the label's
  rank 1, 2, 5, 6 and 1 (masked out)."""
  import numpy as np
  from care_jax.evaluation import classifier
  order = np.array([[3, 0, 1, 2, 4, 5, 6], [0, 3, 1, 2, 4, 5, 6], [0, 1, 2, 4, 3, 5, 6],
                    [0, 1, 2, 4, 5, 3, 6], [3, 0, 1, 2, 4, 5, 6]])
  logits = np.zeros((5, 7), np.float32)
  for row, classes in enumerate(order):
    logits[row, classes] = np.arange(7, 0, -1)  # classes[0] highest
  labels = np.full(5, 3)
  mask = np.array([True, True, True, True, False])
  counts = np.asarray(classifier.correct_counts(logits, labels, mask))
  np.testing.assert_array_equal(counts, [1, 3, 4])
  assert classifier.accuracy(counts) == {"top1": 0.25, "top5": 0.75, "examples": 4}


@pytest.mark.parametrize("stop_step,during_evaluation", [(11, False), (16, True)])
def test_a_stop_resumes_to_the_uninterrupted_results(tmp_path, image_folder,
                                                     pretrained_workdir, stop_step,
                                                     during_evaluation):
  """Stopped after step 11 of 8-step epochs (mid-epoch 2), or while epoch 2's evaluation
  runs (after step 16, its state saved without that evaluation), as SIGTERM stops it, then
  rerun: the same results.json (the rerun evaluates epoch 2 first in the second case)."""
  config = eval_config(image_folder, pretrained_workdir, augment=True, num_epochs=3,
                       global_batch_size=8, eval_every_epochs=2)
  want = linear.evaluate(config, str(tmp_path / "whole"))
  with pytest.raises(run_safety.Stopped, match=f"checkpoint of step {stop_step};"):
    linear.evaluate(config, str(tmp_path / "stopped"), StopAt(stop_step, during_evaluation))
  assert linear.evaluate(config, str(tmp_path / "stopped")) == want
  assert json.loads((tmp_path / "stopped" / "results.json").read_text()) == want


def main_args(image_folder, pretrained_workdir, workdir, *extra):
  return [sys.executable, "-m", "care_jax.main", "--config=configs/care.py:tiny",
          f"--workdir={workdir}", "--config.mode=linear_eval",
          "--config.data.name=image_folder", f"--config.data.folder_root={image_folder}",
          "--config.data.eval_split=test",
          f"--config.linear_eval.pretrained_workdir={pretrained_workdir}", *extra]


# 64 training images in batches of 8: 8 steps an epoch, a checkpoint at the end of each.
LONG_EVAL = ("--config.linear_eval.augment=True", "--config.linear_eval.num_epochs=30",
             "--config.linear_eval.global_batch_size=8",
             "--config.linear_eval.eval_every_epochs=7")


def checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").glob("*")
                if p.name.isdigit())


@pytest.mark.slow  # ~85 s: two linear evaluations in subprocesses
def test_sigkill_then_rerun_gives_the_uninterrupted_results(tmp_path, image_folder,
                                                            pretrained_workdir):
  from tensorboard.backend.event_processing import event_accumulator
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  run = lambda workdir: subprocess.run(
      main_args(image_folder, pretrained_workdir, workdir, *LONG_EVAL), cwd=ROOT,
      capture_output=True, text=True, timeout=600)
  out = run(reference)
  assert out.returncode == 0, out.stderr[-3000:]

  process = subprocess.Popen(main_args(image_folder, pretrained_workdir, killed, *LONG_EVAL),
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
  deadline = time.monotonic() + 300
  while not (checkpoint_steps(killed) and checkpoint_steps(killed)[-1] >= 16):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.monotonic() < deadline, "no checkpoint appeared"
    time.sleep(0.1)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (killed / "results.json").exists()
  assert checkpoint_steps(killed)[-1] < 30 * 8
  out = run(killed)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Resumed from the checkpoint of step" in out.stderr

  want = json.loads((reference / "results.json").read_text())
  assert json.loads((killed / "results.json").read_text()) == want
  assert [h["epoch"] for h in want["history"]] == [7, 14, 21, 28, 30]

  events = event_accumulator.EventAccumulator(str(reference))
  events.Reload()
  tags = set(events.Tags()["scalars"]) | set(events.Tags()["tensors"])
  assert {"loss", "learning_rate", "top1", "top5"} <= tags, tags


def test_workdir_that_cannot_be_written_fails_before_any_work(tmp_path, image_folder):
  # The encoder does not exist either: the workdir is checked first.
  config = eval_config(image_folder, str(tmp_path / "no_such_run"))
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError, match=r"--workdir .*file is a file; pass a directory"):
    linear.evaluate(config, str(tmp_path / "file"))
  with pytest.raises(UserError, match=r"Cannot write to --workdir .*file/run \(Not a dir"):
    linear.evaluate(config, str(tmp_path / "file" / "run"))


def test_batch_larger_than_the_split_is_a_one_line_error(tmp_path, image_folder):
  config = eval_config(image_folder, encoder="raw_pixels", global_batch_size=128)
  with pytest.raises(UserError, match=r"^linear_eval.global_batch_size 128 is larger than "
                                      r"the 64 training examples; set --config.linear_eval."
                                      r"global_batch_size to at most 64.$"):
    linear.evaluate(config, str(tmp_path))
  assert not (tmp_path / "config.json").exists()  # nothing was started


def test_cached_features_count_steps_on_the_examples_that_decode(tmp_path, caplog):
  from care_jax.data import synthetic
  synthetic.write_image_folder(str(tmp_path / "images"), splits={"train": 8, "test": 4},
                               height=20, width=20)
  for cls in ("cat", "dog"):  # 13 files a class, 5 of them not images: 16 of 26 decode
    for i in range(5):
      (tmp_path / "images" / "train" / cls / f"bad{i}.jpg").write_bytes(b"not a jpeg")
  config = eval_config(str(tmp_path / "images"), encoder="raw_pixels", global_batch_size=8,
                       num_epochs=3)
  with caplog.at_level(logging.WARNING):
    results = linear.evaluate(config, str(tmp_path / "run"))
  assert "bad0.jpg" in caplog.text
  assert [h["examples"] for h in results["history"]] == [8, 8, 8]
  assert checkpoint_steps(tmp_path / "run")[-1] == 3 * (16 // 8)  # not 3 x (26 // 8)


def test_resolution_is_the_pretraining_runs_unless_overridden(tmp_path, image_folder,
                                                             pretrained_workdir, caplog):
  config = eval_config(image_folder, pretrained_workdir, augment=False, num_epochs=1)
  config.data.image_size = 24  # the tiny pretraining ran at 16 px
  with caplog.at_level(logging.INFO):
    results = linear.evaluate(config, str(tmp_path / "default"))
  assert results["image_size"] == 16
  assert "Evaluating at 16 px, the pretraining run's resolution (not data.image_size 24)" \
      in caplog.text
  config.linear_eval.image_size = 24
  with caplog.at_level(logging.INFO):
    results = linear.evaluate(config, str(tmp_path / "override"))
  assert results["image_size"] == 24
  assert "Evaluating at 24 px (linear_eval.image_size); the encoder was pretrained at 16 px" \
      in caplog.text


def test_resuming_after_the_pretraining_saved_a_newer_checkpoint_is_refused(
    tmp_path, image_folder, pretrained_workdir):
  import shutil
  from care_jax import checkpointing
  from care_jax.training import pretraining
  source = tmp_path / "pretrain"
  shutil.copytree(pretrained_workdir, source)
  config = eval_config(image_folder, str(source), num_epochs=1)
  first = linear.evaluate(config, str(tmp_path / "eval"))
  assert "step 4" in first["encoder"]
  # The pretraining run goes on and saves step 5: the finished evaluation is of step 4.
  setup = pretraining.build(checkpointing.load_config(source), 1, 1)
  state = checkpointing.restore_from_workdir(source, setup.abstract_state())
  with checkpointing.manager(source) as mgr:
    checkpointing.save(mgr, 5, state.replace(step=state.step + 1))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"holds an evaluation of checkpoint 4 of .*pretrain, and it would "
                           r"now read checkpoint 5 of .*pretrain. Pass a new --workdir"):
    linear.evaluate(config, str(tmp_path / "eval"))
  assert json.loads((tmp_path / "eval" / "results.json").read_text()) == first


@pytest.mark.parametrize("field", ["num_epochs", "eval_every_epochs"])
def test_epoch_counts_below_one_are_refused_before_any_work(tmp_path, image_folder, field):
  from care_jax.evaluation import finetune
  config = eval_config(image_folder, encoder="raw_pixels", **{field: 0})
  with pytest.raises(UserError, match=rf"^linear_eval.{field} must be positive, got 0"):
    linear.evaluate(config, str(tmp_path / "linear"))
  config.finetune.update(encoder="random_init", **{field: 0})
  with pytest.raises(UserError, match=rf"^finetune.{field} must be positive, got 0"):
    finetune.finetune(config, str(tmp_path / "finetune"))
  assert not (tmp_path / "linear" / "config.json").exists()


def test_the_loop_reads_nothing_back_from_the_device_per_step(tmp_path, image_folder,
                                                              pretrained_workdir, monkeypatch):
  """Steps are counted on the host: a run of twice the steps per epoch (half the batch)
  reads the device no more often; the old loop read the state's step after every step."""
  from jax._src import array
  value = array.ArrayImpl._value
  reads = [0]

  def counted(self):
    reads[0] += 1
    return value.fget(self)

  monkeypatch.setattr(array.ArrayImpl, "_value", property(counted))

  def reads_of(batch):
    reads[0] = 0
    config = eval_config(image_folder, pretrained_workdir, augment=True, num_epochs=2,
                         global_batch_size=batch, eval_every_epochs=2)
    linear.evaluate(config, str(tmp_path / str(batch)))
    return reads[0]

  eight, sixteen = reads_of(8), reads_of(4)  # 8 and 16 steps an epoch
  assert sixteen - eight < 8, (eight, sixteen)
