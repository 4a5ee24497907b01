"""The errors a user can cause, or that the machine causes: a setting, a dataset, a
checkpoint, a full disk, a file system that lags. Entry points print the message (which
says what to do) as one line and exit with the status of its class (run_safety); anything
else is a bug in care_jax and keeps its traceback.
"""
import errno


class UserError(ValueError):
  """A setting that cannot work; the message names the field and what to set."""


class TransientError(RuntimeError):
  """A fault that may pass (a shared file system that lags behind, an I/O error): a rerun
  of the same command resumes, so a scheduler should requeue it."""


class WriteFailed(Exception):
  """A write the machine refused (full disk, quota, read-only file system), named by the
  code that wrote: `where` is the file or checkpoint it was writing."""

  def __init__(self, where, reason: str):
    super().__init__(f"writing {where} failed ({reason})")
    self.where, self.reason = str(where), reason


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


def write_failure_reason(error: BaseException) -> str | None:
  """Why a write failed, if `error` (or an error it was raised from) is a refused write of
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
      return reason
    error = error.__cause__ or error.__context__
  return None


def raise_if_write_failed(error: BaseException, where) -> None:
  """Raises WriteFailed(where) from `error` when it is a refused write."""
  reason = write_failure_reason(error)
  if reason is not None:
    raise WriteFailed(where, reason) from error
