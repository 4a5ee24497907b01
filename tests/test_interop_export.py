"""`care_jax.pretrained` and `convert export`: the online trunk leaves care_jax intact.

The reference forward pass (tests/interop_reference.py) is torchvision's ResNet written
with torch's functional ops on the exported state dict, so it reads the keys as
torchvision names them, not as care_jax.interop does.
"""
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml

from care_jax import checkpointing, convert, pretrained
from care_jax.interop import ConversionError, torchvision
from care_jax.training import pretraining
from tests.conftest import ROOT, load_config, quick_jit

torch = pytest.importorskip("torch")
# pylint: disable-next=wrong-import-position
from tests.interop_reference import ARCHS, resnet_forward


def random_state(setup, seed):
  """A whole TrainState of random values, drawn without compiling an initialiser. BN
  scales, biases and running statistics are far from their init (1, 0, 0, 1), so that a
  mixed-up or ignored BN tensor changes the features."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = getattr(path[-1], "key", None)
    if name == "kernel":  # He-normal, so activations keep their scale through the depth
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(x.shape[:-1])), x.shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, x.shape)
    else:  # biases, means, position tables, optimiser state, step, rng
      value = 0.1 * rng.standard_normal(x.shape)
    return value.astype(x.dtype)

  return jax.tree_util.tree_map_with_path(draw, setup.abstract_state())


@pytest.fixture(scope="module", params=sorted(ARCHS))
def run(request, tmp_path_factory):
  """A workdir of a tiny network with the ImageNet stem (7x7/2 conv, max-pool) at 32 px."""
  config = load_config("tiny")
  config.model.update(arch=request.param, stem="imagenet")
  config.data.image_size = 32
  state = random_state(pretraining.build(config, 1, 1), seed=1)
  workdir = tmp_path_factory.mktemp(request.param)
  checkpointing.save_config(workdir, config)
  with checkpointing.manager(workdir) as mgr:
    checkpointing.save(mgr, 3, state)
    mgr.wait_until_finished()
  images = np.random.default_rng(3).standard_normal((4, 32, 32, 3)).astype(np.float32)
  network, variables = pretrained.load(workdir)
  outputs = quick_jit(lambda v, x: network.apply(v, x, train=False), variables, images)
  return dict(workdir=workdir, config=config, state=state, images=images, network=network,
              variables=variables, outputs=jax.device_get(outputs))


def test_pretrained_load_gives_the_online_network_in_eval_mode(run):
  state, variables, outputs = run["state"], run["variables"], run["outputs"]
  saved = {"params": state.online_params, "batch_stats": state.online_stats}
  assert jax.tree.structure(variables) == jax.tree.structure(saved)
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(got, want)
  channels = run["network"].trunk.out_channels
  assert outputs["features"].shape == (4, channels)
  for stream in ("c", "t"):
    np.testing.assert_allclose(np.linalg.norm(outputs[stream], axis=-1), 1.0, rtol=1e-5)
  assert np.std(outputs["features"]) > 0


class Recording(dict):
  def __init__(self, *args):
    super().__init__(*args)
    self.read = set()

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)


def test_torchvision_export_computes_care_jax_features(run, tmp_path, capsys):
  out = tmp_path / "trunk.pth"
  assert convert.main(["export", str(run["workdir"]), "--format", "torchvision",
                       "--out", str(out)]) == 0
  assert "model.fc = torch.nn.Identity()" in capsys.readouterr().out
  weights = Recording(torch.load(out, weights_only=True))
  images = torch.from_numpy(run["images"].transpose(0, 3, 1, 2))
  with torch.no_grad():
    _, features = resnet_forward(weights, images, run["config"].model.arch)
  want = run["outputs"]["features"]
  np.testing.assert_allclose(features.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  unread = set(weights) - weights.read
  assert unread and all(k.endswith(".num_batches_tracked") for k in unread)
  assert not any(k.startswith("fc.") for k in weights)


def test_torchvision_round_trip_is_exact(run):
  trunk_params = run["state"].online_params["trunk"]
  trunk_stats = run["state"].online_stats["trunk"]
  exported = torchvision.export_trunk(trunk_params, trunk_stats)
  exported["fc.weight"] = np.zeros((10, 3), np.float32)  # a classifier is ignored
  shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  params, stats = torchvision.import_trunk(exported, shapes(trunk_params), shapes(trunk_stats),
                                           "trunk.pth")
  for got, want in ((params, trunk_params), (stats, trunk_stats)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  exported["layer9.0.conv1.weight"] = np.zeros(1, np.float32)
  with pytest.raises(ConversionError, match=r"1 unexpected keys: layer9\.0\.conv1\.weight"):
    torchvision.import_trunk(exported, shapes(trunk_params), shapes(trunk_stats), "trunk.pth")


def detectron2_name(torchvision_name):
  """Detectron2's names for torchvision's ResNet keys, as its conversion tool renames them."""
  name = torchvision_name if torchvision_name.startswith("layer") else "stem." + torchvision_name
  for stage in (1, 2, 3, 4):
    name = name.replace(f"layer{stage}.", f"res{stage + 1}.")
  for k in (1, 2, 3):
    name = name.replace(f"bn{k}.", f"conv{k}.norm.")
  return name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def test_detectron2_export_has_its_names_and_input_options(run, tmp_path, capsys):
  out = tmp_path / "care_r50.pkl"
  assert convert.main(["export", str(run["workdir"]), "--format", "detectron2",
                       "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  with open(out, "rb") as f:
    checkpoint = pickle.load(f)
  assert checkpoint["__author__"] == "care_jax" and checkpoint["matching_heuristics"] is True
  trunk = run["state"].online_params["trunk"], run["state"].online_stats["trunk"]
  want = {detectron2_name(k): v for k, v in torchvision.export_trunk(*trunk).items()
          if not k.endswith("num_batches_tracked")}
  assert set(checkpoint["model"]) == set(want)
  for key, value in want.items():
    np.testing.assert_array_equal(checkpoint["model"][key], value)
  options = yaml.safe_load(out.with_suffix(".yaml").read_text())
  assert options["INPUT"]["FORMAT"] == "RGB"
  model = options["MODEL"]
  assert model["WEIGHTS"] == str(out.resolve())
  assert model["PIXEL_MEAN"] == [123.675, 116.28, 103.53]
  assert model["PIXEL_STD"] == [58.395, 57.12, 57.375]
  assert model["RESNETS"]["STRIDE_IN_1X1"] is False
  assert model["RESNETS"]["DEPTH"] == int(run["config"].model.arch.removeprefix("resnet"))
  assert model["RESNETS"]["STEM_OUT_CHANNELS"] == run["config"].model.channels
  assert "INPUT.FORMAT RGB" in printed and "MODEL.RESNETS.STRIDE_IN_1X1 False" in printed


def test_detectron2_export_refuses_the_small_stem_and_other_names(tmp_path, capsys):
  checkpointing.save_config(tmp_path, load_config("tiny"))  # 16 px: the 3x3 stem
  assert exit_code(["export", str(tmp_path), "--format", "detectron2",
                       "--out", str(tmp_path / "x.pkl")]) == 2
  assert "small stem" in capsys.readouterr().err
  assert exit_code(["export", str(tmp_path), "--format", "detectron2",
                       "--out", str(tmp_path / "x.pth")]) == 2
  assert "*.pkl" in capsys.readouterr().err
  assert exit_code(["export", str(tmp_path / "absent"), "--format", "torchvision",
                       "--out", str(tmp_path / "x.pth")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "is not a care_jax workdir" in err


def test_a_workdir_without_checkpoints_gives_one_line(tmp_path):
  checkpointing.save_config(tmp_path, load_config("tiny"))
  out = subprocess.run([sys.executable, "-m", "care_jax.convert", "export", str(tmp_path),
                        "--format", "torchvision", "--out", str(tmp_path / "x.pth")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.count("\n") == 1 and "No checkpoint in" in out.stderr, out.stderr


def exit_code(args) -> int:
  with pytest.raises(SystemExit) as exit_:
    convert.main(args)
  return exit_.value.code
