"""PyTorch statements of the release's network, written for these tests from the spec and
a reading of the release's models/resnet_care.py and models/trans.py (none of it copied):

- `ReleaseCare`: the release's module tree (attribute names, Sequential indices, shapes)
  without forward code, so its state_dict() has the release's keys, num_batches_tracked
  included;
- `resnet_forward` / `release_forward`: what the release computes in eval mode, with
  torch's functional ops on a state dict, reading the keys as the release names them.

Importing this module needs torch: test modules importorskip it first.
"""
import torch
from torch import nn
from torch.nn import functional as F

ARCHS = {"resnet18": (False, (2, 2, 2, 2)), "resnet50": (True, (3, 4, 6, 3))}


class Block(nn.Module):
  """torchvision's BasicBlock / Bottleneck (v1.5), weights only."""

  def __init__(self, cin, planes, stride, bottleneck, width):
    super().__init__()
    out = planes * 4 if bottleneck else planes
    if bottleneck:
      inner = planes * width
      self.conv1, self.bn1 = nn.Conv2d(cin, inner, 1, bias=False), nn.BatchNorm2d(inner)
      self.conv2 = nn.Conv2d(inner, inner, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(inner)
      self.conv3, self.bn3 = nn.Conv2d(inner, out, 1, bias=False), nn.BatchNorm2d(out)
    else:
      self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
    if stride != 1 or cin != out:
      self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False),
                                      nn.BatchNorm2d(out))


class AbsPosEmb(nn.Module):
  def __init__(self, size, head_dim):
    super().__init__()
    self.height = nn.Parameter(torch.zeros(size, head_dim))
    self.width = nn.Parameter(torch.zeros(size, head_dim))


class Attention(nn.Module):
  def __init__(self, dim, size, heads, head_dim):
    super().__init__()
    self.to_qkv = nn.Conv2d(dim, 3 * heads * head_dim, 1, bias=False)
    self.pos_emb = AbsPosEmb(size, head_dim)


class BottleBlock(nn.Module):
  """The release's T-stream block: `shortcut` (first block) and the 9-entry `net`."""

  def __init__(self, cin, cout, size, first, heads, head_dim):
    super().__init__()
    mid, inner = cout // 4, heads * head_dim
    if first:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False),
                                    nn.BatchNorm2d(cout), nn.ReLU())
    self.net = nn.Sequential(
        nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        Attention(mid, size, heads, head_dim), nn.AvgPool2d(2) if first else nn.Identity(),
        nn.BatchNorm2d(inner), nn.ReLU(), nn.Conv2d(inner, cout, 1, bias=False),
        nn.BatchNorm2d(cout))


def head(features, hidden, low, predictor):
  layers = [nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, low)]
  if predictor:
    layers += [nn.Linear(low, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, low)]
  return nn.Sequential(*layers, nn.Identity())  # the Normalize, which has no weights


