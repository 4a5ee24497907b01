"""experiments/gpu_lease.py keeps a lease's stages inside their windows: a stage's command
gets SIGTERM before its window ends (the demo then saves and exits 75) and SIGKILL at the
end if it ignores that; the report after each stage survives a lease cut short. (The
command itself runs end to end in `make gpu-smoke`, in a GPU-like Python 3.12
environment.)"""
import json
import sys
import time

import pytest

from tests.conftest import ROOT


@pytest.fixture
def gpu_lease(monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / "experiments"))
  import gpu_lease
  return gpu_lease


# A child that says when it started, then sleeps; on SIGTERM it exits 75 (as care_jax does)
# unless told to ignore it.
CHILD = ("import signal, sys, time\n"
         "if sys.argv[1] == 'obey':\n"
         "  signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
         "else:\n"
         "  signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
         "print('started', flush=True)\n"
         "time.sleep(60)\n")


@pytest.mark.parametrize("behaviour,status,at_least,at_most", [
    ("obey", 75, 1.0, 2.5),      # SIGTERM at seconds - grace = 1 s
    ("ignore", -9, 3.0, 4.5)])   # SIGKILL when the window ends, 3 s
def test_a_stage_command_is_stopped_inside_its_window(tmp_path, gpu_lease, behaviour, status,
                                                      at_least, at_most):
  lease = gpu_lease.Lease(str(tmp_path), budget_s=540)
  start = time.monotonic()
  code = gpu_lease.terminated_in_time(lease, [sys.executable, "-c", CHILD, behaviour], {},
                                      seconds=3, grace=2)
  took = time.monotonic() - start
  assert code == status and at_least <= took <= at_most, (code, took)
  assert "started" in (tmp_path / "lease.log").read_text()


def test_a_command_that_finishes_in_time_keeps_its_status(tmp_path, gpu_lease):
  lease = gpu_lease.Lease(str(tmp_path), budget_s=540)
  code = gpu_lease.terminated_in_time(
      lease, [sys.executable, "-c", "import sys; sys.exit(3)"], {}, seconds=30, grace=5)
  assert code == 3


def test_each_stage_is_on_disk_when_it_ends_and_windows_scale_with_the_budget(tmp_path,
                                                                             gpu_lease):
  lease = gpu_lease.Lease(str(tmp_path), budget_s=270)  # half the default
  assert lease.until("fmnist") == pytest.approx(gpu_lease.WINDOWS["fmnist"] / 2, abs=1)
  lease.record("env", {"backend": "gpu"})
  first = json.loads((tmp_path / "lease.json").read_text())
  assert first["stages"]["env"]["backend"] == "gpu" and first["budget_s"] == 270
  lease.record("fmnist", {"top1": 0.9})
  assert set(json.loads((tmp_path / "lease.json").read_text())["stages"]) == {"env", "fmnist"}
  # Epochs never exceed what the pretraining share allows at the calibrated rate.
  for rate in (10, 12345, 30000, 1e6):
    epochs = gpu_lease.epochs_for(rate, 185)
    assert 1 <= epochs <= 100
    assert epochs == 1 or epochs * gpu_lease.FMNIST_TRAIN_EXAMPLES <= (
        rate * gpu_lease.RATE_MARGIN * 185)
