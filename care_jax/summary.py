"""Parameter counts per part and FLOPs per train step:
`python -m care_jax.summary --config=configs/care.py[:preset] [--config.field=value ...]`.

Nothing is allocated: shapes come from jax.eval_shape and FLOPs from XLA's cost analysis
of the lowered train step, or of the compiled one where the backend does not analyse
lowered programs (JAX 0.11 on CUDA).
"""
import sys
from typing import Optional

import jax
import jax.numpy as jnp
from absl import app, flags

# care_jax.main defines --config (and --workdir, unused here) and parse_flags, which reports
# a bad config or override as one line listing the valid fields: one behaviour for both.
from care_jax import main as care_main
from care_jax.training import pretraining

# Printing order and labels.
PART_NAMES = {"trunk": "trunk (stem..layer4)", "t_stream": "T-stream",
              "c_projector": "C-stream projector", "c_predictor": "C-stream predictor",
              "t_projector": "T-stream projector", "t_predictor": "T-stream predictor"}


def count(tree) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def parameter_counts(state):
  """{part: (online, target)} plus totals; target is None for the predictors it lacks."""
  rows = {part: (count(state.online_params[part]),
                 count(state.target_params[part]) if part in state.target_params else None)
          for part in PART_NAMES}
  rows["total"] = (count(state.online_params), count(state.target_params))
  return rows


def _flops(analysis) -> Optional[float]:
  """The 'flops' entry of a cost analysis (a dict, or a list of one per program), if any."""
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = analysis.get("flops") if analysis else None
  return float(flops) if flops is not None and flops > 0 else None


def program_flops(lowered, compiled=None, num_devices: int = 1) -> Optional[float]:
  """FLOPs of one run of a jitted program over all its devices, or None if XLA gives none.

  The lowered (global) program's analysis is preferred: it needs no compilation. JAX 0.11
  on CUDA returns None there, so the compiled program's is used next (compiled here if
  not given); that one is of each device's part after partitioning, hence x num_devices.
  """
  try:
    flops = _flops(lowered.cost_analysis())
  except Exception:  # Backends without a cost model raise rather than return None.
    flops = None
  if flops is not None:
    return flops
  try:
    compiled = compiled if compiled is not None else lowered.compile()
    flops = _flops(compiled.cost_analysis())
  except Exception:
    return None
  return None if flops is None else flops * num_devices


def train_step_flops(setup, state, batch_size: int = 2) -> Optional[float]:
  """XLA's FLOPs per image pair of the train step (no augmentation), None if unavailable."""
  size = setup.image_size
  view = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
  flops = program_flops(jax.jit(setup.train_step).lower(state, (view, view)))
  return None if flops is None else flops / batch_size


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = flags.FLAGS.config
  try:
    setup = pretraining.build(config, steps_per_epoch=1, total_steps=1)
    state = setup.abstract_state()
  except ValueError as e:  # UserError, or a config value the model cannot take
    sys.exit(f"error: {e}")
  rows = parameter_counts(state)
  size = config.data.image_size
  arch = f"{config.model.arch}" + (f" {config.model.width}x" if config.model.width > 1 else "")
  print(f"CARE {arch}, {size}x{size} px, precision {config.precision}")
  print(f"{'part':<24}{'online':>14}{'target':>14}")
  for part, (online, target) in rows.items():
    label = PART_NAMES.get(part, part)
    print(f"{label:<24}{online:>14d}{'-' if target is None else target:>14}")
  flops = train_step_flops(setup, state)
  print("train-step FLOPs per image pair: "
        + ("unavailable (XLA gave no cost analysis)" if flops is None else f"{flops:.4g}"))


if __name__ == "__main__":
  app.run(main, flags_parser=care_main.parse_flags)
