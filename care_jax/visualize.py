"""Where the two streams of a CARE network look, drawn over the images (the paper's
attention figures):

  python -m care_jax.visualize --workdir=DIR --images=0,1,2,3 --out=FILE.png
      [--encoder=pretrained|random_init] [--block=0] [--query=mean|ROW,COL]

For each image (by index in the eval split of the workdir's dataset, centre view): the
image, then the T-stream attention of block `--block`, one panel per head, either of one
query position (ROW,COL on that block's grid) or averaged over all queries ('mean'), and
last a class-activation-style map of the C-stream. Maps are upsampled over the image.

The C-stream map: the C-stream projector's first layer is linear in the pooled layer4
features, so its pre-activation is the mean over positions of W1^T a(y, x), a(y, x) being
layer4's features at (y, x); the map is the norm of that contribution at each position
(CAM's decomposition, applied to the projector instead of a classifier).

`--encoder=random_init` draws the same network at its random initialisation, the
baseline to compare a trained one with.

The network and its config are the workdir's; `--config.data.FIELD=VALUE` changes where
and how the images are read (e.g. --config.data.data_dir). SIGTERM stops it between its
stages (loading the network, the images, the maps, drawing) with exit status 75 and no
PNG: rerun the same command.
"""
import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from care_jax import checkpointing, cli, pretrained, run_safety
from care_jax.data import augment, input_pipeline
from care_jax.errors import UserError


def load_network(workdir: str, encoder: str):
  """(config, online network, variables) of the workdir's run, trained or at random init."""
  config = checkpointing.load_config(workdir)
  if encoder == "pretrained":
    network, variables = pretrained.load(workdir)
  elif encoder == "random_init":
    network, variables = pretrained.random_init(config, config.data.image_size)
  else:
    raise UserError(f"--encoder must be 'pretrained' or 'random_init', got {encoder!r}.")
  return config, network, variables


def eval_images(data_config, indices) -> np.ndarray:
  """uint8 [n, S, S, 3] centre views of the eval split's examples at `indices`."""
  size = input_pipeline.dataset_info(data_config).num_eval_examples
  if not all(0 <= i < size for i in indices):
    raise UserError(f"--images must be indices below {size}, the size of the "
                    f"{data_config.eval_split} split; got {','.join(map(str, indices))}.")
  batch = next(input_pipeline.centre_view_batches(
      data_config, data_config.eval_split, global_batch_size=len(indices), indices=indices))
  return batch["image"]


def stream_maps(network, variables, images: np.ndarray, block: int = 0):
  """(attention, c_map) in eval mode: the attention weights of T-stream block `block`,
  float32 [n, heads, h, w, h, w] (query y, x; key y, x), and the C-stream map
  [n, h4, w4] on layer4's grid."""
  def forward(variables, images):
    _, state = network.apply(
        variables, augment.normalize(images), train=False, mutable=["intermediates"],
        capture_intermediates=lambda module, method: module.name == "trunk")
    intermediates = state["intermediates"]
    blocks = intermediates["t_stream"]
    if f"block{block}" not in blocks:
      raise UserError(f"--block must be from 0 to {len(blocks) - 1}, got {block}.")
    attention, = blocks[f"block{block}"]["attention"]["weights"]
    (_, layer4), = intermediates["trunk"]["__call__"]
    kernel = variables["params"]["c_projector"]["dense1"]["kernel"]
    contribution = jnp.einsum("nyxc,ch->nyxh", layer4.astype(jnp.float32),
                              kernel.astype(jnp.float32))
    return attention, jnp.linalg.norm(contribution, axis=-1)

  return jax.device_get(jax.jit(forward)(variables, images))


def query_maps(attention: np.ndarray, query: str) -> np.ndarray:
  """[n, heads, h, w] attention over keys of one query 'ROW,COL', or of all ('mean')."""
  if query == "mean":
    return attention.mean(axis=(2, 3))
  row, col = _query_position(query)
  h, w = attention.shape[2:4]
  if not (0 <= row < h and 0 <= col < w):
    raise UserError(f"--query {query} is outside the block's {h}x{w} grid.")
  return attention[:, :, row, col]


def _query_position(query: str) -> tuple[int, int]:
  try:
    row, col = (int(v) for v in query.split(","))
  except ValueError:
    raise UserError(f"--query must be 'mean' or a position ROW,COL such as 0,3; got "
                    f"{query!r}.") from None
  return row, col


def _indices(images: str) -> list:
  try:
    return [int(i) for i in images.split(",")]
  except ValueError:
    raise UserError(f"--images must be comma-separated indices such as 0,1,2; got "
                    f"{images!r}.") from None


