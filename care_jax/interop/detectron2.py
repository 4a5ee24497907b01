"""The trunk as a Detectron2 backbone: names, file contents and the config it needs.

Detectron2's ResNet calls the stem `stem.conv1` and the stages `res2`..`res5`, keeps each
conv's BatchNorm under `.norm` and the projection shortcut under `.shortcut`. In the C4
detector `res5` lives in the ROI head (`roi_heads.res5`); the file sets
`matching_heuristics` so that Detectron2 matches those names by suffix.

The trunk was trained on RGB images normalised with the ImageNet mean/std on a 0-1 scale,
and uses torchvision's v1.5 blocks (stride on the 3x3 conv): Detectron2's defaults (BGR,
Caffe's mean without std, stride on the 1x1 conv) differ in all three, so the options
below are part of the export, not a suggestion.
"""
import json
import shlex

from care_jax.interop import state_dict
from care_jax.models.resnet import ARCHITECTURES

AUTHOR = "care_jax"
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)

_STEM = {"conv1": "stem.conv1", "bn1": "stem.conv1.norm"}
_BLOCK = {"conv1": "conv1", "bn1": "conv1.norm", "conv2": "conv2", "bn2": "conv2.norm",
          "conv3": "conv3", "bn3": "conv3.norm", "downsample_conv": "shortcut",
          "downsample_bn": "shortcut.norm"}


def trunk_name(path) -> str:
  """('layer2_0', 'bn3') -> 'res3.0.conv3.norm'; ('bn1',) -> 'stem.conv1.norm'."""
  block, *layer = path
  if not layer:
    return _STEM[block]
  stage, index = block.split("_")
  return f"res{int(stage.removeprefix('layer')) + 1}.{index}.{_BLOCK[layer[0]]}"


def checkpoint(params, stats):
  """The object to pickle: what Detectron2's checkpointer reads from a `.pkl`."""
  return {"model": state_dict.export(params, stats, trunk_name, batches_tracked=False),
          "__author__": AUTHOR, "matching_heuristics": True}


def options(model_config, weights: str):
  """{Detectron2 config key: value} that make Detectron2 build and feed this trunk."""
  block, _ = ARCHITECTURES[model_config.arch]
  expansion = 4 if block == "bottleneck" else 1
  return {
      "MODEL.WEIGHTS": weights,
      "MODEL.PIXEL_MEAN": list(IMAGENET_MEAN_255),
      "MODEL.PIXEL_STD": list(IMAGENET_STD_255),
      "INPUT.FORMAT": "RGB",
      "MODEL.RESNETS.DEPTH": int(model_config.arch.removeprefix("resnet")),
      "MODEL.RESNETS.STRIDE_IN_1X1": False,
      "MODEL.RESNETS.NUM_GROUPS": 1,
      "MODEL.RESNETS.WIDTH_PER_GROUP": model_config.channels * model_config.width,
      "MODEL.RESNETS.STEM_OUT_CHANNELS": model_config.channels,
      "MODEL.RESNETS.RES2_OUT_CHANNELS": model_config.channels * expansion,
  }


def _yaml_value(value) -> str:
  """Scalars and flat lists as YAML (strings JSON-quoted, which YAML reads as well)."""
  if isinstance(value, str):
    return json.dumps(value)
  if isinstance(value, bool):
    return "True" if value else "False"
  if isinstance(value, list):
    return "[" + ", ".join(str(v) for v in value) + "]"
  return str(value)


def options_yaml(opts) -> str:
  """The options as a nested YAML mapping (Detectron2's `merge_from_file` format)."""
  tree = {}
  for key, value in opts.items():
    *path, leaf = key.split(".")
    node = tree
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return "".join(_yaml_lines(tree, 0))


def _yaml_lines(tree, depth):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield "  " * depth + f"{key}:\n"
      yield from _yaml_lines(value, depth + 1)
    else:
      yield "  " * depth + f"{key}: {_yaml_value(value)}\n"


def options_command_line(opts) -> str:
  """The options as `KEY VALUE` pairs for the end of Detectron2's `train_net.py` line."""
  def value(v):
    return shlex.quote(v if isinstance(v, str) else _yaml_value(v).replace(" ", ""))
  return " ".join(f"{key} {value(v)}" for key, v in opts.items())
