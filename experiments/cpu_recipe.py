"""Chooses a CPU recipe by measurement: each setting pretrained with several seeds, then the
demo's linear probe of the pretrained encoder (and, once per network, of its random
initialisation), one JSON line per run appended to --out.

A setting is NAME or NAME:FIELD=VALUE,FIELD=VALUE (fields as for --config.FIELD=VALUE) on
top of --config; steps, seeds and the monitors are the same for every setting. A run whose
line is already in --out is skipped, so the same command resumes a sweep.

  python experiments/cpu_recipe.py --config=configs/care.py:fmnist_cpu --steps=1000 \
      --seeds=0,1 --out=runs/recipe/runs.jsonl base lr2:optimizer.base_lr=2.0
  python experiments/cpu_recipe.py --table --out=runs/recipe/runs.jsonl   # markdown
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from care_jax import cli, demo, run_safety  # noqa: E402


def _setting(text: str) -> tuple[str, list]:
  name, _, fields = text.partition(":")
  return name, [f for f in fields.split(",") if f]


def _done(out: pathlib.Path) -> dict:
  if not out.exists():
    return {}
  lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
  return {(r["setting"], r["seed"], r["encoder"]): r for r in lines}


def _probe(config, workdir: pathlib.Path, encoder: str, safety) -> dict:
  from care_jax.evaluation import linear  # noqa: PLC0415
  eval_config = config.copy_and_resolve_references()
  eval_config.mode = "linear_eval"
  eval_config.linear_eval.encoder = encoder
  eval_config.linear_eval.pretrained_workdir = str(workdir / "pretrain")
  t = time.monotonic()
  out = linear.evaluate(eval_config, str(workdir / f"linear_{encoder}"), safety)
  return {"probe_top1": out["final_top1"], "probe_seconds": round(time.monotonic() - t, 1)}


def run_one(args, name: str, fields: list, seed: int, safety) -> list:
  """The records of one (setting, seed): pretrained, and random init for seed 0."""
  from care_jax import train  # noqa: PLC0415
  from care_jax.data import input_pipeline  # noqa: PLC0415
  config = cli.config_from_spec(args.config, [*args.common, *fields, f"seed={seed}",
                                              f"num_train_steps={args.steps}"])
  config.monitor.every_steps = args.steps
  config.checkpoint_every_steps = args.steps
  workdir = pathlib.Path(args.workdir) / f"{name}_s{seed}"
  steps_per_epoch, total = train.schedule_length(
      config, input_pipeline.dataset_info(config.data).num_train_examples)
  t = time.monotonic()
  pre = demo.pretrain(config, workdir / "pretrain", steps_per_epoch, total, 0, safety)
  base = {"setting": name, "fields": fields, "common": args.common, "seed": seed,
          "config": args.config, "steps": args.steps,
          "epochs": pre["pretrain_epochs"], "pretrain_seconds": round(time.monotonic() - t, 1),
          "pairs_per_sec": pre.get("pretrain_pairs_per_sec_median"),
          "knn_top1": pre.get("knn_top1"), "online_probe_top1": pre.get("online_probe_top1")}
  records = [{**base, "encoder": "pretrained", **_probe(config, workdir, "pretrained", safety)}]
  if seed == args.seeds[0] and not args.no_random_init:
    records.append({**base, "encoder": "random_init",
                    **_probe(config, workdir, "random_init", safety)})
  return records


def table(out: pathlib.Path) -> str:
  """Every run of --out as a markdown table, the random-init probe of each setting last."""
  rows = ["| setting | seed | steps (epochs) | pretraining minutes | pairs/s | kNN top-1 | "
          "online probe | linear probe | random init |", "|---" * 9 + "|"]
  records = list(_done(out).values())
  random_init = {r["setting"]: r["probe_top1"] for r in records if r["encoder"] == "random_init"}
  for r in records:
    if r["encoder"] != "pretrained":
      continue
    fields = ", ".join(r["fields"]) or "the preset"
    random = random_init.get(r["setting"])  # not probed with --no_random_init
    rows.append(f"| {r['setting']}: {fields} | {r['seed']} | {r['steps']} ({r['epochs']:g}) | "
                f"{r['pretrain_seconds'] / 60:.1f} | {r['pairs_per_sec']} | "
                f"{r['knn_top1']:.4f} | {r['online_probe_top1']:.4f} | {r['probe_top1']:.4f} | "
                f"{'-' if random is None else f'{random:.4f}'} |")
  return "\n".join(rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("settings", nargs="*", help="NAME[:FIELD=VALUE,...]")
  p.add_argument("--config", default="configs/care.py:fmnist_cpu")
  p.add_argument("--common", default="", help="FIELD=VALUE,... for every setting")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--workdir", default="runs/recipe")
  p.add_argument("--out", default="runs/recipe/runs.jsonl")
  p.add_argument("--no_random_init", action="store_true")
  p.add_argument("--table", action="store_true", help="print --out's runs as markdown")
  args = p.parse_args(argv)
  if args.table:
    print(table(pathlib.Path(args.out)))
    return
  args.seeds = [int(s) for s in args.seeds.split(",")]
  args.common = [f for f in args.common.split(",") if f]
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  safety = run_safety.RunSafety()
  for seed in args.seeds:  # every setting's first seed before any second one
    for name, fields in map(_setting, args.settings):
      if (name, seed, "pretrained") in _done(out):
        continue
      for record in run_one(args, name, fields, seed, safety):
        with out.open("a") as f:
          f.write(json.dumps(record) + "\n")
        print("RECORD", json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
