"""The CARE release's checkpoint (`*_ckpt.pth.tar`) and its names for every weight.

The release saves `{"start_epoch", "model", "optimizer"}` from a DistributedDataParallel
wrapper (spec, "Checkpoint format of the release"): `model` holds
`module.student_encoder.*` (online network) and `module.teacher_encoder.*` (target). Inside
an encoder:

- the trunk has torchvision's names (`conv1`, `layer3.5.bn2`, `layer2.0.downsample.0`);
- the T-stream is `trans.net.<i>`; each block's main path is a Sequential
  `net.[0 conv_in, 1 bn_in, 2 ReLU, 3 attention, 4 pool, 5 bn_mid, 6 ReLU, 7 conv_out,
  8 bn_out]`, the attention holds `to_qkv` and `pos_emb.height`/`.width`
  (`rel_height`/`rel_width` in the relative variant), and block 0's shortcut is
  `shortcut.[0 conv, 1 BN, 2 ReLU]`;
- `fc1` is the C-stream head and `fc2` the T-stream head, each a Sequential
  `[0 Linear, 1 BN, 2 ReLU, 3 Linear]` (the projector) followed, in the online network
  only, by `[4 Linear, 5 BN, 6 ReLU, 7 Linear]` (the predictor) and a parameter-free
  Normalize.

Reading the file needs torch; it is loaded with `weights_only=True`, so a file that would
run code when unpickled is refused instead.
"""
import pathlib
import warnings

from care_jax.interop import state_dict, torchvision
from care_jax.interop.state_dict import ConversionError

ONLINE, TARGET = "student_encoder.", "teacher_encoder."
_DDP = "module."

_T_BLOCK = {"shortcut_conv": "shortcut.0", "shortcut_bn": "shortcut.1", "conv_in": "net.0",
            "bn_in": "net.1", "bn_mid": "net.5", "conv_out": "net.7", "bn_out": "net.8"}
_ATTENTION = {"qkv": "to_qkv", "pos_height": "pos_emb.height", "pos_width": "pos_emb.width",
              "rel_height": "pos_emb.rel_height", "rel_width": "pos_emb.rel_width"}
_HEAD = {"c": "fc1", "t": "fc2"}
_HEAD_LAYER = {("projector", "dense1"): 0, ("projector", "bn"): 1, ("projector", "dense2"): 3,
               ("predictor", "dense1"): 4, ("predictor", "bn"): 5, ("predictor", "dense2"): 7}


def network_name(path) -> str:
  """Release name (inside an encoder) of the care_jax module at `path` in a CareNetwork."""
  part, *rest = path
  if part == "trunk":
    return torchvision.trunk_name(rest)
  if part == "t_stream":
    block, layer, *inner = rest
    index = block.removeprefix("block")
    if layer == "attention":
      return f"trans.net.{index}.net.3.{_ATTENTION[inner[0]]}"
    return f"trans.net.{index}.{_T_BLOCK[layer]}"
  stream, role = part.split("_")  # e.g. c_projector
  return f"{_HEAD[stream]}.{_HEAD_LAYER[role, rest[0]]}"


def read_checkpoint(path):
  """({key: numpy array} of the checkpoint's `model`, DDP prefix removed; start_epoch).

  `start_epoch` is None when the file has none.
  """
  path = pathlib.Path(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConversionError("Reading a PyTorch checkpoint needs torch: pip install -r "
                          "requirements-interop.txt") from None
  if not path.is_file():
    raise ConversionError(f"{path}: no such file.")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # e.g. about the pickle protocol of old files
    try:
      checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for files it cannot read
      raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({_reason(e)}); "
                            "files that hold anything but tensors and plain containers are "
                            "refused, never unpickled.") from None
  model = checkpoint.get("model") if isinstance(checkpoint, dict) else None
  if not isinstance(model, dict):
    found = (f"top-level keys {sorted(map(str, checkpoint))[:8]}"
             if isinstance(checkpoint, dict) else type(checkpoint).__name__)
    raise ConversionError(f"{path} is not a CARE release checkpoint: expected a dict with a "
                          f"'model' state dict, found {found}.")
  tensors = {}
  for key, value in model.items():
    if not isinstance(value, torch.Tensor):
      raise ConversionError(f"{path} is not a CARE release checkpoint: model entry {key!r} "
                            f"is a {type(value).__name__}, not a tensor.")
    value = value.detach()
    tensors[key.removeprefix(_DDP)] = (value.float() if value.dtype == torch.bfloat16
                                       else value).numpy()
  start_epoch = checkpoint.get("start_epoch")
  return tensors, None if start_epoch is None else int(start_epoch)


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue",
                      "Check the documentation")


def _reason(error: Exception) -> str:
  """The informative line of torch's (often multi-paragraph) load errors."""
  if isinstance(error, EOFError):
    return "the file is empty or truncated"
  lines = [line.strip() for line in str(error).splitlines()
           if line.strip() and not line.strip().startswith(_TORCH_BOILERPLATE)]
  return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__


def import_networks(tensors, abstract_state, source: str):
  """(online_params, online_stats, target_params, target_stats) from the release's dict.

  Every care_jax leaf must come from a key of the right shape and every key must be used
  (BatchNorm's `num_batches_tracked` counts as used); otherwise one error lists them all.
  """
  if not any(key.startswith(ONLINE) for key in tensors):
    raise ConversionError(f"{source} is not a CARE release checkpoint: its model has no "
                          f"{ONLINE}* weights (first keys: {', '.join(sorted(tensors)[:3])}).")
  importer = state_dict.Importer(tensors, source)
  online = importer.read(abstract_state.online_params, abstract_state.online_stats,
                         network_name, ONLINE)
  target = importer.read(abstract_state.target_params, abstract_state.target_stats,
                         network_name, TARGET)
  importer.check("Does --config-preset name the checkpoint's network (the release's is "
                 "r50_100ep)?")
  return (*online, *target)
