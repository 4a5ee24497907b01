import json

from tests.conftest import ROOT


def _record(setting, seed, encoder, probe):
  return {"setting": setting, "fields": [] if setting == "base" else ["seed=1"], "seed": seed,
          "steps": 10, "epochs": 0.02, "pretrain_seconds": 90.0, "pairs_per_sec": 12.5,
          "knn_top1": 0.5, "online_probe_top1": 0.4, "encoder": encoder, "probe_top1": probe}


def test_table_gives_each_setting_its_random_init_probe_or_a_dash(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / "experiments"))
  import cpu_recipe
  out = tmp_path / "runs.jsonl"
  records = [_record("base", 0, "pretrained", 0.71), _record("base", 0, "random_init", 0.65),
             _record("other", 0, "pretrained", 0.73)]  # run with --no_random_init
  out.write_text("".join(json.dumps(r) + "\n" for r in records))
  rows = cpu_recipe.table(out).splitlines()
  assert len(rows) == 4  # header, rule, one row per pretrained run
  assert rows[2] == ("| base: the preset | 0 | 10 (0.02) | 1.5 | 12.5 | 0.5000 | 0.4000 | "
                     "0.7100 | 0.6500 |")
  assert rows[3].startswith("| other: seed=1 | 0 |") and rows[3].endswith("| 0.7300 | - |")
