"""care_jax variable trees <-> PyTorch-style state dicts, given a naming of the modules.

A naming maps the path of a care_jax module (inside the tree being converted) to the
dotted name of the PyTorch module that holds the same weights. The rest is fixed by the
layer type, recognised from the leaf names:

| care_jax leaf | PyTorch key | layout |
|---|---|---|
| conv `kernel` (HWIO) | `NAME.weight` | OIHW |
| dense `kernel` (in, out) | `NAME.weight` | (out, in) |
| `bias` | `NAME.bias` | same |
| BatchNorm `scale`; stats `mean`, `var` | `NAME.weight`; `.running_mean`, `.running_var` | same |
| anything else (the attention's position tables) | `NAME` | same |

PyTorch's BatchNorm also keeps `NAME.num_batches_tracked`, which care_jax has no use for
(momentum is fixed): it is consumed on import, so that "every key was used" holds, and
written as 0 on export where the target format expects it.

Conversions are exact (transposes only) and keep numpy arrays; zero-strided inputs stay
zero-strided, so shape checks of a full-size network cost no memory.
"""
from typing import Callable, Dict, Iterable, Mapping, Tuple

import numpy as np
from flax import traverse_util

from care_jax.errors import UserError

Naming = Callable[[Tuple[str, ...]], str]

BATCHES_TRACKED = "num_batches_tracked"
_LIST_AT_MOST = 10  # keys named per problem in an error message


class ConversionError(UserError):
  """Weights that cannot be converted; the one-line message says which and why."""


def _leaf_rule(path: Tuple[str, ...], ndim: int):
  """(torch module path, key suffix, care_jax -> torch, torch -> care_jax) for one leaf."""
  *module, leaf = path
  module = tuple(module)
  if leaf == "kernel" and ndim == 4:
    return module, ".weight", _hwio_to_oihw, _oihw_to_hwio
  if leaf == "kernel" and ndim == 2:  # (in, out) <-> (out, in)
    return module, ".weight", np.transpose, np.transpose
  suffix = {"bias": ".bias", "scale": ".weight", "mean": ".running_mean",
            "var": ".running_var"}.get(leaf)
  if suffix is None:  # a bare parameter: the naming names the tensor itself
    return tuple(path), "", _same, _same
  return module, suffix, _same, _same


def _hwio_to_oihw(kernel):
  return kernel.transpose(3, 2, 0, 1)


def _oihw_to_hwio(weight):
  return weight.transpose(2, 3, 1, 0)


def _same(a):
  return a


def _batch_norm_modules(stats) -> Iterable[Tuple[str, ...]]:
  return sorted({path[:-1] for path in traverse_util.flatten_dict(stats) if path[-1] == "mean"})


def export(params, stats, naming: Naming, *, batches_tracked: bool) -> Dict[str, np.ndarray]:
  """The tree as a {torch key: numpy array} dict in PyTorch's layouts."""
  out = {}
  for tree in (params, stats):
    for path, value in traverse_util.flatten_dict(tree).items():
      module, suffix, to_torch, _ = _leaf_rule(path, np.ndim(value))
      out[naming(module) + suffix] = np.array(to_torch(np.asarray(value)), order="C")
  if batches_tracked:
    for module in _batch_norm_modules(stats):
      out[f"{naming(module)}.{BATCHES_TRACKED}"] = np.zeros((), np.int64)
  return out


class Importer:
  """Fills care_jax trees from one state dict and remembers which keys it used.

  Several trees (online and target network) can be read from the same dict; `check()`
  then raises one error that lists every missing, unexpected or mis-shaped key.
  """

  def __init__(self, state_dict: Mapping[str, np.ndarray], source: str):
    self.state_dict = state_dict
    self.source = source
    self.used, self.missing, self.mismatched = set(), [], []

  def read(self, abstract_params, abstract_stats, naming: Naming, prefix: str = ""):
    """(params, stats) shaped like the abstract trees, from the keys `prefix + name`."""
    trees = []
    for tree in (abstract_params, abstract_stats):
      flat = {}
      for path, like in traverse_util.flatten_dict(tree).items():
        module, suffix, to_torch, from_torch = _leaf_rule(path, len(like.shape))
        key = prefix + naming(module) + suffix
        if key not in self.state_dict:
          self.missing.append(key)
          continue
        self.used.add(key)
        value = np.asarray(self.state_dict[key])
        expected = to_torch(np.broadcast_to(np.zeros((), np.float32), like.shape)).shape
        if value.shape != expected:
          self.mismatched.append(f"{key} {tuple(value.shape)} instead of {tuple(expected)}")
          continue
        flat[path] = from_torch(value).astype(like.dtype, copy=False)
      trees.append(traverse_util.unflatten_dict(flat))
    for module in _batch_norm_modules(abstract_stats):
      key = f"{prefix}{naming(module)}.{BATCHES_TRACKED}"
      if key in self.state_dict:  # optional: older PyTorch versions did not write it
        self.used.add(key)
    return tuple(trees)

  def check(self, hint: str = "") -> None:
    unexpected = sorted(set(self.state_dict) - self.used)
    problems = [f"{len(keys)} {what}: {_some(keys)}" for what, keys in (
        ("keys with the wrong shape", self.mismatched), ("missing keys", self.missing),
        ("unexpected keys", unexpected)) if keys]
    if problems:
      raise ConversionError(f"{self.source} does not fit the care_jax network: "
                            + "; ".join(problems) + (f". {hint}" if hint else "."))


def _some(items) -> str:
  items = list(items)
  shown = ", ".join(items[:_LIST_AT_MOST])
  more = len(items) - _LIST_AT_MOST
  return f"{shown} (and {more} more)" if more > 0 else shown
