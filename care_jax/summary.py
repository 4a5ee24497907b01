"""Parameter counts per part and FLOPs per train step:
`python -m care_jax.summary --config=configs/care.py[:preset] [--config.field=value ...]`.

Nothing is allocated: shapes come from jax.eval_shape and FLOPs from XLA's cost analysis
of the lowered (uncompiled) train step.
"""
import jax
import jax.numpy as jnp
from absl import app
from ml_collections import config_flags

from care_jax.training import pretraining

_CONFIG = config_flags.DEFINE_config_file("config", "configs/care.py", "Model config.")

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


def train_step_flops(setup, state, batch_size: int = 2) -> float:
  size = setup.image_size
  view = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
  cost = jax.jit(setup.train_step).lower(state, (view, view)).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / batch_size


def main(argv):
  del argv
  config = _CONFIG.value
  setup = pretraining.build(config, steps_per_epoch=1, total_steps=1)
  state = setup.abstract_state()
  rows = parameter_counts(state)
  size = config.data.image_size
  arch = f"{config.model.arch}" + (f" {config.model.width}x" if config.model.width > 1 else "")
  print(f"CARE {arch}, {size}x{size} px, precision {config.precision}")
  print(f"{'part':<24}{'online':>14}{'target':>14}")
  for part, (online, target) in rows.items():
    label = PART_NAMES.get(part, part)
    print(f"{label:<24}{online:>14d}{'-' if target is None else target:>14}")
  print(f"train-step FLOPs per image pair: {train_step_flops(setup, state):.4g}")


if __name__ == "__main__":
  app.run(main)
