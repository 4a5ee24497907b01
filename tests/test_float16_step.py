"""The float16 step's overflow check stays one computation (compile time, not values: the
values are test_train_step's)."""
import jax
import pytest

from tests.conftest import quick_compile
from tests.test_train_step import build, views


@pytest.mark.slow  # ~40 s of compilation guarding a compile-time property, not a result
def test_the_float16_overflow_check_is_not_copied_into_every_state_update():
  """`finite` is a chain of one check per gradient leaf. When a select per state leaf used
  it, XLA copied the chain into each select: ~440 x 108 `and`s in the tiny network,
  three times the compilation time. One conditional uses it once."""
  setup, state = build("float16")
  hlo = quick_compile(setup.train_step, state, views()).as_text()
  gradient_leaves = len(jax.tree.leaves(state.online_params))
  assert hlo.count(" and(") < 10 * gradient_leaves, (hlo.count(" and("), gradient_leaves)
