"""The errors a user can cause, or that the machine causes: a setting, a dataset, a
checkpoint, a full disk. Entry points print the message (which says what to do) as one
line and exit non-zero instead of a traceback; anything else is a bug in care_jax and
keeps its traceback.

Exit statuses (sysexits.h where one fits): 2 a setting or file to fix (UserError), 65
training diverged (training/divergence.py), 74 a write failed (WriteFailure: disk full,
quota, read-only file system), 75 preempted (preemption.py).
"""
import errno
import os

WRITE_FAILED_EXIT_STATUS = 74  # EX_IOERR


class UserError(ValueError):
  """A setting that cannot work; the message names the field and what to set."""


def check_positive(value, field: str) -> None:
  """Counts and periods (epochs, log or evaluation intervals) must be above 0: checked
  before any work, not found as a division by zero or an empty loop after it."""
  if not value > 0:
    raise UserError(f"{field} must be positive, got {value!r}; set --config.{field} to a "
                    "number above 0.")


# What the machine says when a write cannot complete: the OS's errors, and TensorStore's
# (orbax) and TensorFlow's words for them.
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EFBIG: "file too large"}
_WRITE_WORDS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                "Read-only file system": errno.EROFS, "File too large": errno.EFBIG}


def write_failure(error: BaseException) -> str | None:
  """'what failed (why)' if `error` (or an error it was raised from) is a failed write of
  the kind a user fixes on the machine, else None. Orbax wraps the OS's error in
  TensorStore's text, so the message is read too."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    reason = _WRITE_ERRNOS.get(getattr(error, "errno", None))
    if reason is None:
      reason = next((_WRITE_ERRNOS[code] for words, code in _WRITE_WORDS.items()
                     if words in str(error)), None)
    if reason is not None:
      where = (getattr(error, "filename", None) or _quoted_path(str(error))
               or _path_written(error))
      if where and ".orbax-checkpoint-tmp" in str(where):
        where = str(where).split(".orbax-checkpoint-tmp")[0]  # the checkpoint being saved
      return f"writing {where} failed ({reason})" if where else f"a write failed ({reason})"
    error = error.__cause__ or error.__context__
  return None


def _quoted_path(text: str) -> str | None:
  """The first absolute path quoted in an error message (TensorStore quotes its files)."""
  for part in text.split('"')[1::2]:
    if part.startswith("/"):
      return part
  return None


def _path_written(error: BaseException) -> str | None:
  """The path a failed write was writing, read from the innermost frame of its traceback
  that holds one: a file object's write() raises OSError(ENOSPC) without a filename (etils'
  Path.write_text, which orbax uses for its metadata, does)."""
  frames = []
  traceback = error.__traceback__
  while traceback is not None:
    frames.append(traceback.tb_frame)
    traceback = traceback.tb_next
  for frame in reversed(frames):
    for name in ("self", "path", "filename"):
      value = frame.f_locals.get(name)
      if isinstance(value, os.PathLike):
        return os.fspath(value)
  return None
