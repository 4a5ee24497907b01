"""What the command-line programs share: how they log and how they find and read a config.

The configs ship with care_jax: in a checkout (or an editable install) they are the
repository's configs/ beside the package; a wheel (`pip install .`) carries the same
files as care_jax/configs (pyproject.toml maps them there). A relative --config path such
as configs/care.py that does not exist in the current directory is taken from there, so
the commands work from any directory.
"""
import importlib.util
import logging
import pathlib
import sys
import textwrap

from care_jax import errors

_PACKAGE = pathlib.Path(__file__).resolve().parent
CONFIG_DIR = next((d for d in (_PACKAGE.parent / "configs", _PACKAGE / "configs")
                   if (d / "care.py").is_file()), _PACKAGE.parent / "configs")
CONFIG_FILE = CONFIG_DIR / "care.py"
HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def fail(message) -> None:
  """A setting or file to fix (errors.UserError): one line on stderr and exit status 2,
  as every command-line program ends one."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def configure_logging():
  """INFO for care_jax and the metric lines; orbax's and JAX's chatter only from WARNING;
  and none of the reports orbax's threads and asyncio print for a failed write (dozens of
  tracebacks for one full disk): the program ends such a run with one line of its own."""
  absl_logger = logging.getLogger("absl")
  absl_logger.setLevel(logging.INFO)
  quiet = ("/orbax/", "/jax/_src/")
  absl_logger.addFilter(lambda r: r.levelno >= logging.WARNING
                        or not any(q in r.pathname for q in quiet))
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_not_a_write_failure_report)


def _not_a_write_failure_report(record: logging.LogRecord) -> bool:
  if "/orbax/" not in record.pathname and record.name != "asyncio":
    return True
  error = record.exc_info[1] if record.exc_info else None
  text = record.getMessage()
  return not ((error is not None and errors.write_failure_reason(error))
              or errors.write_failure_reason(Exception(text)))


def resolve_config_path(path) -> str:
  """`path` if it exists or is absolute; else, relative to care_jax's own configs (so
  configs/care.py names the packaged file from any directory) when that file exists."""
  given = pathlib.Path(path).expanduser()
  if given.exists() or given.is_absolute():
    return str(given)
  packaged = CONFIG_DIR.parent / given
  return str(packaged) if packaged.is_file() else str(path)


def resolve_config_args(argv: list, flag: str = "--config") -> list:
  """argv with the config file of `--config=FILE[:PRESET]` (or `--config FILE...`)
  resolved by resolve_config_path; everything else unchanged."""
  def resolve(spec):
    path, colon, preset = spec.partition(":")
    return resolve_config_path(path) + colon + preset

  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith(flag + "="):
      out[i] = f"{flag}={resolve(arg[len(flag) + 1:])}"
    elif arg == flag and i + 1 < len(out):
      out[i + 1] = resolve(out[i + 1])
  return out


def _config_module(path):
  spec = importlib.util.spec_from_file_location("care_config", resolve_config_path(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path=CONFIG_FILE, preset: str = ""):
  """get_config(preset) of a config file (care_jax's configs/care.py by default)."""
  module = _config_module(path)
  return module.get_config(preset) if preset else module.get_config()


def presets_help(path="configs/care.py") -> str:
  """The presets a config file defines (its PRESETS), by name, and its docstring."""
  module = _config_module(path)
  names = getattr(module, "PRESETS", ())
  if not names:
    return f"{path} defines no presets (PRESETS)."
  listing = textwrap.fill(", ".join(names), width=96, initial_indent="  ",
                          subsequent_indent="  ")
  return (f"Presets of {path} (choose one with --config={path}:PRESET):\n{listing}\n\n"
          f"{textwrap.dedent(module.__doc__ or '').strip()}")
