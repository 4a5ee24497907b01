"""The errors a user can cause. Entry points print their message (which says what to do)
as one line and exit non-zero, instead of a traceback."""
from care_jax.checkpointing import CheckpointError
from care_jax.data.errors import DataError


class UserError(ValueError):
  """A setting that cannot work; the message names the field and what to set."""


USER_ERRORS = (UserError, DataError, CheckpointError, ValueError)
