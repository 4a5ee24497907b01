"""The compiled resampler (care_jax/data/_resample.c) against Pillow, the release's resize:
equal to the bit, for RGB and grey, shrinking and enlarging, whole images, crops (strided
rows) and fractional boxes, with the AVX2 kernels and with the portable ones."""
import concurrent.futures
import functools
import types

import numpy as np
import PIL.Image
import pytest

from care_jax.data import input_pipeline, views
from photos import photos

_resample = views._resample


def test_the_compiled_resampler_is_built():
  assert _resample is not None, (
      "care_jax/data/_resample.c was not built: `make setup` (pip install -e .) compiles it "
      "with the C compiler; pip's output says why it could not")


def pillow(image, out_height, out_width, box):
  return np.asarray(PIL.Image.fromarray(image).resize((out_width, out_height),
                                                      PIL.Image.BILINEAR, box))


def random_cases(seed: int, count: int):
  """(image, out_height, out_width, box): sizes 1-149 px, a third grey; a quarter whole
  images, a quarter fractional boxes, half integer boxes; images are views into larger
  arrays (strided rows)."""
  rng = np.random.default_rng(seed)
  for i in range(count):
    height, width = (int(v) for v in rng.integers(1, 150, 2))
    out_height, out_width = (int(v) for v in rng.integers(1, 150, 2))
    shape = (height + 3, width + 5) + ((3,) if i % 3 else ())
    image = rng.integers(0, 256, shape, dtype=np.uint8)[1:height + 1, 2:width + 2]
    kind = i % 4
    if kind == 0:
      box = (0.0, 0.0, float(width), float(height))
    else:
      x = np.sort(rng.uniform(0, width, 2) if kind == 1 else rng.integers(0, width + 1, 2))
      y = np.sort(rng.uniform(0, height, 2) if kind == 1 else rng.integers(0, height + 1, 2))
      if x[1] - x[0] < 0.5 or y[1] - y[0] < 0.5:
        continue
      box = (float(x[0]), float(y[0]), float(x[1]), float(y[1]))
    yield image, out_height, out_width, box


def resized(image, out_height, out_width, box, portable=False):
  """Into a view of a larger array too: the output's rows may be strided."""
  out = np.zeros((out_height, out_width + 7) + image.shape[2:], np.uint8)[:, 3:3 + out_width]
  _resample.resize(image, out, box, portable=portable)
  return out


def cpu_has_avx2():
  """From /proc/cpuinfo's flags; None where there is none to read."""
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      return any(line.startswith("flags") and "avx2" in line.split() for line in cpuinfo)
  except OSError:
    return None


@pytest.fixture(params=["fastest", "portable"])
def portable(request, monkeypatch):
  """Whether the calls run the plain C kernels (those of CPUs without AVX2, e.g. ARM),
  chosen per call; views.resize runs them through a stand-in module. The fastest are
  checked to be AVX2 where the CPU has it: a silent fallback would test the plain C twice."""
  if request.param == "portable":
    monkeypatch.setattr(views, "_resample", types.SimpleNamespace(
        resize=functools.partial(_resample.resize, portable=True), kernels=_resample.kernels))
    return True
  avx2 = cpu_has_avx2()
  if avx2 is not None:
    expected = "avx2" if avx2 else "portable"
    assert _resample.kernels() == {"vertical": expected, "horizontal_rgb": expected}
  return False


def test_equals_pillow_to_the_bit(portable):
  cases = list(random_cases(0, 400))
  # Pillow 13 runs the vertical pass first when the height shrinks by more than twice as
  # many pixels as the width: both orders, and the boundary, among the cases.
  rng = np.random.default_rng(1)
  for height, width, out_height, out_width in ((242, 121, 3, 14), (100, 100, 30, 66),
                                               (100, 100, 30, 65), (133, 165, 57, 186),
                                               (300, 280, 224, 224), (5, 500, 5, 224)):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    cases.append((image, out_height, out_width, (0.0, 0.0, float(width), float(height))))
  for image, out_height, out_width, box in cases:
    expected = pillow(np.ascontiguousarray(image), out_height, out_width, box)
    np.testing.assert_array_equal(resized(image, out_height, out_width, box, portable),
                                  expected,
                                  err_msg=f"{image.shape} -> {out_height}x{out_width} {box}")