def _upsampled(maps: np.ndarray, size: int) -> np.ndarray:
  """Bilinear upsampling of [..., h, w] maps to size x size, each scaled to [0, 1]."""
  up = np.asarray(jax.image.resize(maps, maps.shape[:-2] + (size, size), "bilinear"))
  low = up.min(axis=(-2, -1), keepdims=True)
  return (up - low) / np.maximum(up.max(axis=(-2, -1), keepdims=True) - low, 1e-12)


def draw(images: np.ndarray, t_maps: np.ndarray, c_maps: np.ndarray, out: str, title: str,
         panel_inches: float = 1.6, dpi: int = 100) -> None:
  """One row per image: image, one panel per head, C-stream map; PNG of
  (rows x panel, columns x panel) inches at `dpi`."""
  import matplotlib  # noqa: PLC0415  (only for drawing)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  n, heads = t_maps.shape[:2]
  size = images.shape[1]
  t_up, c_up = _upsampled(t_maps, size), _upsampled(c_maps, size)
  grey = images.mean(axis=-1)
  fig, axes = plt.subplots(n, heads + 2, figsize=((heads + 2) * panel_inches, n * panel_inches),
                           dpi=dpi, squeeze=False)
  for i in range(n):
    panels = [None] + [t_up[i, h] for h in range(heads)] + [c_up[i]]
    for j, overlay in enumerate(panels):
      ax = axes[i, j]
      ax.imshow(grey[i], cmap="gray", vmin=0, vmax=255)
      if overlay is not None:
        ax.imshow(overlay, cmap="jet", alpha=0.5, vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
  for j, name in enumerate(["image"] + [f"T head {h}" for h in range(heads)] + ["C-stream"]):
    axes[0, j].set_title(name, fontsize=8)
  fig.suptitle(title, fontsize=8)
  try:  # a stopped run leaves no half-drawn PNG
    run_safety.write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
  finally:
    plt.close(fig)


def entropy_per_head(attention: np.ndarray) -> list:
  """Mean attention entropy per head, as a fraction of the uniform attention's: 1 is
  uniform, lower is more focused."""
  n, heads, h, w = attention.shape[:4]
  p = attention.reshape(n, heads, h * w, h * w)
  entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(-1).mean(axis=(0, 2))
  return [round(float(e / np.log(h * w)), 4) for e in entropy]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a pretraining run's workdir")
  parser.add_argument("--images", default="0,1,2,3,4,5",
                      help="comma-separated indices into the dataset's eval split")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--encoder", default="pretrained", choices=["pretrained", "random_init"])
  parser.add_argument("--block", type=int, default=0, help="T-stream block (0: the first)")
  parser.add_argument("--query", default="mean", help="'mean' or a query position ROW,COL")
  safety = run_safety.RunSafety().listen()
  argv, overrides = cli.split_overrides(sys.argv[1:] if argv is None else argv)
  cli.refuse_old_flags([""] + argv, {"--config": "--config.data.FIELD=VALUE (the network "
                                                 "and its config are --workdir's)"})
  args = parser.parse_args(argv)
  run_safety.run(lambda: _visualize(args, overrides, safety))


def _visualize(args, overrides, safety) -> None:
  indices = _indices(args.images)  # the arguments' forms first, before anything is loaded
  if args.query != "mean":
    _query_position(args.query)
  if not pathlib.Path(args.out).absolute().parent.is_dir():
    raise UserError(f"--out {args.out}: its folder does not exist.")
  if any(not item.startswith("data.") for item in overrides):
    raise UserError("Only data fields may change (--config.data.FIELD=VALUE, e.g. where the "
                    "images are): the network is the one --workdir holds.")
  config, network, variables = load_network(args.workdir, args.encoder)
  cli.apply_overrides(config, overrides)
  safety.check()
  images = eval_images(config.data, np.asarray(indices, np.int64))
  safety.check()
  attention, c_maps = stream_maps(network, variables, images, args.block)
  safety.check()
  t_maps = query_maps(attention, args.query)
  grid = "x".join(str(d) for d in attention.shape[2:4])
  safety.check()
  draw(images, t_maps, c_maps, args.out,
       f"{args.encoder} encoder of {args.workdir}: T-stream block {args.block} ({grid}), "
       f"query {args.query}")
  print(json.dumps({"out": args.out, "encoder": args.encoder, "block": args.block,
                    "attention_grid": grid, "entropy_per_head": entropy_per_head(attention)}))


if __name__ == "__main__":
  main()
