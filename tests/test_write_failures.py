"""A full disk ends a run with one line and exit status 74, touches nothing saved before,
and the same command resumes once there is space: a real full file system (a small tmpfs
in a mount namespace of the test's own)."""
import os
import shutil
import subprocess
import textwrap

import pytest

from care_jax import run_safety
from tests.conftest import ROOT, tiny_run_args


def namespace_prefix():
  """A command prefix that runs a shell in a mount namespace of its own, where it may
  mount a tmpfs: as root, or in a user namespace; None where neither is allowed."""
  if shutil.which("unshare") is None:
    return None
  for prefix in (["unshare", "-m"], ["unshare", "-Urm"]):
    probe = subprocess.run(prefix + ["sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    if probe.returncode == 0:
      return prefix
  return None


@pytest.mark.slow  # ~150 s: two runs of the trainer on a tmpfs
def test_a_full_disk_ends_in_one_line_and_the_rerun_with_space_resumes(tmp_path,
                                                                       image_folder):
  prefix = namespace_prefix()
  if prefix is None:
    pytest.skip("cannot mount a tmpfs here (needs root or user namespaces)")
  mount_point, out = tmp_path / "disk", tmp_path / "out"
  mount_point.mkdir()
  out.mkdir()
  command = " ".join(f"'{a}'" for a in tiny_run_args(
      image_folder, mount_point / "run", "--config.num_train_steps=12",
      "--config.checkpoint_every_steps=2", "--config.log_every_steps=4"))
  script = textwrap.dedent(f"""
      mount -t tmpfs -o size=3000k tmpfs {mount_point}
      {command} 2> {out}/full.err; echo $? > {out}/full.rc
      ls {mount_point}/run/checkpoints > {out}/after_full.ls
      mount -o remount,size=64m {mount_point}
      {command} 2> {out}/rerun.err; echo $? > {out}/rerun.rc
      ls -a {mount_point}/run/checkpoints > {out}/after_rerun.ls
      """)
  done = subprocess.run(prefix + ["sh", "-c", script], cwd=ROOT, capture_output=True,
                        text=True, timeout=900, env=dict(os.environ))
  assert done.returncode == 0, done.stderr[-3000:]
  full = (out / "full.err").read_text()
  assert int((out / "full.rc").read_text()) == run_safety.EXIT_WRITE_FAILED == 74, full[-3000:]
  assert "Traceback" not in full, full[-3000:]
  last = full.strip().splitlines()[-1]
  assert last.startswith(f"error: cannot write to {mount_point / 'run'}: writing "), last
  assert "failed (no space left on the device)" in last
  intact = sorted(int(n) for n in (out / "after_full.ls").read_text().split() if n.isdigit())
  assert intact and f"checkpoints/{intact[-1]}." in last  # the newest intact one, named
  assert sum(line.startswith("error:") for line in full.splitlines()) == 1

  rerun = (out / "rerun.err").read_text()
  assert int((out / "rerun.rc").read_text()) == 0, rerun[-3000:]
  assert f"Resumed from step {intact[-1]} of 12" in rerun  # what the full disk left intact
  left = (out / "after_rerun.ls").read_text().split()
  assert "12" in left and not any("tmp" in name for name in left)  # half-written: cleaned
