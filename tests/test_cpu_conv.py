"""care_jax's CPU forms of convolution compute XLA's convolution and its gradients."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax import lax

import care_jax
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
    "few channels on a larger map (XLA's)": (9, 3, 8, 3, 1),
    "strided, few channels (XLA's)": (9, 16, 8, 3, 2),
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



@pytest.mark.parametrize("kernel", [1, 3])
def test_padding_given_as_text_takes_the_same_forms(kernel):
  """flax passes its default padding as "SAME": a 1x1 conv must still be a matrix product."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 5, 5, 6), np.float32)
  w = rng.standard_normal((kernel, kernel, 6, 4), np.float32)
  ours = lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                                    precision=lax.Precision.HIGHEST)
  want = reference(x, w, (1, 1), "SAME")
  np.testing.assert_allclose(quick_jit(ours, x, w), want, rtol=1e-5, atol=1e-5)
  if jax.default_backend() == "cpu" and kernel == 1:
    assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, w))


def test_max_pool_and_its_gradient_match_flax_ties_included():
  import flax.linen as nn
  rng = np.random.default_rng(2)
  # After a ReLU most windows tie at 0; a tie's gradient goes to the window's first max.
  x = np.maximum(rng.standard_normal((2, 9, 8, 3), np.float32), 0)
  x[:, :, :, 1] = 1.0
  g = rng.standard_normal((2, 5, 4, 3), np.float32)

  def both(x):
    ours = jax.vjp(lambda x: cpu_conv.max_pool(x, window=3, stride=2, pad=1), x)
    theirs = jax.vjp(lambda x: nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))), x)
    return [(out, vjp(g)[0]) for out, vjp in (ours, theirs)]

  (got, got_grad), (want, want_grad) = quick_jit(both, x)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6)
  assert np.count_nonzero(got_grad[..., 1]) == got.shape[1] * got.shape[2] * 2


def test_xla_forms_gives_xla_s_own_program_on_a_cpu():
  """The run plan traces inside it: its residuals must be those of XLA:GPU's program."""
  x = np.ones((2, 8, 8, 4), np.float32)
  w = np.ones((1, 1, 4, 8), np.float32)
  # New functions each time: JAX caches a function's trace, and the choice is made in it.
  programs = {
      "max_pool": lambda: jax.make_jaxpr(lambda x: cpu_conv.max_pool(x, 3, 2, 1))(x),
      "conv": lambda: jax.make_jaxpr(lambda x: cpu_conv.conv_general_dilated(
          x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(x)}
  for name, program in programs.items():
    assert "custom_vjp" in str(program()), name
    with cpu_conv.xla_forms():
      assert "custom_vjp" not in str(program()), name
    assert "custom_vjp" in str(program()), name


_COMPILED_CONV = """
import os
import care_jax
import jax, jax.numpy as jnp
x, w = jnp.ones((1, 8, 8, 64)), jnp.ones((3, 3, 64, 64))  # large enough for YNNPACK
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
print(os.environ.get("XLA_FLAGS", ""))
print("__ynn_fusion" in jax.jit(conv).lower(x, w).compile().as_text())
"""


@pytest.mark.parametrize("own_flag", [False, True])
def test_import_selects_xla_s_eigen_convolutions_unless_the_user_chose(own_flag):
  """On import care_jax takes convolutions away from YNNPACK (slower for ours on a CPU);
  a user's own setting of the flag is left as it is."""
  flags = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution" if own_flag else ""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  out = subprocess.run([sys.executable, "-c", _COMPILED_CONV], env=env, capture_output=True,
                       text=True, check=True).stdout.splitlines()
  known = (0, 10) <= tuple(int(p) for p in jax.lib.__version__.split(".")[:2]) < (0, 12)
  if own_flag or not known:  # unknown versions: XLA could refuse the flag, it is not set
    assert out[0] == flags
  else:
    assert out == [f"--{care_jax._YNN_FLAG}=-individual_convolution", "False"]
  if own_flag:
    assert out[1] == "True"
