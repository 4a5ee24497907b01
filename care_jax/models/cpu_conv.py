"""Convolutions and max-pooling in the forms XLA:CPU runs fastest; other backends get
XLA's own. Every form computes the same result; only the order of summation differs.

Why (figures in docs/benchmarks.md, "Convolution forms on a CPU"):
- a 3x3 conv whose output map is 2x2 (layer4 of the demo's trunk) is an order of magnitude
  faster written as one matrix product over the nine shifted inputs (im2col): XLA:CPU's
  convolution is slow on tiny maps;
- a 1x1 conv is a matrix product; written as one it is several times faster (flax passes
  its default padding as "SAME": it is resolved here, so 1x1 convs take this form), and
  its weight gradient transposes the input by a plain copy (_matmul);
Larger maps keep XLA's convolution, where im2col would cost more memory traffic than it
saves. These choices were measured with XLA:CPU's Eigen convolutions, which care_jax
selects on import (care_jax/__init__.py).
"""
import contextlib
import contextvars
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_MAX_IM2COL_OUTPUT_PIXELS = 4  # 2x2 maps: at 4x4 XLA's own conv is faster
_NHWC = ("NHWC", "HWIO", "NHWC")
_XLA_FORMS = contextvars.ContextVar("xla_forms", default=False)


@contextlib.contextmanager
def xla_forms():
  """Traces inside take XLA's own forms on a CPU too: the run plan models XLA:GPU's
  program, whose residuals these CPU forms would change."""
  token = _XLA_FORMS.set(True)
  try:
    yield
  finally:
    _XLA_FORMS.reset(token)


def _cpu_forms() -> bool:
  return jax.default_backend() == "cpu" and not _XLA_FORMS.get()


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None):
  """Drop-in for lax.conv_general_dilated, as flax's nn.Conv calls it (NHWC/HWIO)."""
  plain = (not _cpu_forms() or feature_group_count != 1
           or any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ())))
  if plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision)
  if isinstance(padding, str):  # flax's default "SAME", e.g. for every 1x1 conv
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  strides, padding = tuple(window_strides), tuple(tuple(p) for p in padding)
  kh, kw = rhs.shape[:2]
  ho, wo = _output_size(lhs.shape[1:3], (kh, kw), strides, padding)
  if (kh, kw) == (1, 1) or ho * wo <= _MAX_IM2COL_OUTPUT_PIXELS:
    return _im2col_conv(lhs, rhs, strides, padding, (ho, wo), precision)
  return lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


def _output_size(size, kernel, strides, padding):
  return tuple((n + lo + hi - k) // s + 1
               for n, k, s, (lo, hi) in zip(size, kernel, strides, padding))


def _shifted_inputs(x, kernel, strides, padding, output_size):
  """The input each kernel tap sees: one [N, Ho, Wo, C] slice of the padded input per tap."""
  (sh, sw), (ho, wo) = strides, output_size
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  return [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kernel[0]) for j in range(kernel[1])]


def _im2col_conv(x, w, strides, padding, output_size, precision):
  """All taps side by side ([N*Ho*Wo, kh*kw*C]) times the kernel as a [kh*kw*C, O] matrix."""
  taps = _shifted_inputs(x, w.shape[:2], strides, padding, output_size)
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  out = _matmul(patches.reshape(-1, patches.shape[-1]),
                _varying_like(w.reshape(-1, w.shape[-1]), x), precision)
  return out.reshape(x.shape[0], *output_size, w.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, precision):
  """x @ w, whose weight gradient x.T @ g transposes x on its own.

  Left to itself, XLA:CPU fuses that transpose into the elementwise ops that recompute x
  (BatchNorm, ReLU, the residual sum), and such a fusion writes transposed rows at a
  fraction of memory speed (docs/benchmarks.md). Behind an optimisation barrier x is
  computed in its own layout first and transposed by a plain copy.
  """
  return jnp.matmul(x, w, precision=precision)


def _matmul_fwd(x, w, precision):
  return _matmul(x, w, precision), (x, w)


def _matmul_bwd(precision, residuals, g):
  x, w = residuals
  dx = jnp.matmul(g, w.T, precision=precision)
  x, g = lax.optimization_barrier((x, g))
  return dx, jnp.matmul(x.T, g, precision=precision)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _varying_axes(a) -> frozenset:
  manual = getattr(jax.typeof(a), "manual_axis_type", None)  # None outside shard_map
  return frozenset() if manual is None else manual.varying


def _varying_like(w, x):
  """`w` marked as varying over the shard_map axes `x` varies over (a replicated kernel
  applied to one device's examples): a custom_vjp must return a per-device weight
  gradient with its input's type, and jax.shard_map sums it over the devices itself."""
  missing = tuple(_varying_axes(x) - _varying_axes(w))
  return jax.lax.pcast(w, missing, to="varying") if missing else w


def max_pool(x, window: int, stride: int, pad: int):
  """nn.max_pool(x, (window,) * 2, (stride,) * 2, ((pad, pad),) * 2) on NHWC. XLA:CPU
  expands max-pooling's gradient into index-tracking reductions over [5, *x.shape] iotas
  (docs/benchmarks.md); here it is one mask and one strided add per tap."""
  if not _cpu_forms():
    return nn.max_pool(x, (window, window), (stride, stride), ((pad, pad), (pad, pad)))
  return _max_pool(x, window, stride, pad)


def _pool_taps(x, window, stride, pad):
  padding = ((pad, pad), (pad, pad))
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
  ho, wo = _output_size(x.shape[1:3], (window, window), (stride, stride), padding)
  taps = [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
          for i in range(window) for j in range(window)]
  return xp.shape, taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, pad):
  return functools.reduce(jnp.maximum, _pool_taps(x, window, stride, pad)[1])


def _max_pool_fwd(x, window, stride, pad):
  out = _max_pool(x, window, stride, pad)
  return out, (x, out)


def _max_pool_bwd(window, stride, pad, residuals, g):
  """Each output's gradient to the first tap (row-major in the window) holding the max,
  as XLA's select-and-scatter does."""
  x, out = residuals
  padded_shape, taps = _pool_taps(x, window, stride, pad)
  taken = jnp.zeros(out.shape, bool)
  dx = jnp.zeros(padded_shape, g.dtype)
  ho, wo = out.shape[1:3]
  for t, tap in enumerate(taps):
    i, j = divmod(t, window)
    hit = (tap == out) & ~taken
    taken = taken | hit
    # The tap's gradients spread back to the padded input: stride - 1 zeros between them.
    spread = ((0, 0, 0), (i, padded_shape[1] - i - stride * (ho - 1) - 1, stride - 1),
              (j, padded_shape[2] - j - stride * (wo - 1) - 1, stride - 1), (0, 0, 0))
    dx = dx + lax.pad(jnp.where(hit, g, 0).astype(g.dtype), jnp.zeros((), g.dtype), spread)
  return (dx[:, pad:pad + x.shape[1], pad:pad + x.shape[2], :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
