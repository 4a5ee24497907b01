"""What the command-line programs share: how they log and how they read a config file."""
import importlib.util
import logging
import pathlib

CONFIG_FILE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "care.py"


def configure_logging():
  """INFO for care_jax and the metric lines; orbax's and JAX's chatter only from WARNING."""
  absl_logger = logging.getLogger("absl")
  absl_logger.setLevel(logging.INFO)
  quiet = ("/orbax/", "/jax/_src/")
  absl_logger.addFilter(lambda r: r.levelno >= logging.WARNING
                        or not any(q in r.pathname for q in quiet))
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def load_config(path=CONFIG_FILE, preset: str = ""):
  """get_config(preset) of a config file (the repo's configs/care.py by default)."""
  spec = importlib.util.spec_from_file_location("care_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()
