"""docs/config.md is what `python -m care_jax.config_reference --write` makes of
configs/care.py today, and every config field has a meaning there."""
import pytest

from care_jax import cli, config_reference


def test_the_page_is_up_to_date():
  assert config_reference.PAGE.read_text() == config_reference.render(), (
      "docs/config.md is out of date: run `python -m care_jax.config_reference --write`")


def test_every_field_has_a_meaning_and_every_meaning_a_field():
  module = cli.config_module(cli.CONFIG_FILE)
  names = {name for name, _ in config_reference.fields(module.get_config())}
  assert names == set(module.FIELD_HELP)
  for preset in module.PRESETS:  # presets change values, never the set of fields
    assert {name for name, _ in config_reference.fields(module.get_config(preset))} == names


def test_a_new_field_without_a_meaning_is_named(monkeypatch):
  module = cli.config_module(cli.CONFIG_FILE)
  get_config = module.get_config

  def with_new_field(*args):
    config = get_config(*args)
    config.data.new_field = 1
    return config

  monkeypatch.setattr(module, "get_config", with_new_field)
  monkeypatch.setattr(cli, "config_module", lambda path: module)
  with pytest.raises(ValueError, match="no entry for data.new_field"):
    config_reference.render()
