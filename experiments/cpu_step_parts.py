"""Where the R50 step's time goes on a CPU, care_jax (XLA:CPU) against PyTorch's CPU
kernels, float32, 224 px:

- `trunk`: the ResNet-50 trunk alone, forward in eval mode and forward + backward in
  training mode (care_jax's with its CPU convolution forms, care_jax.models.cpu_conv; the
  same network written in PyTorch), best of 3;
- `convs`: forward, input gradient and weight gradient of single R50 convolutions, best
  of 5, in milliseconds.

  python experiments/cpu_step_parts.py trunk [--batch=8]
  python experiments/cpu_step_parts.py convs [--batch=8]

Needs torch (requirements-interop.txt). The last line printed is JSON.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from care_jax.models import cpu_conv, resnet

# (name, output side H, input channels, output channels, kernel, stride) of R50's convs.
CONVS = [("layer1 3x3", 56, 64, 64, 3, 1), ("layer1 1x1 up", 56, 64, 256, 1, 1),
         ("layer1 1x1 down", 56, 256, 64, 1, 1), ("layer2 3x3", 28, 128, 128, 3, 1),
         ("layer3 3x3", 14, 256, 256, 3, 1), ("layer3 1x1 up", 14, 256, 1024, 1, 1),
         ("layer4 3x3", 7, 512, 512, 3, 1), ("stem 7x7", 224, 3, 64, 7, 2)]


def best(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


class Bottleneck(nn.Module):
  def __init__(self, cin, planes, stride):
    super().__init__()
    bn = nn.BatchNorm2d
    self.c1, self.b1 = nn.Conv2d(cin, planes, 1, bias=False), bn(planes)
    self.c2, self.b2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), bn(planes)
    self.c3, self.b3 = nn.Conv2d(planes, planes * 4, 1, bias=False), bn(planes * 4)
    self.down = None
    if stride != 1 or cin != planes * 4:
      self.down = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                bn(planes * 4))

  def forward(self, x):
    out = torch.relu(self.b1(self.c1(x)))
    out = self.b3(self.c3(torch.relu(self.b2(self.c2(out)))))
    return torch.relu(out + (x if self.down is None else self.down(x)))


def torch_resnet50() -> nn.Module:
  layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1)]
  cin = 64
  for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
    for i in range(blocks):
      layers.append(Bottleneck(cin, planes, stride if i == 0 else 1))
      cin = planes * 4
  return nn.Sequential(*layers)


def trunk(batch: int) -> dict:
  torch.manual_seed(0)
  model, x = torch_resnet50(), torch.randn(batch, 3, 224, 224)

  def torch_forward():
    with torch.no_grad():
      model.eval()
      model(x)

  def torch_train():
    model.train()
    model.zero_grad()
    model(x).sum().backward()

  net = resnet.resnet("resnet50")
  xj = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 224, 224, 3), np.float32))
  variables = jax.jit(lambda key: net.init(key, xj[:1], train=False))(jax.random.key(0))
  forward = jax.jit(lambda v, x: net.apply(v, x, train=False))

  def loss(params, stats, x):
    (_, layer4), updates = net.apply({"params": params, "batch_stats": stats}, x,
                                     train=True, mutable=["batch_stats"])
    return jnp.sum(layer4), updates

  train = jax.jit(jax.grad(loss, has_aux=True))
  out = {"torch_forward_s": best(torch_forward, 3), "torch_train_s": best(torch_train, 3),
         "jax_forward_s": best(lambda: jax.block_until_ready(forward(variables, xj)), 3),
         "jax_train_s": best(lambda: jax.block_until_ready(
             train(variables["params"], variables["batch_stats"], xj)), 3)}
  out = {k: round(v, 3) for k, v in out.items()}
  out["jax_over_torch_forward"] = round(out["jax_forward_s"] / out["torch_forward_s"], 2)
  out["jax_over_torch_train"] = round(out["jax_train_s"] / out["torch_train_s"], 2)
  return out


def convs(batch: int) -> dict:
  rows = {}
  for name, size, cin, cout, k, stride in CONVS:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, cin), np.float32)
    w = rng.standard_normal((k, k, cin, cout), np.float32) * 0.05
    pad = ((k // 2, k // 2),) * 2

    def conv(x, w, stride=stride, pad=pad):
      return cpu_conv.conv_general_dilated(x, w, (stride, stride), pad,
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))

    xj, wj = jnp.asarray(x), jnp.asarray(w)
    g = jnp.ones_like(jax.eval_shape(conv, xj, wj))
    jax_fns = [jax.jit(conv),
               jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
               jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])]
    args = [(xj, wj), (xj, wj, g), (xj, wj, g)]
    jax_ms = [best(lambda f=f, a=a: jax.block_until_ready(f(*a)), 5) for f, a in
              zip(jax_fns, args)]
    xt = torch.tensor(x.transpose(0, 3, 1, 2)).contiguous()
    wt = torch.tensor(w.transpose(3, 2, 0, 1)).contiguous()
    gt = torch.ones(tuple(np.asarray(g).transpose(0, 3, 1, 2).shape))
    f = torch.nn.functional
    torch_fns = [lambda: f.conv2d(xt, wt, stride=stride, padding=k // 2),
                 lambda: torch.nn.grad.conv2d_input(xt.shape, wt, gt, stride=stride,
                                                    padding=k // 2),
                 lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, gt, stride=stride,
                                                     padding=k // 2)]
    with torch.no_grad():
      torch_ms = [best(fn, 5) for fn in torch_fns]
    rows[name] = {"jax_ms": [round(1e3 * t, 1) for t in jax_ms],
                  "torch_ms": [round(1e3 * t, 1) for t in torch_ms]}
    print(f"{name}: forward, input grad, weight grad: jax {rows[name]['jax_ms']} ms, torch "
          f"{rows[name]['torch_ms']} ms", flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("part", choices=("trunk", "convs"))
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args()
  result = (trunk if args.part == "trunk" else convs)(args.batch)
  print(json.dumps({"part": args.part, "batch": args.batch, "torch": torch.__version__,
                    "jax": jax.__version__, "torch_threads": torch.get_num_threads(),
                    **result}))


if __name__ == "__main__":
  main()
