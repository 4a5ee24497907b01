"""Errors the trainer can catch as `DataError` and print as one line."""
from care_jax.errors import UserError


class DataError(UserError):
  """A problem with the input data that the user must fix (not a bug in care_jax)."""


class DatasetNotFoundError(DataError):
  """The dataset is not prepared where we looked; the message says how to prepare it."""
