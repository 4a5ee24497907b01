"""What a new user stumbles on: each ends in a one-line error before any work, or in
documented behaviour (a preempted run's exit status, a damaged checkpoint moved aside, a
progress line about this process's own steps), and care_jax installs and runs from any
directory."""
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from care_jax import checkpointing, cli, convert, errors, train
from care_jax.data import input_pipeline
from care_jax.errors import UserError
from care_jax.evaluation import finetune, linear
from care_jax.run_safety import EXIT_RERUN as EXIT_STATUS, RunSafety, Stopped
from care_jax.training import loop, pretraining
from tests.conftest import ROOT, load_config, tiny_run_args
from tests.test_data_bad_input import folder_with, pretrain as pretrain_batches
from tests.test_trainer import final_state


def folder_config(image_folder, **fields):
  config = load_config("tiny")
  config.data.update(name="image_folder", folder_root=str(image_folder))
  config.update(fields)
  return config


def outside_the_repo(args, cwd, timeout=120):
  """Runs care_jax as a user would from another directory: no PYTHONPATH to the checkout."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_pretraining_checks_the_workdir_before_any_work(tmp_path):
  (tmp_path / "file").write_text("notes")
  config = folder_config(tmp_path / "no_such_folder")  # would fail later, on the data
  with pytest.raises(UserError, match=r"^--workdir \S+file is a file; pass a directory"):
    train.pretrain(config, str(tmp_path / "file"))
  # Root may write anywhere, but not below a regular file.
  with pytest.raises(UserError,
                     match=r"^Cannot write to --workdir \S+ \(Not a directory\); pass a"):
    train.pretrain(config, str(tmp_path / "file" / "run"))
  assert (tmp_path / "file").read_text() == "notes"


@pytest.mark.parametrize("size", [0, -8])
def test_a_global_batch_below_one_is_refused_naming_its_field(tmp_path, image_folder, size):
  with pytest.raises(UserError, match=rf"^global_batch_size must be at least 1, got {size}; "
                                      r"set --config.global_batch_size"):
    train.pretrain(folder_config(image_folder, global_batch_size=size), str(tmp_path / "p"))
  assert not (tmp_path / "p" / "checkpoints").exists()

  config = folder_config(image_folder)
  config.linear_eval.update(encoder="random_init", global_batch_size=size)
  with pytest.raises(UserError, match=rf"^linear_eval.global_batch_size must be at least 1, "
                                      rf"got {size}"):
    linear.evaluate(config, str(tmp_path / "l"))
  config.finetune.update(encoder="random_init", labels="all", global_batch_size=size)
  with pytest.raises(UserError, match=rf"^finetune.global_batch_size must be at least 1, "
                                      rf"got {size}"):
    finetune.finetune(config, str(tmp_path / "f"))


@pytest.mark.parametrize("field, value", [("log_every_steps", 0), ("num_epochs", 0),
                                          ("num_epochs", -1)])
def test_a_period_or_length_below_one_is_refused_before_any_work(tmp_path, image_folder,
                                                                 field, value):
  config = folder_config(image_folder, num_train_steps=0, **{field: value})
  with pytest.raises(UserError, match=rf"^{field} must be positive, got {value}; set "
                                      rf"--config.{field} to a number above 0.$"):
    train.pretrain(config, str(tmp_path / "p"))
  assert not (tmp_path / "p" / "checkpoints").exists()


def test_check_positive_refuses_zero_negative_and_nan():
  for value in (1, 0.01):
    errors.check_positive(value, "finetune.num_epochs")
  for value in (0, -3, float("nan")):
    with pytest.raises(UserError, match=r"^linear_eval.eval_every_epochs must be positive"):
      errors.check_positive(value, "linear_eval.eval_every_epochs")


def test_batch_check_keeps_the_upper_bound():
  input_pipeline.check_batch_fits(64, 64, "global_batch_size")
  with pytest.raises(UserError, match=r"global_batch_size 65 is larger than the 64 training "
                                      r"examples; set --config.global_batch_size to at most 64"):
    input_pipeline.check_batch_fits(64, 65, "global_batch_size")


def test_convert_says_a_missing_checkpoint_is_missing_before_asking_for_torch(
    tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  with pytest.raises(SystemExit) as exit_:
    convert.main(["from-release", str(tmp_path / "nonexistent.pth.tar"),
                  "--workdir", str(tmp_path / "w"), "--config=configs/care.py:tiny"])
  err = capsys.readouterr().err
  assert exit_.value.code == 2  # a file to fix, as in every program
  assert err.startswith("error: ") and "nonexistent.pth.tar: no such file" in err
  assert "torch" not in err and err.count("\n") == 1
  assert not (tmp_path / "w").exists()


def test_converts_old_flag_is_refused_with_the_new_spelling(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    convert.main(["from-release", str(tmp_path / "x.pth.tar"), "--workdir",
                  str(tmp_path / "w"), "--config-preset", "tiny"])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.count("\n") == 1
  assert err.startswith("error: --config-preset is no longer a flag: use "
                        "--config=configs/care.py:PRESET")


def test_help_exits_0_and_lists_the_presets_from_any_directory(tmp_path):
  out = outside_the_repo([sys.executable, "-m", "care_jax.main", "--help"], tmp_path, 60)
  assert out.returncode == 0, out.stderr[-3000:]
  listed = out.stdout.split("Presets of configs/care.py")[1]
  for preset in ("r50_100ep", "r152_800ep", "fmnist_demo", "tiny", "fmnist_finetune_10pct"):
    assert preset in listed
  assert "--workdir" in out.stdout


def test_commands_run_from_another_directory(tmp_path, pretrained_workdir):
  """The installed (editable) package, its configs, and a workdir read by the library."""
  out = outside_the_repo([sys.executable, "-m", "care_jax.main",
                          "--config=configs/care.py:tiny", "--workdir=w",
                          "--config.global_batch_size=0"], tmp_path)
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1].startswith(
      "error: global_batch_size must be at least 1, got 0"), out.stderr[-3000:]
  load = ("from care_jax import pretrained; import sys; "
          "net, variables = pretrained.load(sys.argv[1]); print(type(net).__name__)")
  out = outside_the_repo([sys.executable, "-c", load, pretrained_workdir], tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "CareNetwork"


def test_the_wheel_holds_every_module_and_the_configs(tmp_path):
  """`pip install .` builds this wheel: installed alone (no checkout on the path) it finds
  its configs inside the package."""
  build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                          str(ROOT)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
  assert build.returncode == 0, build.stderr[-3000:]
  wheel, = (tmp_path / "dist").glob("care_jax-*.whl")
  names = set(zipfile.ZipFile(wheel).namelist())
  modules = {str(p.relative_to(ROOT)) for p in (ROOT / "care_jax").rglob("*.py")}
  assert modules <= names, modules - names
  assert {"care_jax/configs/care.py", "care_jax/configs/__init__.py"} <= names
  # The trainer's own dependencies, and the rest as extras: data (tfds, clu), test, interop.
  metadata = zipfile.ZipFile(wheel).read("care_jax-0.1.0.dist-info/METADATA").decode()
  assert "License-Expression: Apache-2.0" in metadata.splitlines()
  assert "care_jax-0.1.0.dist-info/licenses/LICENSE" in names
  groups = {}
  for line in metadata.splitlines():
    if line.startswith("Requires-Dist: "):
      requirement = line.split(": ", 1)[1]
      extra = requirement.split('extra == "')[1][:-1] if "extra ==" in requirement else "core"
      groups.setdefault(extra, set()).add(re.match(r"[\w.-]+", requirement).group())
  core = groups.pop("core")
  assert {"jax", "flax", "optax", "orbax-checkpoint", "tensorboard", "matplotlib"} <= core
  assert groups == {
      "data": {"tensorflow-cpu", "tensorflow-datasets", "importlib-resources", "clu"},
      "test": {"pytest", "pytest-xdist", "scipy", "scikit-learn"}, "interop": {"torch"}}
  assert not core & set().union(*groups.values())

  site = tmp_path / "site"
  zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
  check = ("from care_jax import cli; print(cli.CONFIG_FILE); "
           "print(cli.load_config('configs/care.py', 'tiny').global_batch_size); "
           "print(cli.presets_help().splitlines()[0])")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**env, "PYTHONPATH": str(site)})
  assert out.returncode == 0, out.stderr[-3000:]
  config_file, batch, presets = out.stdout.strip().splitlines()
  assert config_file == str(site / "care_jax" / "configs" / "care.py")
  assert batch == "8" and presets.startswith("Presets of configs/care.py")


def test_progress_counts_only_the_steps_this_process_ran():
  clock = iter([100.0, 110.0, 140.0, 150.0, 200.0]).__next__
  progress = loop.Progress(start_step=40, total_steps=100, every_secs=30, clock=clock)
  assert progress(41) is None  # the first step (compilation) starts the clock
  assert progress(42) is None  # 10 s later: not due yet
  line = progress(50)  # 40 s after step 41: 9 steps
  assert line == ("step 50/100 (50.0%, resumed at step 40): 0.23 steps/s over the 9 steps "
                  "since step 41, ETA 0:03:42")
  assert progress(51) is None
  assert progress(100).startswith("step 100/100 (100.0%, resumed at step 40): 0.59 steps/s "
                                  "over the 59 steps")  # the last step always reports


def test_a_bad_file_is_named_once_then_counted(tmp_path, caplog):
  config = folder_with(tmp_path, "notes.jpg", b"not an image at all", good=7)
  with caplog.at_level(logging.WARNING):
    batches = pretrain_batches(config, steps=4, batch=8)  # every step draws all 8 files
  assert [b["num_skipped"] for b in batches] == [1, 1, 1, 1]
  named = [r.getMessage() for r in caplog.records if "notes.jpg" in r.getMessage()]
  assert len(named) == 1, named
  assert str(tmp_path / "train" / "a" / "notes.jpg") in named[0]
  assert "BytesIO" not in caplog.text and "cannot identify image file" in named[0]


def damage(checkpoint: pathlib.Path, how: str) -> None:
  if how == "truncated":
    array_file = max((checkpoint / "state" / "ocdbt.process_0" / "d").iterdir(),
                     key=lambda p: p.stat().st_size)
    os.truncate(array_file, array_file.stat().st_size // 3)
  else:
    (checkpoint / "state" / "manifest.ocdbt").unlink()


def without_monitor(config):
  config.monitor.every_steps = 0  # a resumable change: no kNN evaluation to wait for
  return config


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes(
    tmp_path, image_folder, pretrained_workdir, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(pretrained_workdir, workdir)  # checkpoints 1, 2 and 4 of 4 steps
  damage(workdir / "checkpoints" / "4", "truncated")
  damaged_files = sorted(p.relative_to(workdir / "checkpoints" / "4")
                         for p in (workdir / "checkpoints" / "4").rglob("*"))
  with caplog.at_level(logging.INFO):
    train.pretrain(without_monitor(folder_config(image_folder)), str(workdir))
  assert "Checkpoint 4 cannot be restored" in caplog.text
  assert "Resuming from checkpoint 2, the newest that restores" in caplog.text
  moved, = (workdir / "checkpoints").glob("4.damaged-*")  # kept, out of orbax's sight
  assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == damaged_files
  # Steps 3 and 4 rerun from checkpoint 2: the same state as the undamaged run's.
  want, got = final_state(pretrained_workdir), final_state(workdir)
  assert int(got.step) == 4
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y)


def test_when_no_checkpoint_restores_nothing_is_moved(tmp_path, image_folder,
                                                      pretrained_workdir):
  workdir = tmp_path / "run"
  shutil.copytree(pretrained_workdir, workdir)
  steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  for step in steps:
    damage(workdir / "checkpoints" / step, "manifest")
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"No checkpoint in \S+ restores \(the latest, 4: "):
    train.pretrain(folder_config(image_folder), str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == steps


def test_a_refused_resume_exits_cleanly_and_still_deletes_a_half_written_save(
    tmp_path, image_folder, pretrained_workdir):
  """Orbax deletes such leftovers in a thread when the manager opens; a run refused a moment
  later used to exit while the thread ran, printing its traceback and leaving them."""
  workdir = tmp_path / "run"
  shutil.copytree(pretrained_workdir, workdir)
  leftover = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-17"
  leftover.mkdir()
  out = subprocess.run(tiny_run_args(image_folder, workdir, "--config.optimizer.base_lr=0.1"),
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "optimizer.base_lr: 0.05 -> 0.1" in out.stderr
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert not leftover.exists()


def test_only_missing_short_or_undecodable_files_count_as_damage():
  def wrapped(cause):  # as orbax raises TensorStore's errors
    try:
      raise cause
    except Exception as e:
      try:
        raise Exception("Encountered error while reading array index") from e
      except Exception as outer:
        return outer

  damage = [wrapped(ValueError('OUT_OF_RANGE: Error reading "opt_state..." in OCDBT database')),
            ValueError('NOT_FOUND: Error opening "cast" driver: Metadata at "step/.zarray"'),
            ValueError('DATA_LOSS: Error opening "cast" driver: Error decoding manifest'),
            wrapped(ValueError("FAILED_PRECONDITION: Error reading: ZSTD_decompressStream()")),
            KeyError('Item "state" was not found in the checkpoint.'),
            json.JSONDecodeError("Unterminated string", "{", 1)]
  other = [ValueError("Requested shape: (4,) is not compatible with the stored shape: (8,)."),
           ValueError("User-provided restore item and on-disk value metadata tree structures "
                      "do not match"),
           wrapped(ValueError("UNAVAILABLE: Error reading: connection reset")),
           wrapped(OSError(errno.EIO, "Input/output error")), KeyError("state")]
  assert [checkpointing._damaged(e) for e in damage] == [True] * len(damage)
  assert [checkpointing._damaged(e) for e in other] == [False] * len(other)


@pytest.mark.parametrize("other_process", ["damaged", "failed"])
def test_every_process_resumes_from_the_same_checkpoint(tmp_path, pretrained_workdir,
                                                       monkeypatch, other_process):
  """Checkpoint 4 restores here, but another process reports it damaged (all move on to
  checkpoint 2) or failing for another reason (all stop, nothing moved)."""
  workdir = tmp_path / "run"
  shutil.copytree(pretrained_workdir, workdir)
  theirs = {"damaged": checkpointing._DAMAGED, "failed": checkpointing._FAILED}[other_process]
  outcomes = {4: theirs, 2: checkpointing._RESTORED}
  gathered = []

  def allgather(mine):
    step = sorted(outcomes)[-1 - len(gathered)]  # steps are tried newest first
    gathered.append((step, int(mine)))
    return np.asarray([mine, outcomes[step]])

  monkeypatch.setattr(checkpointing.multihost_utils, "process_allgather", allgather)
  setup = pretraining.build(load_config("tiny"), steps_per_epoch=1, total_steps=1)
  with checkpointing.manager(workdir) as mgr:
    if other_process == "damaged":
      assert int(checkpointing.resume(mgr, setup.abstract_state()).step) == 2
      assert gathered == [(4, checkpointing._RESTORED), (2, checkpointing._RESTORED)]
      assert mgr.all_steps() == [1, 2]
    else:
      with pytest.raises(checkpointing.CheckpointError,
                         match=r"^Cannot restore checkpoint 4 from \S+ \(another process could "
                               r"not restore it\); its files do not look damaged, so nothing"):
        checkpointing.resume(mgr, setup.abstract_state())
  moved = list((workdir / "checkpoints").glob("4.damaged-*"))
  assert len(moved) == (other_process == "damaged")


def test_after_a_failed_restore_only_the_abandoned_reads_reports_are_dropped(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  asyncio_filters = logging.getLogger("asyncio").filters
  monkeypatch.setattr(logging.getLogger("asyncio"), "filters", list(asyncio_filters))
  checkpointing._drop_abandoned_read_reports()
  checkpointing._drop_abandoned_read_reports()  # installed once
  report = lambda error: sys.unraisablehook(
      type("Unraisable", (), {"exc_value": error})())

  def read_error(cause):  # as orbax's read of a shard raises when it is interrupted
    error = Exception("Encountered error while reading array index: (slice(0, 3, 1),).")
    error.__cause__ = cause
    return error

  report(RuntimeError("Event loop is closed"))
  report(read_error(GeneratorExit()))
  others = [RuntimeError("something else"), ValueError("Event loop is closed"),
            read_error(ValueError("OUT_OF_RANGE: Error reading"))]
  for error in others:
    report(error)
  assert [u.exc_value for u in seen] == others

  asyncio_logger = logging.getLogger("asyncio")
  record = lambda msg: logging.LogRecord("asyncio", logging.ERROR, "", 0, msg, (), None)
  assert not asyncio_logger.filter(record(
      "Future exception was never retrieved\nfuture: <Future finished exception=ValueError("
      "'NOT_FOUND: Error opening \"cast\" driver [tensorstore_spec[1]=...')>"))
  assert asyncio_logger.filter(record("Task exception was never retrieved\nfuture: <Task "
                                      "finished exception=KeyError('x')>"))


def test_a_sigterm_during_the_restore_stops_the_run_at_its_first_step(
    tmp_path, image_folder, pretrained_workdir, monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(pretrained_workdir, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")  # resumes from 2: two steps to go
  restore = checkpointing.resume

  def preempted_while_restoring(*args):
    os.kill(os.getpid(), signal.SIGTERM)  # the default action would end this process
    return restore(*args)

  monkeypatch.setattr(checkpointing, "resume", preempted_while_restoring)
  previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
  try:
    with pytest.raises(Stopped, match="checkpoint of step 3;"):
      train.pretrain(without_monitor(folder_config(image_folder)), str(workdir),
                     RunSafety().listen())
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2", "3"]


def test_the_command_line_resumes_past_a_damaged_checkpoint_without_tracebacks(
    tmp_path, image_folder, pretrained_workdir):
  workdir = tmp_path / "run"
  shutil.copytree(pretrained_workdir, workdir)
  damage(workdir / "checkpoints" / "4", "manifest")
  out = subprocess.run(tiny_run_args(image_folder, workdir, "--config.monitor.every_steps=0"),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Checkpoint 4 cannot be restored (ValueError: NOT_FOUND" in out.stderr
  assert "Resumed from step 2 of 4" in out.stderr and "tensorstore_spec" not in out.stderr
  assert len(list((workdir / "checkpoints").glob("4.damaged-*"))) == 1
  assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr


@pytest.mark.parametrize("status, marker, requeued", [
    (EXIT_STATUS, True, True),
    (137, True, True),  # process 0 exited 75 and srun reports another's SIGKILL
    (EXIT_STATUS, False, True),
    (0, False, False), (2, False, False), (137, False, False)])
def test_the_slurm_script_requeues_a_preempted_run(tmp_path, status, marker, requeued):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "PREEMPTED").write_text("left by an earlier attempt\n")  # removed before srun
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  srun = f'echo "$@" > {tmp_path}/srun.args\n'
  if marker:
    srun += f"echo preempted > {workdir}/PREEMPTED\n"
  for name, body in (("srun", f"{srun}exit {status}"),
                     ("scontrol", f'echo "$@" >> {tmp_path}/scontrol.calls')):
    (fake_bin / name).write_text(f"#!/bin/sh\n{body}\n")
    (fake_bin / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
             SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", CARE_ROOT=str(ROOT))
  out = subprocess.run(["bash", str(ROOT / "experiments" / "slurm.sbatch"), "tiny",
                        str(workdir)], env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == (EXIT_STATUS if requeued else status), out.stderr
  assert "--config.distributed=True" in (tmp_path / "srun.args").read_text()
  calls = tmp_path / "scontrol.calls"
  assert (calls.read_text() == "requeue 4242\n") if requeued else not calls.exists()


def test_config_paths_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.resolve_config_path("configs/care.py") == str(cli.CONFIG_FILE)
  assert cli.resolve_config_args(["prog", "--config=configs/care.py:tiny", "--config.x=1"]) == [
      "prog", f"--config={cli.CONFIG_FILE}:tiny", "--config.x=1"]
  assert cli.resolve_config_args(["prog", "--config", "configs/care.py"]) == [
      "prog", "--config", str(cli.CONFIG_FILE)]
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "care.py").write_text("")  # a user's own file of that name wins
  assert cli.resolve_config_path("configs/care.py") == "configs/care.py"
  assert cli.resolve_config_path("elsewhere/mine.py") == "elsewhere/mine.py"  # absl says
  assert cli.resolve_config_path(f"{ROOT}/configs/care.py") == f"{ROOT}/configs/care.py"


def test_only_faults_that_may_pass_are_transient():
  """Exit 75 makes a scheduler requeue: only I/O faults that may pass earn it; a permission,
  a missing file or a device out of memory would fail the same way again."""
  transient = [OSError(errno.EIO, "Input/output error"), OSError(errno.ESTALE, "Stale"),
               ValueError("UNAVAILABLE: the object store did not answer"),
               ValueError("DEADLINE_EXCEEDED: read timed out")]
  failed = [PermissionError(errno.EACCES, "Permission denied"),
            ValueError("RESOURCE_EXHAUSTED: Out of memory allocating 4 GiB"),
            ValueError("Structure of the checkpoint does not match")]
  for cause in transient + failed:
    error = RuntimeError("orbax: restore failed")
    error.__cause__ = cause
    assert checkpointing._outcome(error) == (checkpointing._TRANSIENT if cause in transient
                                             else checkpointing._FAILED), cause
