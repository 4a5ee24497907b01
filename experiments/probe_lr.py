"""Chooses the linear probe's learning rate without looking at the test split.

The probe of the CPU presets trains a Linear + BatchNorm head on cached centre-view
features (care_jax.evaluation.linear). This script embeds the training split with each
encoder once, holds out --holdout of its images (a fixed permutation), trains the head on
the rest at each --lrs (the config's epochs, batch, momentum and cosine) and reports
top-1 on the held-out images, which choose, and on the test split, which only report.

  python experiments/probe_lr.py --pretrained_workdir=runs/fmnist_cpu_s0/pretrain \
      --lrs=0.2,0.05,0.02,0.01,0.005 --out=runs/probe_lr.jsonl
"""
import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from care_jax import cli, parallel  # noqa: E402

ENCODERS = ("pretrained", "random_init", "raw_pixels")


def split_features(config, encoder: str, workdir, mesh) -> dict:
  """{'train': (features, labels), 'test': ...} of the valid images, on the host."""
  from care_jax.evaluation import encoders, features, linear  # noqa: PLC0415
  config = config.copy_and_resolve_references()
  config.linear_eval.update(encoder=encoder, pretrained_workdir=workdir)
  fn, _ = linear.encoder_features(config, encoders.source(config.linear_eval),
                                  config.data.image_size, mesh)
  out = {}
  for name, split in (("train", config.data.train_split), ("test", config.data.eval_split)):
    parts = [tuple(np.asarray(a) for a in batch)
             for batch in features.apply_to_split(fn, config.data, split, mesh)]
    feats, labels, mask = (np.concatenate(p) for p in zip(*parts))
    out[name] = feats[mask], labels[mask]
  return out


def train_head(linear_config, train: tuple, evaluate: dict, lr: float, seed: int) -> dict:
  """Top-1 on each of `evaluate`'s (features, labels) after the probe's schedule at lr."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from care_jax.evaluation import classifier, linear  # noqa: PLC0415
  feats, labels = (jnp.asarray(a) for a in train)
  batch = linear_config.global_batch_size
  steps = len(labels) // batch
  schedule = optax.cosine_decay_schedule(lr * batch / 256, linear_config.num_epochs * steps)
  tx = optax.chain(optax.add_decayed_weights(linear_config.weight_decay),
                   optax.sgd(schedule, momentum=linear_config.momentum))
  head = linear.LinearHead(int(labels.max()) + 1)
  variables = head.init(jax.random.key(seed), feats[:2], train=False)
  state = classifier.initial_state(variables["params"], variables["batch_stats"], tx)
  step = classifier.training_step(head.apply, tx)

  @jax.jit
  def epoch(state, order):
    return jax.lax.scan(lambda s, idx: step(s, feats[idx], labels[idx]), state, order)[0]

  for e in range(linear_config.num_epochs):
    order = np.random.default_rng([seed, e]).permutation(len(labels))[:steps * batch]
    state = epoch(state, order.reshape(steps, batch))
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  return {name: float(np.mean(np.argmax(head.apply(variables, x, train=False), -1) == y))
          for name, (x, y) in evaluate.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/care.py:fmnist_cpu")
  p.add_argument("--pretrained_workdir", required=True)
  p.add_argument("--encoders", default=",".join(ENCODERS))
  p.add_argument("--lrs", default="0.2,0.05,0.02,0.01,0.005")
  p.add_argument("--holdout", type=int, default=10_000)
  p.add_argument("--out", default="runs/probe_lr.jsonl")
  args = p.parse_args(argv)
  config = cli.config_from_spec(args.config, [])
  mesh = parallel.create_mesh()
  rows = []
  for encoder in args.encoders.split(","):
    split = split_features(config, encoder, args.pretrained_workdir, mesh)
    x, y = split["train"]
    order = np.random.default_rng(0).permutation(len(y))
    held, fit = order[:args.holdout], order[args.holdout:]
    for lr in (float(v) for v in args.lrs.split(",")):
      top1 = train_head(config.linear_eval, (x[fit], y[fit]),
                        {"holdout": (x[held], y[held]), "test": split["test"]}, lr, config.seed)
      row = {"encoder": encoder, "pretrained_workdir": args.pretrained_workdir, "lr": lr,
             "epochs": config.linear_eval.num_epochs, **top1}
      rows.append(row)
      print(json.dumps(row), flush=True)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.open("a") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  lrs = sorted({r["lr"] for r in rows}, reverse=True)
  print("| encoder | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
  print("|---" * (len(lrs) + 1) + "|")
  for encoder in dict.fromkeys(r["encoder"] for r in rows):
    cells = {r["lr"]: f"{r['holdout']:.4f} ({r['test']:.4f})" for r in rows
             if r["encoder"] == encoder}
    print(f"| {encoder} | " + " | ".join(cells[lr] for lr in lrs) + " |")


if __name__ == "__main__":
  main()
