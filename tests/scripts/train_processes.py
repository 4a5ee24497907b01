"""One process of a tiny pretraining run, alone or as one of several (jax.distributed on a
localhost coordinator, gloo CPU collectives), with the kNN monitor and the online probe on.
Records the dataset indices this process read, per step, as JSON lines in RECORD, and
prints the monitors' final figures. Device count comes from XLA_FLAGS."""
import argparse
import json
import sys

import jax

sys.path.insert(0, ".")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--image_folder", required=True)
  parser.add_argument("--record", required=True)
  args = parser.parse_args()
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)

  from care_jax import train
  from care_jax.data import input_pipeline
  from tests.conftest import load_config

  original = input_pipeline.pretrain_batches

  def recording(*a, **kw):
    with open(args.record, "w") as f:
      for batch in original(*a, **kw):
        f.write(json.dumps(batch["index"].tolist()) + "\n")
        f.flush()
        yield batch

  input_pipeline.pretrain_batches = recording
  config = load_config("tiny")
  config.data.update(name="image_folder", folder_root=args.image_folder)
  config.update(num_train_steps=2, checkpoint_every_steps=2, log_every_steps=2)
  config.data.eval_split = "test"
  config.monitor.every_steps = 2
  metrics = train.pretrain(config, args.workdir)
  print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                    "local_devices": jax.local_device_count(),
                    **{k: metrics[k] for k in ("knn_top1", "online_probe_top1")}}))


if __name__ == "__main__":
  main()
