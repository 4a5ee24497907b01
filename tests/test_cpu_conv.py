"""care_jax's CPU forms of convolution compute XLA's convolution and its gradients."""
import jax
import numpy as np
import pytest
from jax import lax

from care_jax.models import cpu_conv
from tests.conftest import quick_jit


def reference(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  precision=lax.Precision.HIGHEST)


# (input side, channels in, channels out, kernel, stride): which form each takes on a CPU.
CASES = {
    "1x1 as a matrix product": (4, 8, 12, 1, 1),
    "strided 1x1": (5, 8, 12, 1, 2),
    "3x3 onto a 2x2 map (im2col)": (2, 40, 24, 3, 1),
    "strided 3x3 onto a 2x2 map (im2col)": (4, 40, 24, 3, 2),
    "few channels (per-tap weight gradient)": (9, 3, 8, 3, 1),
    "strided, few channels (per-tap)": (9, 16, 8, 3, 2),
    "many channels on a larger map (XLA's)": (6, 40, 8, 3, 1),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_xla_convolution_and_its_gradients(case):
  size, c_in, c_out, k, stride = CASES[case]
  rng = np.random.default_rng(0)  # numpy: jax.random would compile for seconds per shape
  x = rng.standard_normal((3, size, size, c_in), np.float32)
  w = rng.standard_normal((k, k, c_in, c_out), np.float32) / k
  strides, padding = (stride, stride), ((k // 2, k // 2),) * 2
  ours = lambda x, w: cpu_conv.conv_general_dilated(x, w, strides, padding,
                                                    precision=lax.Precision.HIGHEST)
  theirs = lambda x, w: reference(x, w, strides, padding)
  g = rng.standard_normal(jax.eval_shape(theirs, x, w).shape, np.float32)

  def outputs_and_gradients(x, w):
    return [(out, *vjp(g)) for out, vjp in (jax.vjp(ours, x, w), jax.vjp(theirs, x, w))]

  (got, *got_grads), (want, *want_grads) = quick_jit(outputs_and_gradients, x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(got_grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  if jax.default_backend() == "cpu" and (k == 1 or got.shape[1] * got.shape[2] <= 4):
    assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, w))  # the fast form

