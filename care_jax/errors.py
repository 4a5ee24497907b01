"""The errors a user can cause: a setting, a dataset, a checkpoint. Entry points print the
message (which says what to do) as one line and exit non-zero instead of a traceback;
anything else is a bug in care_jax and keeps its traceback."""


class UserError(ValueError):
  """A setting that cannot work; the message names the field and what to set."""
