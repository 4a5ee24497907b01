"""Compiles every program pretraining and the evaluations jit over the mesh (care_jax.
scaling) for the tiny config at 4 examples per device, on a mesh of one device and on all
(the test sets XLA_FLAGS for 8 simulated CPU devices), and prints both audits as JSON."""
import json
import sys

import jax

sys.path.insert(0, ".")
from care_jax import parallel, scaling  # noqa: E402
from care_jax.training.pretraining import FAST_COMPILE  # noqa: E402
from tests.conftest import load_config  # noqa: E402


def main():
  config = load_config("tiny")
  audit = lambda devices: scaling.audit(config, parallel.create_mesh(devices), 4,
                                        num_classes=10, compiler_options=FAST_COMPILE)
  print(json.dumps({"devices": len(jax.devices()), "one": audit(jax.devices()[:1]),
                    "many": audit(jax.devices())}))


if __name__ == "__main__":
  main()
