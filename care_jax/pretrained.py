"""A pretrained CARE network from a care_jax workdir, ready to apply.

    from care_jax import pretrained

    network, variables = pretrained.load("runs/care_r50")   # or a converted release
    out = network.apply(variables, images, train=False)       # images: [B, H, W, 3] float32
    out["features"]  # [B, 2048] pooled layer4: what linear evaluation and transfer use
    out["c"], out["t"]  # unit-norm C-stream and T-stream outputs (after the predictors)

Images are RGB, normalised with the ImageNet mean/std, as in pretraining. The network is
the online one (the release's student), in eval mode with its BatchNorm running statistics;
`network.trunk_features` (through `network.apply(..., method=...)`) skips the two streams.
The workdir's config.json says which network to build, so nothing else is needed.
"""
import jax

from care_jax import checkpointing
from care_jax.training import pretraining


def load(workdir, step=None, sharding=None):
  """(online CareNetwork, {"params", "batch_stats"}) of the latest (or given) checkpoint,
  restored straight onto `sharding` (e.g. replicated over a mesh; default: the first
  device).

  Raises checkpointing.CheckpointError when `workdir` holds no usable checkpoint.
  """
  config = checkpointing.load_config(workdir)
  setup = pretraining.build(config, steps_per_epoch=1, total_steps=1)
  abstract = setup.abstract_state()
  if sharding is not None:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
  state = checkpointing.restore_from_workdir(workdir, abstract, step)
  return setup.online_net, {"params": state.online_params, "batch_stats": state.online_stats}


def latest_step(workdir) -> int:
  """The step of the workdir's latest checkpoint (what `load` reads by default), the same
  on every process (checkpointing.agreed_steps)."""
  with checkpointing.manager(workdir, read_only=True) as mgr:
    step = next(iter(checkpointing.agreed_steps(mgr)), None)
  if step is None:
    raise checkpointing.CheckpointError(
        f"No checkpoint in {checkpointing.checkpoint_dir(workdir)}: pass the --workdir of a "
        "pretraining run that has saved one.")
  return step


def random_init(config, image_size: int, sharding=None):
  """(online CareNetwork, variables) of config.model at its random initialisation
  (config.seed), built for `image_size` (the stem depends on it) and placed with
  `sharding`: the baseline encoder."""
  config = config.copy_and_resolve_references()
  config.data.image_size = image_size
  setup = pretraining.build(config, steps_per_epoch=1, total_steps=1)
  state = setup.init_state(jax.random.key(config.seed), sharding)
  return setup.online_net, {"params": state.online_params, "batch_stats": state.online_stats}
