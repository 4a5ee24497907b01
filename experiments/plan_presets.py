"""docs/scale.md's tables: the plan (care_jax.plan) of the 16 published presets on 1 and 4
nodes of 8 GPUs, for each precision. Memory does not depend on the epochs, so each trunk
and precision is traced once.

  python experiments/plan_presets.py [TRUNK ...]   (minutes on 2 cores; prints markdown)
"""
import sys

from care_jax import cli, plan, summary
from care_jax.training import pretraining

GPUS = ("V100-16GB", "V100-32GB", "A100-40GB", "A100-80GB", "H100-80GB")
TRAIN = 1_281_167
GiB = 2**30


def main():
  presets = cli.config_module(cli.CONFIG_FILE)
  epochs_list = presets.EPOCHS
  trunks = sys.argv[1:] or list(presets.TRUNKS)
  print("| trunk | precision | nodes x 8 | pairs / device | step GiB | kNN monitor GiB | "
        "linear (cached) GiB | fine-tune GiB | fits (75% of the card) |")
  print("|---|---|---|---|---|---|---|---|---|")
  speeds = {}
  for trunk in trunks:
    traced = {}
    for precision in ("float32", "bfloat16", "float16"):
      config = cli.load_config(preset=f"{trunk}_100ep")
      config.precision = precision
      config.monitor.every_steps = 1  # the default preset has it off; show its cost
      key = "bfloat16" if precision == "float16" else precision
      if key not in traced:
        traced[key] = plan.trace(config, 1000)
      for nodes in (1, 4):
        memory = plan.device_memory(config, traced[key], 8 * nodes, TRAIN)
        need = max(memory["training step"][0], memory["kNN monitor"][0],
                   memory["fine-tuning"][0]) / GiB
        fits = [g.split("-")[0] + "-" + g.split("-")[1][:-2]
                for g in GPUS if need <= plan.Devices.parse(g).usable_gib()]
        print(f"| {trunk} | {precision} | {nodes} | {1024 // (8 * nodes)} | "
              f"{memory['training step'][0] / GiB:.1f} | {memory['kNN monitor'][0] / GiB:.1f} | "
              f"{memory['linear, augment=False'][0] / GiB:.1f} | "
              f"{memory['fine-tuning'][0] / GiB:.1f} | {', '.join(fits) or 'none'} |")
    config = cli.load_config(preset=f"{trunk}_100ep")
    config.precision = "bfloat16"
    setup = pretraining.build(config, steps_per_epoch=1, total_steps=1)
    speeds[trunk] = summary.train_step_flops(setup, setup.abstract_state())
  print("\n| preset | FLOPs / pair | 8 H100 bf16: epoch | run | 8 A100 bf16: run | "
        "8 V100 fp16: run |")
  print("|---|---|---|---|---|---|")
  for trunk in trunks:
    for epochs in epochs_list:
      rate = plan.H100_PAIRS_PER_SEC * plan.REFERENCE_FLOPS_PER_PAIR / speeds[trunk] * 8
      epoch_h = TRAIN // 1024 * 1024 / rate / 3600
      run = lambda gpu, precision: epochs * epoch_h / (
          plan.GPU_SPEED[gpu] * plan.PRECISION_SPEED[precision])
      print(f"| {trunk}_{epochs}ep | {speeds[trunk]:.3g} | {epoch_h:.2f} h | "
            f"{run('H100', 'bfloat16'):.0f} h | {run('A100', 'bfloat16'):.0f} h | "
            f"{run('V100', 'float16'):.0f} h |")


if __name__ == "__main__":
  main()
