"""docs/config.md: every config field with its default and meaning, generated from
configs/care.py (its default config and FIELD_HELP) so that the page cannot drift.

  python -m care_jax.config_reference --write    # rewrites docs/config.md
  python -m care_jax.config_reference            # prints it
"""
import json
import sys

from care_jax import cli

PAGE = cli.CONFIG_DIR.parent / "docs" / "config.md"


def fields(config, prefix: str = "") -> list:
  """(dotted name, default) of every leaf field, in the config's order."""
  out = []
  for key, value in config.items():
    if hasattr(value, "items"):
      out += fields(value, f"{prefix}{key}.")
    else:
      out.append((f"{prefix}{key}", value))
  return out


def render() -> str:
  module = cli.config_module(cli.CONFIG_FILE)
  help_ = module.FIELD_HELP
  rows = fields(module.get_config())
  missing = sorted(name for name, _ in rows if name not in help_)
  if missing:
    raise ValueError(f"configs/care.py's FIELD_HELP has no entry for {', '.join(missing)}.")
  lines = ["# Configuration reference", "",
           "Generated from `configs/care.py` by `python -m care_jax.config_reference --write`; "
           "do not edit by hand. Defaults are those of the default preset (`r50_100ep`); "
           "`python -m care_jax.main --help` lists the presets, and the README's table what "
           "they change. Change any field with `--config.FIELD=VALUE`.", "",
           "| field | default | meaning |", "|---|---|---|"]
  for name, default in rows:
    lines.append(f"| `{name}` | `{json.dumps(default)}` | {help_[name]} |")
  presets = ", ".join(f"`{p}`" for p in module.PRESETS)
  lines += ["", f"Presets: {presets}.", ""]
  return "\n".join(lines)


def main(argv) -> None:
  text = render()
  if argv[1:] == ["--write"]:
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
  elif argv[1:]:
    cli.fail(f"unknown arguments {' '.join(argv[1:])}; use --write or none.")
  else:
    print(text, end="")


if __name__ == "__main__":
  main(sys.argv)
