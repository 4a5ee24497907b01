"""The trunk under torchvision's ResNet names (`layer3.5.conv2`, `layer2.0.downsample.1`).

care_jax's trunk already uses torchvision's layer names with `_` for the block index, so
the naming only re-dots them. The release's trunk keys are these same names (spec,
"Checkpoint format of the release"), so `release` builds on this naming.

The result loads into `torchvision.models.resnet50()` (or `wide_resnet50_2` for width 2)
once its `fc` is replaced by `torch.nn.Identity()`: a self-supervised trunk has no
classifier. A trunk with the small stem (3x3 conv, no max-pool) needs that stem in the
torchvision model too.
"""
from care_jax.interop import state_dict

_SHORTCUT = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def trunk_name(path) -> str:
  """('layer2_0', 'downsample_bn') -> 'layer2.0.downsample.1'; ('bn1',) -> 'bn1'."""
  block, *layer = path
  if not layer:
    return block  # the stem's conv1 / bn1
  stage, index = block.split("_")
  return f"{stage}.{index}.{_SHORTCUT.get(layer[0], layer[0])}"


def export_trunk(params, stats):
  """{torchvision key: numpy array} for the trunk variables `params`, `stats`."""
  return state_dict.export(params, stats, trunk_name, batches_tracked=True)


def import_trunk(tensors, abstract_params, abstract_stats, source: str):
  """Trunk (params, stats) from a torchvision state dict; its `fc`, if any, is ignored."""
  tensors = {k: v for k, v in tensors.items() if not k.startswith("fc.")}
  importer = state_dict.Importer(tensors, source)
  params, stats = importer.read(abstract_params, abstract_stats, trunk_name)
  importer.check("Is it a torchvision ResNet of the config's depth and width?")
  return params, stats
