"""care_jax.run_safety: the stop sources, the handler, the exit status of each way a run
ends, and the atomic writes."""
import errno
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

from care_jax import errors, run_safety
from care_jax.training import divergence
from tests.conftest import ROOT

# SIGTERM raised at every line the stop flag's methods (and the threading module's) run:
# a handler that takes a lock the interrupted code holds never returns.
_SIGTERM_EVERYWHERE = textwrap.dedent("""
    import os, signal, sys, threading
    sys.path.insert(0, {root!r})
    from care_jax import run_safety
    safety = run_safety.RunSafety().listen()
    watched = (run_safety.__file__, threading.__file__)
    raised = [0]

    def tracer(frame, event, arg):
      if frame.f_code.co_filename not in watched:
        return None
      if event == "line" and raised[0] < 2000:
        raised[0] += 1
        signal.raise_signal(signal.SIGTERM)
      return tracer

    sys.settrace(tracer)
    for _ in range(200):
      safety.stop_source()
      safety.request()
      with safety.time_limit(0.001):
        safety.stop_source()
    sys.settrace(None)
    print("done", raised[0])
    """)


def test_a_sigterm_at_any_line_of_the_stop_flags_code_never_hangs():
  """The old handler set a threading.Event that requested()/withdraw() cleared: a signal
  landing inside clear() waited forever for the lock clear() held."""
  out = subprocess.run([sys.executable, "-c", _SIGTERM_EVERYWHERE.format(root=str(ROOT))],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith("done ") and int(out.stdout.split()[1]) > 100


def test_sigterm_is_a_request_named_by_its_source_once():
  safety = run_safety.RunSafety()
  assert safety.stop_source() is None
  safety._on_sigterm(15, None)
  assert safety.stop_source() == run_safety.SIGTERM and safety.stop_source() is None
  safety.request()
  with pytest.raises(run_safety.Stopped, match=r"^Stopped by a request: nothing of this "):
    safety.check()


def test_a_time_limit_fires_inside_its_block_only():
  safety = run_safety.RunSafety()
  with safety.time_limit(0.02):
    assert safety.stop_source() is None
    time.sleep(0.05)
    assert safety.stop_source() == run_safety.TIME_LIMIT
    assert safety.stop_source() is None  # once
  # Ran out, not acted on: gone with the block, whenever it ran out.
  with safety.time_limit(0.01):
    time.sleep(0.05)
  time.sleep(0.05)
  assert safety.stop_source() is None
  with safety.time_limit(0):  # 0: no limit
    time.sleep(0.02)
    assert safety.stop_source() is None
  # A scheduler's SIGTERM inside the block is not the limit's: it outlives the block.
  with safety.time_limit(0.01):
    safety._on_sigterm(15, None)
    time.sleep(0.05)
  assert safety.stop_source() == run_safety.SIGTERM


def _status(error, tmp_path, capsys):
  def body():
    raise error
  with pytest.raises(SystemExit) as exit_:
    run_safety.run(body, tmp_path)
  return exit_.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("error,status", [
    (errors.UserError("set --config.x"), 2),
    (divergence.Diverged("Training diverged at step 3"), 65),
    (errors.WriteFailed("/runs/a/checkpoints/4", "no space left on the device"), 74),
    (run_safety.Stopped(8), 75)])
def test_each_class_of_error_has_its_exit_status_and_one_line(tmp_path, capsys, error, status):
  code, lines = _status(error, tmp_path, capsys)
  assert code == status
  if isinstance(error, run_safety.Stopped):
    assert (tmp_path / run_safety.MARKER).read_text().startswith("Stopped by SIGTERM: saved "
                                                                 "the checkpoint of step 8")
  else:
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(error) in lines[0]
    assert not (tmp_path / run_safety.MARKER).exists()


def test_a_bug_keeps_its_traceback(tmp_path):
  with pytest.raises(KeyError):
    run_safety.run(lambda: {}["missing"], tmp_path)


def test_a_failed_write_names_its_file_and_what_survived(tmp_path, capsys):
  (tmp_path / "checkpoints" / "6").mkdir(parents=True)
  code, lines = _status(errors.WriteFailed(tmp_path / "events", "disk quota exceeded"),
                        tmp_path, capsys)
  assert code == 74 and len(lines) == 1
  assert lines[0].startswith(f"error: cannot write to {tmp_path}: writing {tmp_path}/events "
                             "failed (disk quota exceeded). ")
  assert f"the newest intact checkpoint: {tmp_path}/checkpoints/6." in lines[0]


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path, monkeypatch):
  path = tmp_path / "a" / "results.json"
  run_safety.write_atomic(path, "old")
  run_safety.write_atomic(path, b"new")
  assert path.read_text() == "new"
  run_safety.write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text("by a function"))
  assert path.read_text() == "by a function"

  def full(self, text):  # a file object's write() names no file (etils' does the same)
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(pathlib.Path, "write_text", full)
  with pytest.raises(errors.WriteFailed, match=f"^writing {path} failed \\(no space left"):
    run_safety.write_atomic(path, "newer")
  monkeypatch.undo()
  assert path.read_text() == "by a function" and sorted(p.name for p in path.parent.iterdir()) \
      == ["results.json"]


def test_write_failures_are_recognised_through_orbax_and_tensorstore():
  tensorstore = ValueError('Error writing "/runs/a/checkpoints/4.orbax-checkpoint-tmp-99/x": '
                           'No space left on device [tensorstore_spec=...]')
  assert errors.write_failure_reason(RuntimeError("commit failed").with_traceback(None)) is None
  try:
    raise RuntimeError("committing the checkpoint failed") from tensorstore
  except RuntimeError as e:
    assert errors.write_failure_reason(e) == "no space left on the device"
  assert errors.write_failure_reason(OSError(errno.EROFS, "x")) == "read-only file system"
  assert errors.write_failure_reason(FileNotFoundError(2, "No such file", "/a")) is None


def test_a_refused_write_no_caller_named_still_exits_74(tmp_path, capsys):
  """A library's own file (tfds preparing a dataset, the profiler's trace) fails to write:
  not a traceback, the write-failure status and line."""
  library = RuntimeError("preparing the dataset failed")
  library.__cause__ = OSError(errno.ENOSPC, "No space left on device")
  code, lines = _status(library, tmp_path, capsys)
  assert code == 74 and len(lines) == 1
  assert lines[0].startswith(f"error: cannot write to {tmp_path}: writing a file failed (no "
                             "space left on the device).")
  # A setting to fix stays one, whatever its words.
  code, _ = _status(errors.UserError("Cannot write to --workdir x (Read-only file system)"),
                    tmp_path, capsys)
  assert code == 2


def test_a_transient_fault_leaves_the_marker_for_launchers(tmp_path, capsys):
  code, _ = _status(errors.TransientError("the file system lags"), tmp_path, capsys)
  assert code == 75 and (tmp_path / run_safety.MARKER).read_text().startswith("the file")
