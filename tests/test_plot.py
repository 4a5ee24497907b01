"""care_jax.plot: the learning curve (kNN, online probe against epochs) from the events."""
import json
import re

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


def test_a_run_resumed_from_an_earlier_checkpoint_keeps_the_rerun_steps(tmp_path):
  """Killed after step 150, resumed from checkpoint 100: steps 101-150 are logged twice,
  and the curve is the resumed run's, one point per step."""
  first = metric_writers.create_default_writer(tmp_path)
  for step in range(25, 151, 25):
    first.write_scalars(step, {"knn_top1": 0.1, "epoch": step / 50})
  first.close()
  resumed = metric_writers.create_default_writer(tmp_path)  # a second event file
  for step in range(110, 201, 30):  # logged at other steps too (log_every_steps changed)
    resumed.write_scalars(step, {"knn_top1": step / 1000, "epoch": step / 50})
  resumed.close()
  steps, values = zip(*plot.read_scalars(str(tmp_path))["knn_top1"])
  assert steps == (25, 50, 75, 100, 110, 140, 170, 200)
  assert values == pytest.approx([0.1] * 4 + [0.11, 0.14, 0.17, 0.2])


def test_a_run_without_monitors_says_so(tmp_path, capsys):
  writer = metric_writers.create_default_writer(tmp_path)
  writer.write_scalars(10, {"loss": 1.0})
  writer.flush()
  with pytest.raises(SystemExit) as exit:
    plot.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'x.png'}"])
  assert exit.value.code == 2
  assert capsys.readouterr().err.startswith(f"error: No kNN or online-probe scalars in "
                                            f"{tmp_path}: was the run's config.monitor.every")


@pytest.mark.parametrize("args, message", [
    (["--workdir={tmp}/nowhere"], r"--workdir \S+/nowhere is not a directory; pass a"),
    (["--results={tmp}/results.json"], r"Cannot read --results \S+/results.json \(No such "
                                       r"file or directory\); pass the demo's results.json"),
    (["--out={tmp}/no_folder/x.png"], r"--out \S+/no_folder/x.png: its folder does not exist")])
def test_a_missing_workdir_results_or_output_folder_is_one_line(tmp_path, capsys, args,
                                                               message):
  argv = [f"--workdir={tmp_path}", f"--out={tmp_path / 'x.png'}"]
  argv += [a.format(tmp=tmp_path) for a in args]  # later flags win
  with pytest.raises(SystemExit) as exit:
    plot.main(argv)
  err = capsys.readouterr().err
  assert exit.value.code == 2 and re.match(f"^error: {message}", err) and err.count("\n") == 1
