"""`convert from-release`: the authors' checkpoint becomes a care_jax workdir, key by key.

The release's naming and computation are stated independently of care_jax.interop, in
tests/interop_reference.py: `ReleaseCare` has the release's keys (its parameter counts are
checked against the spec's table), `release_forward` computes what the release computes.
"""
import json
import pathlib
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from care_jax import checkpointing, convert
from care_jax.interop import ConversionError, release
from care_jax.training import pretraining
from tests.conftest import ROOT, load_config, quick_jit

torch = pytest.importorskip("torch")
# pylint: disable-next=wrong-import-position
from tests.interop_reference import DistributedDataParallel, ReleaseCare, release_forward

nn = torch.nn


def release_pairs(encoder, params, stats, predictor):
  """(care_jax leaf, release tensor in care_jax's layout) for every weight, walked module by
  module in parallel: the test's own statement of which release weight is which."""
  conv = lambda p, m: [(p["kernel"], m.weight.permute(2, 3, 1, 0))]
  dense = lambda p, m: [(p["kernel"], m.weight.T), (p["bias"], m.bias)]
  bn = lambda p, s, m: [(p["scale"], m.weight), (p["bias"], m.bias), (s["mean"], m.running_mean),
                        (s["var"], m.running_var)]
  trunk, trunk_stats = params["trunk"], stats["trunk"]
  pairs = conv(trunk["conv1"], encoder.conv1) + bn(trunk["bn1"], trunk_stats["bn1"], encoder.bn1)
  for i in range(1, 5):
    for j, block in enumerate(getattr(encoder, f"layer{i}")):
      p, s = trunk[f"layer{i}_{j}"], trunk_stats[f"layer{i}_{j}"]
      for k in (1, 2, 3):
        if hasattr(block, f"conv{k}"):
          pairs += conv(p[f"conv{k}"], getattr(block, f"conv{k}"))
          pairs += bn(p[f"bn{k}"], s[f"bn{k}"], getattr(block, f"bn{k}"))
      if hasattr(block, "downsample"):
        pairs += conv(p["downsample_conv"], block.downsample[0])
        pairs += bn(p["downsample_bn"], s["downsample_bn"], block.downsample[1])
  for i, block in enumerate(encoder.trans.net):
    p, s = params["t_stream"][f"block{i}"], stats["t_stream"][f"block{i}"]
    if hasattr(block, "shortcut"):
      pairs += conv(p["shortcut_conv"], block.shortcut[0])
      pairs += bn(p["shortcut_bn"], s["shortcut_bn"], block.shortcut[1])
    attention = block.net[3]
    pairs += conv(p["conv_in"], block.net[0]) + bn(p["bn_in"], s["bn_in"], block.net[1])
    pairs += conv(p["attention"]["qkv"], attention.to_qkv)
    pairs += [(p["attention"]["pos_height"], attention.pos_emb.height),
              (p["attention"]["pos_width"], attention.pos_emb.width)]
    pairs += bn(p["bn_mid"], s["bn_mid"], block.net[5]) + conv(p["conv_out"], block.net[7])
    pairs += bn(p["bn_out"], s["bn_out"], block.net[8])
  for stream, fc in (("c", encoder.fc1), ("t", encoder.fc2)):
    for role, first in (("projector", 0), ("predictor", 4))[:2 if predictor else 1]:
      p, s = params[f"{stream}_{role}"], stats[f"{stream}_{role}"]
      pairs += dense(p["dense1"], fc[first]) + bn(p["bn"], s["bn"], fc[first + 1])
      pairs += dense(p["dense2"], fc[first + 3])
  return pairs