class Encoder(nn.Module):
  """The release's ResNet with MLP="care": trunk, `trans`, `fc1` (C) and `fc2` (T).

  The small stem (3x3 conv, no max-pool) is care_jax's, for the tiny test network; the
  release always has the 7x7/2 stem and max-pool.
  """

  def __init__(self, model, image_size, predictor):
    super().__init__()
    bottleneck, depths = ARCHS[model.arch]
    small = {"small": True, "imagenet": False, "auto": image_size <= 64}[model.stem]
    c = model.channels
    self.conv1 = nn.Conv2d(3, c, 3 if small else 7, 1 if small else 2, 1 if small else 3,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(c)
    cin = c
    for i, n in enumerate(depths):
      blocks = []
      for j in range(n):
        blocks.append(Block(cin, c * 2**i, 2 if i and not j else 1, bottleneck, model.width))
        cin = c * 2**i * (4 if bottleneck else 1)
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    fmap = image_size // (1 if small else 4) // 4  # layer3's map
    t = model.t_stream
    self.trans = nn.Module()
    self.trans.net = nn.Sequential(*[
        BottleBlock(cin // 2 if i == 0 else cin, cin, fmap if i == 0 else fmap // 2, i == 0,
                    t.heads, t.head_dim) for i in range(t.num_blocks)])
    self.fc1 = head(cin, model.hidden_dim, model.projection_dim, predictor)
    self.fc2 = head(cin, model.hidden_dim, model.projection_dim, predictor)


class ReleaseCare(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.student_encoder = Encoder(config.model, config.data.image_size, predictor=True)
    self.teacher_encoder = Encoder(config.model, config.data.image_size, predictor=False)


class DistributedDataParallel(nn.Module):
  """Only for its `module.` key prefix."""

  def __init__(self, module):
    super().__init__()
    self.module = module


def _batch_norm(weights, x, name):
  return F.batch_norm(x, weights[f"{name}.running_mean"], weights[f"{name}.running_var"],
                      weights[f"{name}.weight"], weights[f"{name}.bias"], False, 0.0, 1e-5)


def _conv(weights, x, name, **kwargs):
  return F.conv2d(x, weights[f"{name}.weight"], **kwargs)


def resnet_forward(weights, images, arch, small_stem=False, prefix=""):
  """torchvision's ResNet (v1.5, eval mode) on NCHW images: (layer3 map, pooled layer4)."""
  bottleneck, depths = ARCHS[arch]
  bn = lambda x, name: _batch_norm(weights, x, prefix + name)
  conv = lambda x, name, **kw: _conv(weights, x, prefix + name, **kw)
  if small_stem:
    x = F.relu(bn(conv(images, "conv1", padding=1), "bn1"))
  else:
    x = F.max_pool2d(F.relu(bn(conv(images, "conv1", stride=2, padding=3), "bn1")), 3, 2, 1)
  for i, blocks in enumerate(depths, 1):
    for j in range(blocks):
      name, stride = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
      if bottleneck:
        out = F.relu(bn(conv(x, f"{name}.conv1"), f"{name}.bn1"))
        out = F.relu(bn(conv(out, f"{name}.conv2", stride=stride, padding=1), f"{name}.bn2"))
        out = bn(conv(out, f"{name}.conv3"), f"{name}.bn3")
      else:
        out = F.relu(bn(conv(x, f"{name}.conv1", stride=stride, padding=1), f"{name}.bn1"))
        out = bn(conv(out, f"{name}.conv2", padding=1), f"{name}.bn2")
      if f"{prefix}{name}.downsample.0.weight" in weights:
        x = bn(conv(x, f"{name}.downsample.0", stride=stride), f"{name}.downsample.1")
      x = F.relu(out + x)
    if i == 3:
      layer3 = x
  return layer3, F.adaptive_avg_pool2d(x, 1).flatten(1)


def _t_block(weights, x, name, first, heads, head_dim):
  """BoTNet block: 1x1 conv, MHSA with absolute 2-D positions, (pool), 1x1 conv (spec)."""
  bn = lambda y, layer: _batch_norm(weights, y, f"{name}.{layer}")
  conv = lambda y, layer, **kw: _conv(weights, y, f"{name}.{layer}", **kw)
  shortcut = F.relu(bn(conv(x, "shortcut.0", stride=2, padding=1), "shortcut.1")) if first else x
  y = F.relu(bn(conv(x, "net.0"), "net.1"))
  b, _, h, w = y.shape
  # channels are (head, dim), positions (row, col), flattened row-major
  split = lambda t: t.reshape(b, heads, head_dim, h * w).transpose(2, 3)
  q, k, v = (split(t) for t in conv(y, "net.3.to_qkv").chunk(3, dim=1))
  q = q * head_dim**-0.5
  rows, cols = weights[f"{name}.net.3.pos_emb.height"], weights[f"{name}.net.3.pos_emb.width"]
  positions = (rows[:, None, :] + cols[None, :, :]).reshape(h * w, head_dim)
  attention = (q @ k.transpose(2, 3) + q @ positions.T).softmax(dim=-1)
  y = (attention @ v).transpose(2, 3).reshape(b, heads * head_dim, h, w)
  if first:
    y = F.avg_pool2d(y, 2)
  y = bn(conv(F.relu(bn(y, "net.5")), "net.7"), "net.8")
  return F.relu(y + shortcut)


def _head(weights, x, name, predictor):
  def mlp(x, first):
    x = F.linear(x, weights[f"{name}.{first}.weight"], weights[f"{name}.{first}.bias"])
    x = F.relu(_batch_norm(weights, x, f"{name}.{first + 1}"))
    return F.linear(x, weights[f"{name}.{first + 3}.weight"], weights[f"{name}.{first + 3}.bias"])
  x = mlp(x, 0)
  return F.normalize(mlp(x, 4) if predictor else x, dim=1)


def release_forward(weights, images, config, encoder="student_encoder"):
  """The release encoder in eval mode: pooled layer4 features, the C/T outputs and the
  T-stream's map before pooling (pooling would hide where attention looked)."""
  model = config.model
  small_stem = {"small": True, "imagenet": False,
                "auto": config.data.image_size <= 64}[model.stem]
  prefix = f"{encoder}."
  layer3, features = resnet_forward(weights, images, model.arch, small_stem, prefix)
  x = layer3
  for i in range(model.t_stream.num_blocks):
    x = _t_block(weights, x, f"{prefix}trans.net.{i}", i == 0, model.t_stream.heads,
                 model.t_stream.head_dim)
  predictor = encoder == "student_encoder"
  return {"features": features, "t_map": x,
          "c": _head(weights, features, f"{prefix}fc1", predictor),
          "t": _head(weights, F.adaptive_avg_pool2d(x, 1).flatten(1), f"{prefix}fc2", predictor)}
