"""Which encoder an evaluation reads, at what resolution, and loading it onto the mesh.

Linear evaluation and fine-tuning start from the online trunk of a pretraining workdir
("pretrained"), the same network at random initialisation ("random_init"), or, for linear
evaluation only, the normalised pixels ("raw_pixels"). An evaluation records its encoder's
source (encoder_source) with every checkpoint, so that a resumed one can tell it still
reads the same checkpoint.
"""
import logging
import pathlib

from care_jax import checkpointing, parallel, pretrained
from care_jax.errors import UserError


def check(section_config, section: str, encoders: tuple) -> None:
  kind = section_config.encoder
  if kind not in encoders:
    raise UserError(f"{section}.encoder must be one of {encoders}, got {kind!r}.")
  if kind == "pretrained" and not section_config.pretrained_workdir:
    raise UserError(f"{section}.pretrained_workdir is not set: pass "
                    f"--config.{section}.pretrained_workdir=<pretraining workdir>.")


def pretrained_config(section_config):
  """The config.json of the pretraining run an evaluation reads, or None."""
  if section_config.encoder != "pretrained":
    return None
  return checkpointing.load_config(section_config.pretrained_workdir)


def source(section_config) -> dict:
  """Which encoder an evaluation starts from: for a pretraining run, its workdir and the
  checkpoint step read (as process 0 sees it), so that a resumed evaluation can tell it
  still has the same one."""
  if section_config.encoder != "pretrained":
    return {"encoder": section_config.encoder}
  workdir = section_config.pretrained_workdir
  return {"encoder": "pretrained", "workdir": str(pathlib.Path(workdir).absolute()),
          "step": pretrained.latest_step(workdir)}


def describe(encoder_source: dict) -> str:
  if encoder_source["encoder"] == "pretrained":
    return f"checkpoint {encoder_source['step']} of {encoder_source['workdir']}"
  return f"the {encoder_source['encoder'].replace('_', ' ')} encoder"


def load(config, encoder_source: dict, image_size: int, mesh):
  """(online CareNetwork, variables replicated over the mesh) of a pretrained or random-init
  source; the checkpoint is read only here, straight onto every device."""
  sharding = parallel.replicated(mesh)
  if encoder_source["encoder"] == "pretrained":
    return pretrained.load(encoder_source["workdir"], encoder_source["step"], sharding)
  return pretrained.random_init(config, image_size, sharding)


def image_size(config, section: str, pretraining_config=None) -> int:
  """The resolution to evaluate at: the pretraining run's, unless config.<section>.
  image_size asks for another on purpose. Says which, and why."""
  override = config[section].image_size
  pretrained_size = None if pretraining_config is None else pretraining_config.data.image_size
  if override > 0:
    if pretrained_size is not None and override != pretrained_size:
      logging.warning("Evaluating at %d px (%s.image_size); the encoder was pretrained at "
                      "%d px.", override, section, pretrained_size)
    return override
  if pretrained_size is None:
    return config.data.image_size
  if pretrained_size != config.data.image_size:
    logging.info("Evaluating at %d px, the pretraining run's resolution (not data.image_size "
                 "%d); set --config.%s.image_size to choose another.", pretrained_size,
                 config.data.image_size, section)
  return pretrained_size