def numpy_state_dict(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def test_release_r50_every_key_maps_with_its_shape():
  """The full-size release network, shapes only: meta tensors and zero-strided arrays."""
  config = load_config("r50_100ep")
  with torch.device("meta"):
    care = ReleaseCare(config)
  count = lambda m: sum(p.numel() for p in m.parameters())
  assert count(care.student_encoder) == 79_440_448  # spec, "Parameter counts"
  assert count(care.teacher_encoder) == 75_221_056
  tensors = {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape))
             for k, v in care.state_dict().items()}
  assert sum(k.endswith("num_batches_tracked") for k in tensors) > 100
  abstract = pretraining.build(config, 1, 1).abstract_state()
  online_params, online_stats, target_params, target_stats = release.import_networks(
      tensors, abstract, "r50")
  for got, want in ((online_params, abstract.online_params), (online_stats, abstract.online_stats),
                    (target_params, abstract.target_params), (target_stats, abstract.target_stats)):
    assert jax.tree.map(np.shape, got) == jax.tree.map(lambda x: x.shape, want)


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
  """A tiny release checkpoint whose every tensor holds distinct values, and its network."""
  config = load_config("tiny")
  care = ReleaseCare(config)
  with torch.no_grad():
    for index, tensor in enumerate(care.state_dict().values()):
      tensor.copy_((10_000 * (index + 1) + torch.arange(tensor.numel())).reshape(tensor.shape))
  path = tmp_path_factory.mktemp("release") / "care_tiny_ckpt.pth.tar"
  ddp = DistributedDataParallel(care)
  torch.save({"start_epoch": 7, "model": ddp.state_dict(),
              "optimizer": {"state": {}, "param_groups": [{"lr": 0.2}]}}, path)
  return config, care, path


def test_from_release_puts_every_weight_in_its_place(tiny_release, tmp_path, capsys):
  config, care, path = tiny_release
  workdir = tmp_path / "converted"
  assert convert.main(["from-release", str(path), "--workdir", str(workdir),
                       "--config=configs/care.py:tiny"]) == 0
  assert "release epoch 7" in capsys.readouterr().out
  assert json.loads((workdir / convert.PROVENANCE).read_text())["start_epoch"] == 7
  setup = pretraining.build(checkpointing.load_config(workdir), 1, 1)
  state = checkpointing.restore_from_workdir(workdir, setup.abstract_state())
  assert int(state.step) == 0
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(state.opt_state))  # fresh momentum
  for encoder, params, stats, predictor in (
      (care.student_encoder, state.online_params, state.online_stats, True),
      (care.teacher_encoder, state.target_params, state.target_stats, False)):
    pairs = release_pairs(encoder, params, stats, predictor)
    assert len(pairs) == len(jax.tree.leaves((params, stats)))  # every care_jax leaf
    weights = [k for k in encoder.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(pairs) == len(weights)  # every release weight
    for leaf, tensor in pairs:
      np.testing.assert_array_equal(np.asarray(leaf), tensor.detach().numpy())


def test_converted_release_computes_what_the_release_computes():
  """Whole online network, eval mode, random weights and BN statistics: the same pooled
  features, C/T outputs and T-stream map, so head order, q/k/v, head-major channels and
  the orientation of the position tables all line up."""
  config = load_config("tiny")
  care = ReleaseCare(config)
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for key, tensor in care.state_dict().items():
      if key.endswith(("running_var", ".weight")) and tensor.ndim == 1:  # BN variance, gamma
        tensor.uniform_(0.5, 1.5, generator=generator)
      elif tensor.is_floating_point() and not key.endswith(".weight"):  # BN stats, biases, pos
        tensor.normal_(0.0, 1.0 if "pos_emb" in key else 0.3, generator=generator)
  setup = pretraining.build(config, 1, 1)
  params, stats, _, _ = release.import_networks(numpy_state_dict(care), setup.abstract_state(),
                                                "ckpt")
  images = np.random.default_rng(1).standard_normal((4, 16, 16, 3)).astype(np.float32)

  def forward(variables, x):
    net = setup.online_net
    part = lambda name: {k: tree[name] for k, tree in variables.items()}
    layer3, _ = net.trunk.apply(part("trunk"), x, train=False)
    return {**net.apply(variables, x, train=False),
            "t_map": net.t_stream.apply(part("t_stream"), layer3, train=False)}

  got = quick_jit(forward, {"params": params, "batch_stats": stats}, images)
  with torch.no_grad():
    want = release_forward(care.state_dict(), torch.from_numpy(images.transpose(0, 3, 1, 2)),
                           config)
  want["t_map"] = want["t_map"].permute(0, 2, 3, 1)
  for name in ("features", "c", "t", "t_map"):
    expected = want[name].numpy()
    assert np.std(expected) > 1e-3, name
    np.testing.assert_allclose(np.asarray(got[name]), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max(), err_msg=name)


def test_from_release_refuses_a_used_workdir(tiny_release, tmp_path):
  _, _, path = tiny_release
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ConversionError, match="already holds checkpoints"):
    convert.from_release(path, tmp_path, "tiny")


