"""The pretraining step compiled by XLA:GPU for N devices of an H100 node, on a machine
without a GPU: per-device memory and the collectives that move examples, read from the
compiled program (nothing runs). A checkout's step can be compiled beside this one's
(--baseline=DIR, e.g. a worktree of an older commit), so the two figures come from the
same run.

Needs the CUDA plugin of the installed jax and a CUDA 12 ptxas (no GPU, no CUDA libraries):

  pip install --target /tmp/cudaplug --no-deps "jax-cuda12-pjrt==$JAX" \\
      "jax-cuda12-plugin==$JAX" nvidia-cuda-nvcc-cu12      # JAX: the installed version
  export JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=/tmp/cudaplug \\
      PATH=/tmp/cudaplug/nvidia/cuda_nvcc/bin:$PATH \\
      XLA_FLAGS=--xla_gpu_cuda_data_dir=/tmp/cudaplug/nvidia/cuda_nvcc
  python experiments/gpu_compile.py --devices=1,8 --batch_per_device=16 [--baseline=DIR]

Each (code, device count) compiles in a child process (the ResNet-50 step: 35-50 s on 2
cores). The last line printed is a JSON list of the figures.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An H100 SXM as XLA's GPU compiler needs it (NVIDIA's figures: 132 SMs at 1.98 GHz, 80 GB
# of HBM3 at 3.35 TB/s, 50 MB of L2, compute capability 9.0).
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 1 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

CHILD = """
import json, re, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
# The networks pick XLA:CPU's convolution forms when the default backend is the CPU (it is,
# here); the program is for a GPU, so they take XLA's own, as on a GPU.
jax.default_backend = lambda: "gpu"
from care_jax import cli
from care_jax.training import pretraining
devices, per_device, precision, preset, target = sys.argv[2:7]
devices, per_device = int(devices), int(per_device)
topology = topologies.get_topology_desc(platform="cuda", topology_name="h100",
                                        target_config=target, topology=f"1x1x{devices}")
mesh = Mesh(np.array(topology.devices), ("data",))
config = cli.load_config(preset=preset)
config.precision, config.global_batch_size = precision, per_device * devices
setup = pretraining.build(config, steps_per_epoch=1000, total_steps=100000)
whole, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole),
                     setup.abstract_state())
size = config.data.image_size
crops = jax.ShapeDtypeStruct((per_device * devices, size, size, 3), jnp.uint8,
                             sharding=sharded)
compiled = setup.jitted_step(mesh).lower(state, {"view1": crops, "view2": crops}).compile()
text = compiled.as_text()
moves = re.findall(r"= (\\([^)]*\\)|\\S+) (all-gather|all-to-all|collective-permute)"
                   r"(?:-start)?\\(", text)
print(json.dumps({"temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30,
                  "moves": [f"{kind} {shape}" for shape, kind in moves]}))
"""


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", default="1,8", help="device counts, comma-separated")
  p.add_argument("--batch_per_device", type=int, default=16)
  p.add_argument("--precision", default="bfloat16")
  p.add_argument("--preset", default="r50_100ep")
  p.add_argument("--baseline", default="", help="another checkout to compile beside this one")
  args = p.parse_args(argv)
  rows = []
  for label, checkout in (("this", ROOT), ("baseline", args.baseline)):
    if not checkout:
      continue
    for devices in (int(n) for n in args.devices.split(",")):
      out = subprocess.run([sys.executable, "-c", CHILD, checkout, str(devices),
                            str(args.batch_per_device), args.precision, args.preset, H100_SXM],
                           capture_output=True, text=True)
      if out.returncode:
        sys.exit(f"compiling {label} for {devices} devices failed:\n{out.stderr[-3000:]}")
      row = {"code": label, "checkout": checkout, "devices": devices,
             "batch_per_device": args.batch_per_device, "precision": args.precision,
             **json.loads(out.stdout.strip().splitlines()[-1])}
      print(f"{label}, {devices} H100s x {args.batch_per_device}: "
            f"{row['temp_gib']:.2f} GiB of temporaries per device, "
            f"{len(row['moves'])} collectives that move examples", flush=True)
      rows.append(row)
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
