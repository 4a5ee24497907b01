"""The errors a user can cause: a setting, a dataset, a checkpoint. Entry points print the
message (which says what to do) as one line and exit non-zero instead of a traceback;
anything else is a bug in care_jax and keeps its traceback."""


class UserError(ValueError):
  """A setting that cannot work; the message names the field and what to set."""


def check_positive(value, field: str) -> None:
  """Counts and periods (epochs, log or evaluation intervals) must be above 0: checked
  before any work, not found as a division by zero or an empty loop after it."""
  if not value > 0:
    raise UserError(f"{field} must be positive, got {value!r}; set --config.{field} to a "
                    "number above 0.")
