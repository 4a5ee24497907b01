"""Weights in and out of care_jax.

    python -m care_jax.convert from-release CKPT --workdir DIR [--config=configs/care.py:r50_100ep]
    python -m care_jax.convert export DIR --format torchvision|detectron2 --out FILE

`from-release` turns the authors' PyTorch checkpoint (`*_ckpt.pth.tar`) into a care_jax
workdir: config.json (the preset's config) and one checkpoint at step 0 whose online and
target networks (trunk, T-stream, heads, BatchNorm statistics) are the release's student
and teacher. The optimiser state is fresh and the step is 0 because the release's SGD
momentum is not carried over: the workdir is a set of weights to evaluate or start from,
not a run to resume mid-schedule. The release's `start_epoch` is kept in
`converted_from.json`.

`export` writes the online trunk of a workdir's latest checkpoint for PyTorch: a
torchvision ResNet state dict (`.pth`), or a Detectron2 backbone (`.pkl`) plus the
Detectron2 options it needs (written as a YAML beside it and printed).

Errors about the files (not a checkpoint, wrong network, missing or extra keys) are one
line on stderr and exit status 2, as in every care_jax program (run_safety). torch is
needed only to read or write `.pth` files (requirements-interop.txt).
"""
import argparse
import json
import pathlib
import pickle
import sys

import jax
from absl import logging as absl_logging

from care_jax import checkpointing, cli, pretrained, run_safety
from care_jax.interop import ConversionError, detectron2, release, torchvision
from care_jax.models import create_networks
from care_jax.training import pretraining

PROVENANCE = "converted_from.json"


def preset_config(spec: str):
  """The config of `FILE[:PRESET]` (--config, as for care_jax.main)."""
  path, _, preset = spec.partition(":")
  try:
    return cli.load_config(path, preset)
  except (ValueError, OSError) as e:
    raise ConversionError(f"--config={spec}: {e}") from None


def from_release(checkpoint, workdir, config_spec: str = "configs/care.py:r50_100ep",
                 overrides=()) -> None:
  """Writes the care_jax workdir `workdir` holding the release checkpoint's networks."""
  if not pathlib.Path(checkpoint).is_file():  # said before anything asks for torch
    raise ConversionError(f"{checkpoint}: no such file; pass the path of the release's "
                          "*_ckpt.pth.tar.")
  if checkpointing.checkpoint_dir(workdir).exists():
    raise ConversionError(f"{workdir} already holds checkpoints; convert into a new "
                          "--workdir.")
  config = cli.apply_overrides(preset_config(config_spec), overrides)
  tensors, start_epoch = release.read_checkpoint(checkpoint)
  setup = pretraining.build(config, steps_per_epoch=1, total_steps=1)
  online_params, online_stats, target_params, target_stats = jax.device_put(
      release.import_networks(tensors, setup.abstract_state(), str(checkpoint)))
  del tensors  # the release's arrays: free them before a second copy of the networks
  state = setup.init_state(jax.random.key(config.seed)).replace(
      online_params=online_params, online_stats=online_stats,
      target_params=target_params, target_stats=target_stats,
      opt_state=setup.optimizer.init(online_params))
  checkpointing.save_config(workdir, config)
  with checkpointing.manager(workdir) as mgr:
    checkpointing.save(mgr, 0, state)
    mgr.wait_until_finished()
  provenance = {"source": str(pathlib.Path(checkpoint).resolve()), "format": "CARE release",
                "start_epoch": start_epoch, "config": config_spec, "step": 0}
  run_safety.write_atomic(pathlib.Path(workdir) / PROVENANCE, json.dumps(provenance, indent=2))
  print(f"Wrote {workdir}: online and target networks of {checkpoint} "
        f"(release epoch {start_epoch}) as step 0 of config {config_spec}.")


def export(workdir, fmt: str, out) -> None:
  """Writes the online trunk of `workdir` to `out` in format `fmt`."""
  out = pathlib.Path(out)
  if fmt == "detectron2" and out.suffix != ".pkl":
    raise ConversionError(f"--out {out}: Detectron2 reads pickled weights only from files "
                          "named *.pkl.")
  config = checkpointing.load_config(workdir)
  small_stem = create_networks(config.model, config.data.image_size)[0].trunk.small_stem
  if fmt == "detectron2" and small_stem:
    raise ConversionError(f"{workdir}'s trunk has a small stem (3x3 stride-1 conv1), "
                          "which Detectron2's ResNet cannot build; export it as torchvision.")
  _, variables = pretrained.load(workdir)
  params, stats = variables["params"]["trunk"], variables["batch_stats"]["trunk"]
  if fmt == "torchvision":
    _save_torch(torchvision.export_trunk(params, stats), out)
    print(f"Wrote {out}: the torchvision state dict of the online trunk, without `fc`. Load "
          "it into torchvision's ResNet after `model.fc = torch.nn.Identity()`.")
    if small_stem:
      pool = "" if config.model.stem == "small_pool" else (
          " and `model.maxpool = torch.nn.Identity()`")
      print(f"This trunk has a small stem: set `model.conv1` to a 3x3 stride-1 conv{pool} "
            "first.")
    return
  run_safety.write_atomic(out, pickle.dumps(detectron2.checkpoint(params, stats)))
  options = detectron2.options(config.model, str(out.resolve()))
  options_file = out.with_suffix(".yaml")
  run_safety.write_atomic(options_file, detectron2.options_yaml(options))
  print(f"Wrote {out} (Detectron2 backbone) and {options_file} (the options it needs: merge "
        "that file into your config, or append these to train_net.py's command line):")
  print(detectron2.options_command_line(options))


def _save_torch(tensors, out: pathlib.Path) -> None:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConversionError("Writing a .pth file needs torch: pip install -r "
                          "requirements-interop.txt") from None
  state = {key: torch.from_numpy(value) for key, value in tensors.items()}
  run_safety.write_atomic(out, lambda tmp: torch.save(state, tmp))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m care_jax.convert",
                                   description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  to_jax = commands.add_parser("from-release", help="release *_ckpt.pth.tar -> workdir",
                               epilog=cli.presets_help(),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  to_jax.add_argument("checkpoint")
  to_jax.add_argument("--workdir", required=True)
  to_jax.add_argument("--config", default="configs/care.py:r50_100ep",
                      help="FILE:PRESET of the checkpoint's network; --config.FIELD=VALUE "
                           "changes a field (docs/config.md)")
  to_torch = commands.add_parser("export", help="workdir -> online trunk for PyTorch")
  to_torch.add_argument("workdir")
  to_torch.add_argument("--format", required=True, choices=("torchvision", "detectron2"))
  to_torch.add_argument("--out", required=True)
  argv, overrides = cli.split_overrides(sys.argv[1:] if argv is None else argv)
  cli.refuse_old_flags([""] + argv, {"--config-preset": "--config=configs/care.py:PRESET"})
  args = parser.parse_args(argv)
  if overrides and args.command == "export":
    cli.fail("export writes the workdir's network, as its config.json says: it takes no "
             "--config.FIELD=VALUE.")
  run_safety.run(lambda: from_release(args.checkpoint, args.workdir, args.config, overrides)
                 if args.command == "from-release" else
                 export(args.workdir, args.format, args.out))
  return 0


if __name__ == "__main__":
  # Orbax notes routine things (e.g. that a restore opens the directory read-only) at
  # WARNING level through absl; on the command line only care_jax's own messages remain.
  absl_logging.set_verbosity(absl_logging.ERROR)
  sys.exit(main())
