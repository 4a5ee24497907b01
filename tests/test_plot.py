"""care_jax.plot: the learning curve (kNN, online probe against epochs) from the events."""
import json

import PIL.Image
import pytest

from care_jax import metric_writers, plot


@pytest.mark.parametrize("have_clu", [True, False])
def test_learning_curve_from_events_against_epochs(tmp_path, monkeypatch, capsys, have_clu):
  if have_clu and not metric_writers.HAVE_CLU:
    pytest.skip("clu is not installed")
  monkeypatch.setattr(metric_writers, "HAVE_CLU", have_clu)
  writer = metric_writers.create_default_writer(tmp_path / "run")
  for step in range(50, 1001, 50):  # the trainer's log lines: 'epoch' = step / 58
    writer.write_scalars(step, {"loss": 1.0, "epoch": step / 58})
  monitored = range(58, 58 * 16, 58)  # 15 evaluations: more than TensorBoard keeps by default
  for k, step in enumerate(monitored):
    writer.write_scalars(step, {"knn_top1": 0.5 + k / 100, "online_probe_top1": 0.4 + k / 100})
  writer.flush()
  (tmp_path / "results.json").write_text(json.dumps(
      {"linear_top1": 0.91, "random_init_linear_top1": 0.8, "raw_pixels_linear_top1": 0.84,
       "pretrain_seconds": 300}))
  out = tmp_path / "curve.png"
  plot.main([f"--workdir={tmp_path / 'run'}", f"--out={out}",
             f"--results={tmp_path / 'results.json'}"])
  printed = json.loads(capsys.readouterr().out)
  assert printed["x"] == "epoch"
  assert printed["knn_top1"] == [[k + 1, pytest.approx(0.5 + k / 100)] for k in range(15)]
  assert printed["online_probe_top1"][-1] == [15, pytest.approx(0.54)]
  assert printed["linear_top1"] == 0.91 and "pretrain_seconds" not in printed
  with PIL.Image.open(out) as png:
    assert png.size == (600, 400)


def test_a_run_without_monitors_says_so(tmp_path):
  writer = metric_writers.create_default_writer(tmp_path)
  writer.write_scalars(10, {"loss": 1.0})
  writer.flush()
  with pytest.raises(SystemExit, match="monitor.every_steps"):
    plot.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'x.png'}"])