def test_threads_running_either_kernels_get_pillows_bytes():
  """resize releases the GIL and the kernels are chosen per call, not by a global that a
  call on another thread could switch: calls with both at once each equal Pillow."""
  assert not hasattr(_resample, "use_portable_kernels")
  fastest = _resample.kernels()
  cases = list(random_cases(3, 40))
  expected = [pillow(np.ascontiguousarray(image), out_height, out_width, box)
              for image, out_height, out_width, box in cases]

  def run(i):
    return resized(*cases[i % len(cases)], portable=bool(i % 2))

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for i, out in enumerate(pool.map(run, range(400))):
      np.testing.assert_array_equal(out, expected[i % len(cases)], err_msg=f"call {i}")
  assert _resample.kernels() == fastest


def test_photo_views_equal_pillows(portable):
  """The pipeline's own calls on real photos: random crops to 224 px, centre views."""
  rng = np.random.default_rng(2)
  for image in photos().values():
    for _ in range(6):
      box = views.random_resized_crop_box(rng, *image.shape[:2], 0.08)
      crop = image[box.top:box.top + box.height, box.left:box.left + box.width]
      np.testing.assert_array_equal(views.resize(crop, 224),
                                    pillow(np.ascontiguousarray(crop), 224, 224, None))
    centre = views.centre_view_box(*image.shape[:2], 224)
    np.testing.assert_array_equal(views.resize(image, 224, centre),
                                  pillow(image, 224, 224, centre))


def test_without_it_pillow_resizes(monkeypatch):
  """Where no C compiler built it, views.resize is Pillow's (OpenCV's where both axes
  enlarge: the same filter up to rounding)."""
  monkeypatch.setattr(views, "_resample", None)
  image = photos()["flower"]
  crop = image[50:350, 100:380]
  np.testing.assert_array_equal(views.resize(crop, 224), pillow(crop, 224, 224, None))
  small = np.ascontiguousarray(image[100:250, 200:297])
  difference = views.resize(small, 224).astype(int) - pillow(small, 224, 224, None)
  assert np.abs(difference).max() <= 1
  assert views.resampler().startswith("Pillow")


@pytest.mark.parametrize("image, out, box, message", [
    (np.zeros((8, 8, 3), np.float32), np.zeros((4, 4, 3), np.uint8), (0, 0, 8, 8), "uint8"),
    (np.zeros((8, 8, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), (0, 0, 8, 8), "uint8"),
    (np.zeros((8, 16, 3), np.uint8)[:, ::2], np.zeros((4, 4, 3), np.uint8), (0, 0, 8, 8),
     "packed"),
    (np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4), np.uint8), (0, 0, 8, 8), "channels"),
    (np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), (0, 0, 9, 8), "window"),
    (np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), (4, 0, 4, 8), "window"),
    (np.zeros((0, 8, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), (0, 0, 8, 0), "1x1"),
])
def test_refuses_what_it_cannot_resize(image, out, box, message):
  with pytest.raises(ValueError, match=message):
    _resample.resize(image, out, box)


def test_refuses_a_read_only_output():
  out = np.zeros((4, 4, 3), np.uint8)
  out.flags.writeable = False
  with pytest.raises((ValueError, BufferError)):
    _resample.resize(np.zeros((8, 8, 3), np.uint8), out, (0, 0, 8, 8))


def test_the_pipeline_says_when_pillow_resizes(monkeypatch, caplog):
  for built in (True, False):
    if not built:
      monkeypatch.setattr(views, "_resample", None)
    input_pipeline._warn_if_pillow_resizes.cache_clear()
    caplog.clear()
    input_pipeline._warn_if_pillow_resizes()
    assert ("resized by Pillow" in caplog.text) == (not built), caplog.text
  input_pipeline._warn_if_pillow_resizes.cache_clear()
