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

from absl import app, flags

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


def config_module(path):
  spec = importlib.util.spec_from_file_location("care_config", resolve_config_path(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path=CONFIG_FILE, preset: str = ""):
  """get_config(preset) of a config file (care_jax's configs/care.py by default)."""
  module = config_module(path)
  return module.get_config(preset) if preset else module.get_config()


def presets_help(path="configs/care.py") -> str:
  """The presets a config file defines (its PRESETS), by name, and its docstring."""
  module = config_module(path)
  names = getattr(module, "PRESETS", ())
  if not names:
    return f"{path} defines no presets (PRESETS)."
  listing = textwrap.fill(", ".join(names), width=96, initial_indent="  ",
                          subsequent_indent="  ")
  return (f"Presets of {path} (choose one with --config={path}:PRESET):\n{listing}\n\n"
          f"{textwrap.dedent(module.__doc__ or '').strip()}\n\nEvery field, its default and "
          "meaning: docs/config.md (change one with --config.FIELD=VALUE).")


def _flat_fields(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _flat_fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _config_spec(argv) -> str:
  """The --config value of argv (default: the packaged configs/care.py)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return "configs/care.py"


def _print_help(argv):
  """absl's flag help (which exits 1), then the presets, and exit 0: help is no error."""
  app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True)
  try:
    print("\n" + presets_help(_config_spec(argv).partition(":")[0]))
  except Exception as e:  # the config file cannot be read: say so, help still succeeded
    print(f"\n(no presets listed: {type(e).__name__}: {e})")
  sys.exit(0)


def refuse_old_flags(argv, renamed: dict) -> None:
  """One line (exit status 2) for a flag spelled the way an older care_jax took it:
  `renamed` maps the old flag to what replaces it."""
  for arg in argv[1:]:
    old = arg.split("=", 1)[0]
    if old in renamed:
      fail(f"{old} is no longer a flag: use {renamed[old]} (python -m ... --help; every "
           "config field: docs/config.md).")


def parse_config_flags(argv, renamed: dict | None = None):
  """absl's parsing for a program with --config (ml_collections' config_flags): config
  mistakes and old flag spellings end in one line (exit status 2) instead of a traceback,
  the --config file is found from any directory (resolve_config_path), and --help lists
  the presets."""
  refuse_old_flags(argv, renamed or {})
  argv = resolve_config_args(argv)
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    _print_help(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl or config_flags, raised from the config or an override
    lines = [line.strip() for line in str(e).replace("\\n", "\n").splitlines() if line.strip()]
    reason = lines[-1].strip("'\"") if lines else type(e).__name__
    try:
      path, _, preset = _config_spec(argv).partition(":")
      fields = sorted(_flat_fields(load_config(path, preset)))
    except Exception:  # the config itself cannot be built; the reason says why
      fail(reason)
    unknown = [arg.split("=")[0][len("--config."):] for arg in argv[1:]
               if arg.startswith("--config.")
               and arg.split("=")[0][len("--config."):] not in fields]
    if unknown:
      fail(f"unknown config field(s) {', '.join(unknown)}. Valid fields: {', '.join(fields)}")
    fail(reason)


def split_overrides(argv) -> tuple[list, list]:
  """(the other arguments, the FIELD=VALUE of each --config.FIELD=VALUE) of an argparse
  program's argv."""
  rest, overrides = [], []
  for arg in argv:
    if arg.startswith("--config.") and "=" in arg:
      overrides.append(arg[len("--config."):])
    else:
      rest.append(arg)
  return rest, overrides


def config_from_spec(spec: str, overrides=()):
  """The config of `FILE[:PRESET]` with FIELD=VALUE overrides (apply_overrides), as
  config_flags builds it for main."""
  path, _, preset = spec.partition(":")
  try:
    config = load_config(path, preset)
  except (ValueError, OSError) as e:  # configs/care.py: an unknown preset, with the list
    raise errors.UserError(f"--config={spec}: {e}") from None
  return apply_overrides(config, overrides)


def apply_overrides(config, overrides=()):
  """`config` with FIELD=VALUE overrides: values read as Python literals, else as text; a
  field keeps its type; an unknown field is refused with the list of valid ones."""
  import ast  # noqa: PLC0415
  fields = sorted(_flat_fields(config))
  for item in overrides:
    field, _, text = item.partition("=")
    if field not in fields:
      raise errors.UserError(f"unknown config field(s) {field}. Valid fields: "
                             f"{', '.join(fields)}")
    *parents, name = field.split(".")
    section = config
    for part in parents:
      section = section[part]
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    if isinstance(section[name], str) or section.get_type(name) is str:
      value = text  # a path or name that looks like a number stays text
    try:
      section[name] = value
    except TypeError:  # ml_collections keeps each field's type
      raise errors.UserError(f"--config.{item}: {field} must be of type "
                             f"{type(section[name]).__name__}, got {value!r}.") from None
  return config
