"""Bad files never stop a run: decoded correctly, or skipped, counted and logged."""
import io
import logging
import os

import ml_collections
import numpy as np
import PIL.Image

from care_jax.data import input_pipeline, synthetic

SIZE = 16
COLOUR = (200, 40, 60)


def folder_config(root, eval_split="train"):
  return ml_collections.ConfigDict(dict(
      name="image_folder", data_dir=None, folder_root=str(root), image_size=SIZE,
      train_split="train", eval_split=eval_split, crop_min_scale=0.08, num_workers=2))


def encode(image: PIL.Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def flat(mode="RGB", size=(48, 40), colour=COLOUR):
  return PIL.Image.new("RGB", size, colour).convert(mode)


def folder_with(tmp_path, name: str, data: bytes, good: int = 7):
  """train/a/ holds `good` good JPEGs and the file `name` with `data`; returns config."""
  class_dir = tmp_path / "train" / "a"
  synthetic.write_jpegs(str(class_dir), good, height=40, width=48)
  (class_dir / name).write_bytes(data)
  return folder_config(tmp_path)


def pretrain(config, steps=2, batch=8):
  iterator = input_pipeline.pretrain_batches(config, global_batch_size=batch, seed=0)
  batches = [next(iterator) for _ in range(steps)]
  iterator.close()
  return batches


def assert_skipped_and_logged(tmp_path, caplog, name, data):
  """The bad file is replaced, counted and named in the log; batches stay deterministic."""
  config = folder_with(tmp_path, name, data)
  bad = sorted(os.listdir(tmp_path / "train" / "a")).index(name)
  with caplog.at_level(logging.WARNING):
    batch, = pretrain(config, steps=1)
  assert batch["num_skipped"] == 1
  assert batch["view1"].shape == (8, SIZE, SIZE, 3)
  assert bad not in batch["index"]  # Replaced by another example...
  assert name in caplog.text  # ...and the file named in the log.
  again, = pretrain(config, steps=1)  # Replacement is deterministic.
  np.testing.assert_array_equal(batch["view1"], again["view1"])
  np.testing.assert_array_equal(batch["index"], again["index"])


def jpeg_bytes():
  return encode(PIL.Image.fromarray(synthetic.natural_image(np.random.default_rng(1), 40, 48)),
                "JPEG", quality=90)


def test_truncated_jpeg_is_skipped(tmp_path, caplog):
  data = jpeg_bytes()
  assert_skipped_and_logged(tmp_path, caplog, "truncated.jpg", data[:len(data) // 2])


def test_corrupt_jpeg_is_skipped(tmp_path, caplog):
  data = bytearray(jpeg_bytes())
  data[2:200] = os.urandom(198)  # Destroys the headers after the start-of-image marker.
  assert_skipped_and_logged(tmp_path, caplog, "corrupt.jpg", bytes(data))


def test_zero_byte_file_is_skipped(tmp_path, caplog):
  assert_skipped_and_logged(tmp_path, caplog, "empty.jpg", b"")


def only_image(tmp_path, data: bytes, name="x.jpg"):
  (tmp_path / "train" / "a").mkdir(parents=True)
  (tmp_path / "train" / "a" / name).write_bytes(data)
  batch, = pretrain(folder_config(tmp_path), steps=1, batch=1)
  assert batch["num_skipped"] == 0
  return batch["view1"][0], batch["view2"][0]


def assert_colour(view, colour, tolerance):
  assert view.shape == (SIZE, SIZE, 3) and view.dtype == np.uint8
  np.testing.assert_allclose(view.reshape(-1, 3).mean(0), colour, atol=tolerance)
  assert view.std(axis=(0, 1)).max() < 2  # Flat: no garbage.


def test_cmyk_jpeg_is_decoded_in_its_colours(tmp_path):
  cmyk = flat("CMYK")
  expected = np.asarray(cmyk.convert("RGB"))[0, 0]
  for view in only_image(tmp_path, encode(cmyk, "JPEG", quality=95)):
    assert_colour(view, expected, tolerance=4)


def test_grayscale_jpeg_becomes_three_equal_channels(tmp_path):
  gray = flat("L")
  level = np.asarray(gray)[0, 0]
  for view in only_image(tmp_path, encode(gray, "JPEG", quality=95)):
    assert_colour(view, [level] * 3, tolerance=3)
    assert (view[..., 0] == view[..., 1]).all() and (view[..., 1] == view[..., 2]).all()


def test_png_data_in_a_jpg_file_is_decoded(tmp_path):
  image = np.zeros((40, 48, 3), np.uint8)
  image[:, :24] = COLOUR  # Left half colour, right half black: checks channel order too.
  view1, _ = only_image(tmp_path, encode(PIL.Image.fromarray(image), "PNG"))
  # Every pixel lies on the segment black..COLOUR (bilinear mixes them at the edge only);
  # swapped channels or garbage would not.
  v = view1.reshape(-1, 3).astype(float)
  t = v[:, 0] / COLOUR[0]
  np.testing.assert_allclose(v, np.outer(t, COLOUR), atol=2)


def test_image_smaller_than_the_crop_is_upscaled(tmp_path):
  tiny = flat(size=(5, 3))
  for view in only_image(tmp_path, encode(tiny, "PNG")):
    assert_colour(view, COLOUR, tolerance=0.5)


def test_undecodable_validation_image_is_masked_out(tmp_path, caplog):
  config = folder_with(tmp_path, "truncated.jpg", jpeg_bytes()[:300], good=3)
  with caplog.at_level(logging.WARNING):
    batch, = input_pipeline.centre_view_batches(config, config.eval_split, global_batch_size=4)
  assert batch["mask"].tolist() == [True, True, True, False]
  assert batch["num_skipped"] == 1 and "truncated.jpg" in caplog.text
