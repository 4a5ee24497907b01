"""What the command-line programs share: how they log."""
import logging


def configure_logging():
  """INFO for care_jax and the metric lines; orbax's and JAX's chatter only from WARNING."""
  absl_logger = logging.getLogger("absl")
  absl_logger.setLevel(logging.INFO)
  quiet = ("/orbax/", "/jax/_src/")
  absl_logger.addFilter(lambda r: r.levelno >= logging.WARNING
                        or not any(q in r.pathname for q in quiet))
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