def test_every_unused_missing_or_misshaped_key_is_named(tiny_release):
  config, care, _ = tiny_release
  abstract = pretraining.build(config, 1, 1).abstract_state()
  tensors = numpy_state_dict(care)
  tensors["student_encoder.fc3.weight"] = np.zeros(3, np.float32)
  del tensors["teacher_encoder.trans.net.1.net.3.pos_emb.width"]
  tensors["student_encoder.layer2.0.conv2.weight"] = np.zeros((1, 2, 3, 3), np.float32)
  with pytest.raises(ConversionError) as error:
    release.import_networks(tensors, abstract, "ckpt")
  message = str(error.value)
  assert "\n" not in message
  assert "student_encoder.fc3.weight" in message
  assert "teacher_encoder.trans.net.1.net.3.pos_emb.width" in message
  shape = tuple(care.student_encoder.layer2[0].conv2.weight.shape)
  assert f"student_encoder.layer2.0.conv2.weight (1, 2, 3, 3) instead of {shape}" in message


def test_a_dict_without_num_batches_tracked_still_converts(tiny_release):
  config, care, _ = tiny_release
  abstract = pretraining.build(config, 1, 1).abstract_state()
  tensors = {k: v for k, v in numpy_state_dict(care).items()
             if not k.endswith("num_batches_tracked")}
  release.import_networks(tensors, abstract, "ckpt")


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "care_jax.convert", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


class RunsCode:
  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_files_that_are_not_release_checkpoints_give_one_line(tmp_path):
  """Through the real command line: exit status 1 and one line on stderr, no traceback."""
  random_bytes = tmp_path / "random.pth.tar"
  random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
  marker = tmp_path / "code_ran"
  with_code = tmp_path / "code.pth.tar"
  with_code.write_bytes(pickle.dumps({"model": RunsCode(marker)}))
  other_model = tmp_path / "resnet.pth"
  torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict(), other_model)
  expected = {random_bytes: "is not a readable PyTorch checkpoint",
              with_code: "is not a readable PyTorch checkpoint",
              other_model: "expected a dict with a 'model' state dict"}
  for path, message in expected.items():
    out = run_cli("from-release", path, "--workdir", tmp_path / "out",
                  "--config=configs/care.py:tiny")
    assert out.returncode == 2, (path, out.stderr)
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
    assert message in out.stderr and str(path) in out.stderr, out.stderr
  assert not marker.exists()  # the pickled code never ran
  assert not (tmp_path / "out").exists()


def test_other_models_and_absent_files_are_named(tmp_path, capsys):
  other_ddp = tmp_path / "other_ddp.pth.tar"
  torch.save({"model": DistributedDataParallel(nn.Linear(2, 2)).state_dict()}, other_ddp)
  expected = {other_ddp: "has no student_encoder.* weights",
              tmp_path / "absent.pth.tar": "no such file"}
  for path, message in expected.items():
    with pytest.raises(SystemExit) as exit_:
      convert.main(["from-release", str(path), "--workdir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(path) in err, err
