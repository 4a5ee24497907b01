"""care_jax.visualize: T-stream attention and the C-stream map, drawn over the images."""
import json
import re

import numpy as np
import PIL.Image
import pytest

from care_jax import pretrained, visualize
from tests.conftest import load_config


def test_attention_sums_to_one_per_query_and_the_png_has_a_panel_per_map(tmp_path):
  network, variables = pretrained.random_init(load_config("tiny"), 16)
  images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  attention, c_maps = visualize.stream_maps(network, variables, images, block=0)
  assert attention.shape == (3, 2, 4, 4, 4, 4)  # tiny: 2 heads on layer3's 4x4 grid
  np.testing.assert_allclose(attention.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
  assert c_maps.shape == (3, 2, 2) and (c_maps > 0).all()  # layer4's 2x2 grid

  mean = visualize.query_maps(attention, "mean")
  np.testing.assert_allclose(mean.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(visualize.query_maps(attention, "1,2"), attention[:, :, 1, 2])
  out = tmp_path / "maps.png"
  visualize.draw(images, mean, c_maps, str(out), "test", panel_inches=1.0, dpi=50)
  with PIL.Image.open(out) as png:
    assert png.size == ((2 + 2) * 50, 3 * 50)  # image, 2 heads, C-stream; 3 rows


def test_trained_and_random_encoders_draw_different_maps(tmp_path, pretrained_workdir, capsys,
                                                        monkeypatch):
  drawn, draw = {}, visualize.draw

  def recording_draw(images, t_maps, c_maps, out, title, **kwargs):
    drawn[out] = t_maps, c_maps
    draw(images, t_maps, c_maps, out, title, **kwargs)

  monkeypatch.setattr(visualize, "draw", recording_draw)
  sizes = set()
  for encoder in ("pretrained", "random_init"):
    out = str(tmp_path / f"{encoder}.png")
    visualize.main([f"--workdir={pretrained_workdir}", "--images=0,3,5", f"--out={out}",
                    f"--encoder={encoder}", "--query=0,0"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["attention_grid"] == "4x4" and len(summary["entropy_per_head"]) == 2
    assert all(0 < e <= 1 for e in summary["entropy_per_head"])
    with PIL.Image.open(out) as png:
      sizes.add(png.size)
  assert len(sizes) == 1
  (t_trained, c_trained), (t_random, c_random) = drawn.values()
  assert t_trained.shape == t_random.shape == (3, 2, 4, 4)  # query 0,0: one map per head
  assert not np.allclose(t_trained, t_random, atol=1e-4)
  assert not np.allclose(c_trained, c_random, rtol=1e-3)


@pytest.mark.parametrize("arg, message", [
    ("--workdir={tmp}/nowhere", r"\S+/nowhere is not a care_jax workdir: \S+config.json is "
                                r"missing"),
    ("--images=abc", r"--images must be comma-separated indices such as 0,1,2; got 'abc'"),
    ("--query=3", r"--query must be 'mean' or a position ROW,COL such as 0,3; got '3'"),
    ("--out={tmp}/no_folder/x.png", r"--out \S+/no_folder/x.png: its folder does not exist"),
    ("--config=configs/care.py:tiny", r"--config is no longer a flag: use --config.data.FIELD"),
    ("--config.model.width=2", r"Only data fields may change \(--config.data.FIELD=VALUE")])
def test_a_missing_workdir_or_a_malformed_argument_is_one_line(tmp_path, capsys, arg, message):
  argv = [f"--workdir={tmp_path}", f"--out={tmp_path / 'x.png'}", arg.format(tmp=tmp_path)]
  with pytest.raises(SystemExit) as exit:
    visualize.main(argv)  # later flags win
  err = capsys.readouterr().err
  assert exit.value.code == 2 and re.match(f"^error: {message}", err) and err.count("\n") == 1
