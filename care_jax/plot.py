"""A pretraining run's learning curve from its TensorBoard events:

  python -m care_jax.plot --workdir=DIR --out=FILE.png [--results=RESULTS.json]

Plots the monitors' top-1 on the eval split (kNN, online probe) against epochs, and with
--results (the demo's results.json) the final linear-probe top-1 of the pretrained
encoder, the random-init one and raw pixels as horizontal lines. Prints the points as JSON.
Epochs come from the 'epoch' scalar the trainer logs beside the step.
"""
import argparse
import json
import pathlib

from care_jax import cli
from care_jax.errors import UserError

_CURVES = {"knn_top1": "kNN top-1", "online_probe_top1": "online probe top-1"}
_BASELINES = {"linear_top1": "linear probe, pretrained",
              "random_init_linear_top1": "linear probe, random init",
              "raw_pixels_linear_top1": "linear probe, raw pixels"}


def read_scalars(workdir: str) -> dict:
  """{tag: [(step, value), ...]} of every scalar in the workdir's event files, by step."""
  from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415
  from tensorboard.util import tensor_util  # noqa: PLC0415
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  events.Reload()
  return {tag: _without_orphans(
              (e.wall_time, e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
              for e in events.Tensors(tag))
          for tag in events.Tags()["tensors"]}


def _without_orphans(points) -> list:
  """[(step, value), ...] of (wall time, step, value) points, one per step. A run resumed
  from an earlier checkpoint than its last logged step (killed after step 150, resumed
  from 100) logs the steps after the checkpoint again: in the order they were written, a
  point replaces every earlier one at its step or later, as TensorBoard's purge of
  orphaned data does, so the curve is the resumed run's."""
  kept = []
  for _, step, value in sorted(points, key=lambda p: p[0]):  # stable: file order on ties
    while kept and kept[-1][0] >= step:
      kept.pop()
    kept.append((step, value))
  return kept


def steps_per_epoch(scalars: dict):
  """From the trainer's 'epoch' scalar (step / steps per epoch), or None if not logged."""
  points = [(step, epoch) for step, epoch in scalars.get("epoch", []) if epoch > 0]
  return points[-1][0] / points[-1][1] if points else None


def learning_curve(scalars: dict) -> dict:
  """{tag: [(epoch or step, value), ...]} of the monitors' curves, and the x unit."""
  per_epoch = steps_per_epoch(scalars)
  unit = "epoch" if per_epoch else "step"
  scale = 1 / per_epoch if per_epoch else 1
  return {"x": unit, **{tag: [(round(step * scale, 3), value) for step, value in scalars[tag]]
                        for tag in _CURVES if tag in scalars}}


def draw(curve: dict, baselines: dict, out: str, title: str) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for tag, label in _CURVES.items():
    if tag in curve:
      x, y = zip(*curve[tag])
      ax.plot(x, y, marker="o", markersize=3, label=label)
  for (key, label), style in zip(_BASELINES.items(), ("-", "--", ":")):
    if key in baselines:
      ax.axhline(baselines[key], color="grey", linestyle=style,
                 label=f"{label} {baselines[key]:.3f}")
  ax.set_xlabel(f"pretraining {curve['x']}s")
  ax.set_ylabel("top-1 on the eval split")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a pretraining run's workdir")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--results", default=None, help="the demo's results.json (optional)")
  parser.add_argument("--title", default=None)
  args = parser.parse_args(argv)
  try:
    _plot(args)
  except UserError as e:
    cli.fail(e)


def _results(path) -> dict:
  """The linear-probe baselines of a results.json."""
  try:
    results = json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"Cannot read --results {path} ({getattr(e, 'strerror', None) or e}); "
                    "pass the demo's results.json or leave --results out.") from None
  return {k: v for k, v in results.items() if k in _BASELINES}


def _plot(args) -> None:
  if not pathlib.Path(args.workdir).is_dir():
    raise UserError(f"--workdir {args.workdir} is not a directory; pass a pretraining run's "
                    "workdir.")
  if not pathlib.Path(args.out).absolute().parent.is_dir():
    raise UserError(f"--out {args.out}: its folder does not exist.")
  baselines = _results(args.results) if args.results else {}
  curve = learning_curve(read_scalars(args.workdir))
  if not any(tag in curve for tag in _CURVES):
    raise UserError(f"No kNN or online-probe scalars in {args.workdir}: was the run's "
                    "config.monitor.every_steps > 0, on labelled data?")
  draw(curve, baselines, args.out, args.title or f"CARE pretraining: {args.workdir}")
  print(json.dumps({"out": args.out, **curve, **baselines}))


if __name__ == "__main__":
  main()
