"""One of two processes resuming from a pretraining workdir (jax.distributed on localhost,
gloo), where process --sees_newer alone sees a newer checkpoint, as a node does when a
shared file system's view of the others lags behind. Prints the step restored, or the
error, as JSON."""
import argparse
import json
import shutil
import sys

import jax

sys.path.insert(0, ".")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--sees_newer", type=int, required=True)
  args = parser.parse_args()
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=2,
                             process_id=args.process_id)
  from jax.experimental import multihost_utils

  from care_jax import checkpointing, errors
  from care_jax.training import pretraining
  from tests.conftest import load_config

  setup = pretraining.build(load_config("tiny"), steps_per_epoch=1, total_steps=1)
  mgr = checkpointing.manager(args.workdir, read_only=True)  # each lists the steps now
  multihost_utils.sync_global_devices("listed")
  if args.process_id == args.sees_newer:  # a newer step appears, and only this one looks
    directory = checkpointing.checkpoint_dir(args.workdir)
    newest = max(mgr.all_steps())
    shutil.copytree(directory / str(newest), directory / str(newest + 2))
    mgr.reload()
  multihost_utils.sync_global_devices("newer step written")
  try:
    state = checkpointing.resume(mgr, setup.abstract_state())
    print(json.dumps({"restored": int(state.step), "sees": mgr.all_steps()}))
  except (checkpointing.CheckpointError, errors.TransientError) as e:
    print(json.dumps({"error": str(e), "transient": isinstance(e, errors.TransientError),
                      "sees": mgr.all_steps()}))
  mgr.close()


if __name__ == "__main__":
  main()
