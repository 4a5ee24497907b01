"""care_jax: CARE (NeurIPS 2021) self-supervised pretraining in JAX/Flax."""
import importlib.metadata
import os

# XLA:CPU hands convolutions to YNNPACK by default; its own (Eigen) convolutions run our
# steps much faster on x86 CPUs (docs/benchmarks.md, "XLA:CPU's convolution library"),
# while YNNPACK stays the faster for matrix products.
# XLA reads the flag when its first backend starts, so it is set on import, before any
# care_jax code touches a device. It concerns the CPU backend only (GPU programs are
# unchanged), a user's own setting of it wins, and it is set only for the jaxlib versions
# known to have this experimental flag: XLA refuses to start on a flag it does not know.
_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"


def _prefer_eigen_convolutions() -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if _YNN_FLAG in flags:
    return
  try:
    version = tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return
  if (0, 10) <= version < (0, 12):
    os.environ["XLA_FLAGS"] = f"{flags} --{_YNN_FLAG}=-individual_convolution".strip()


_prefer_eigen_convolutions()
