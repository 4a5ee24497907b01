"""Host side of the views: decode an encoded image, crop, resize and flip it, uint8 out.

An image may also come already decoded, as a uint8 array ([H, W] grey or [H, W, 3] RGB,
e.g. Fashion-MNIST's idx files): it is then cropped as it is, with the same arithmetic
as the decoded bytes of the same pixels.

Only the geometric part of the augmentation runs here (spec "Augmentations": random
resized crop and flip); colour, blur and solarisation run on the device (`augment`).

The crop is resized as the release resizes it: PIL's bilinear filter, whose support
widens with the shrink factor (an antialiased resize). A plain bilinear resize, such as
OpenCV's, looks at two pixels whatever the shrink, so a crop shrunk 1.5x comes out up to
twice as sharp (in gradient energy) as the release's view of it. `_resample`, compiled
when care_jax is installed, computes Pillow's integers to the bit about as fast as
OpenCV's plain bilinear and several times faster than Pillow. Where it was not built (no C
compiler), Pillow resizes, except where both axes are enlarged: there the two filters are
the same up to rounding and OpenCV's is faster.

Decoding is the cost that matters, so each image is decoded once for both views, at full
size as the release decodes it. libjpeg's DCT scaling (decoding at 1/2, 1/4 or 1/8 size)
would be cheaper for big images, but its views are blurrier than the release's; a fused
decode-and-crop per view (tf.image.decode_and_crop_jpeg) costs more than one full decode on
ImageNet-sized images. docs/data.md has the measurements.

Randomness is passed in (`np.random.Generator`), never global, so that the caller can
make every view a pure function of (seed, step, example).
"""
import dataclasses
import io
import math
import re
import struct

import cv2
import numpy as np
import PIL.Image

try:
  from care_jax.data import _resample  # setup.py builds it where a C compiler is.
except ImportError:
  _resample = None

_ATTEMPTS = 10  # random resized crop: tries before falling back to a centre crop.
_RATIO = (3 / 4, 4 / 3)  # aspect ratio range of the crop (spec).
# Decoded straight to RGB; EXIF orientation is ignored, as PIL's decoder (the release's) does.
_CV2_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The pipeline decodes one image per thread; OpenCV's own threads would only compete.
cv2.setNumThreads(1)


class UndecodableImageError(ValueError):
  """The bytes are not an image we can decode (empty, truncated, corrupt)."""


@dataclasses.dataclass(frozen=True)
class Box:
  """A crop window in pixels of the full-size image."""
  top: int
  left: int
  height: int
  width: int


def image_size(encoded: bytes | np.ndarray) -> tuple[int, int]:
  """(height, width) from the header alone (an array's: its shape): PIL reads it lazily.

  A PNG's size is read straight from its IHDR chunk: for Fashion-MNIST's 28 px images
  opening them with PIL took a third of the host's time per example.
  """
  if isinstance(encoded, np.ndarray):
    height, width = encoded.shape[:2]
  elif encoded[:8] == _PNG_SIGNATURE and encoded[12:16] == b"IHDR" and len(encoded) >= 24:
    width, height = struct.unpack(">II", encoded[16:24])
  else:
    try:
      with PIL.Image.open(io.BytesIO(encoded)) as image:
        width, height = image.size
    except Exception as e:  # PIL raises several types for unreadable headers.
      raise UndecodableImageError(
          f"unreadable image header ({len(encoded)} bytes): {_pil_reason(e)}") from e
  if height < 1 or width < 1:
    raise UndecodableImageError(f"image of size {width}x{height}")
  return height, width


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            min_scale: float) -> Box:
  """RandomResizedCrop's window (as torchvision samples it, spec "Augmentations").

  Area fraction U(min_scale, 1), log aspect ratio U(log 3/4, log 4/3); up to ten tries to
  fit the image, then the largest centred window with an allowed aspect ratio.
  """
  area = height * width
  for _ in range(_ATTEMPTS):
    target_area = area * rng.uniform(min_scale, 1.0)
    ratio = math.exp(rng.uniform(math.log(_RATIO[0]), math.log(_RATIO[1])))
    w = round(math.sqrt(target_area * ratio))
    h = round(math.sqrt(target_area / ratio))
    if 0 < w <= width and 0 < h <= height:
      return Box(int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)),
                 h, w)
  return _fallback_box(height, width)


def _fallback_box(height: int, width: int) -> Box:
  """RandomResizedCrop's window when no try fits: the largest centred allowed aspect."""
  ratio = width / height
  if ratio < _RATIO[0]:
    w, h = width, round(width / _RATIO[0])
  elif ratio > _RATIO[1]:
    w, h = round(height * _RATIO[1]), height
  else:
    w, h = width, height
  h, w = max(1, min(h, height)), max(1, min(w, width))
  return Box((height - h) // 2, (width - w) // 2, h, w)


def random_resized_crop_boxes(rng: np.random.Generator, count: int, height: int, width: int,
                              min_scale: float) -> np.ndarray:
  """`count` windows of random_resized_crop_box's distribution at once, for images of one
  size: int64 [count, 4] (top, left, height, width).

  All ten tries are drawn up front and the first that fits is kept, so the windows follow
  the same law as one call at a time (not the same draws). Per-call numpy overhead was
  most of the host's time per example for Fashion-MNIST's decoded 28 px images.
  """
  area = height * width
  target_area = area * rng.uniform(min_scale, 1.0, (count, _ATTEMPTS))
  ratio = np.exp(rng.uniform(math.log(_RATIO[0]), math.log(_RATIO[1]), (count, _ATTEMPTS)))
  w = np.round(np.sqrt(target_area * ratio)).astype(np.int64)
  h = np.round(np.sqrt(target_area / ratio)).astype(np.int64)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = np.argmax(fits, axis=1)
  h, w = h[np.arange(count), first], w[np.arange(count), first]
  top = (rng.random(count) * (height - h + 1)).astype(np.int64)
  left = (rng.random(count) * (width - w + 1)).astype(np.int64)
  boxes = np.stack([top, left, h, w], axis=1)
  fallback = _fallback_box(height, width)
  boxes[~fits.any(axis=1)] = (fallback.top, fallback.left, fallback.height, fallback.width)
  return boxes


def centre_view_box(height: int, width: int, size: int) -> tuple[float, float, float, float]:
  """The validation view's window (spec "Linear evaluation": resize the shorter side to 256,
  centre crop 224; at other sizes the same proportions): (left, top, right, bottom) in
  pixels of the image, fractional, so that one resize of it gives exactly the pixels of
  the release's resize-then-crop (torchvision's Resize(int) and CenterCrop arithmetic).
  """
  short_side = round(size * 256 / 224)
  if width <= height:
    new_width, new_height = short_side, int(short_side * height / width)
  else:
    new_width, new_height = int(short_side * width / height), short_side
  top, left = int(round((new_height - size) / 2)), int(round((new_width - size) / 2))
  sy, sx = height / new_height, width / new_width
  return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def _decode_rgb(encoded: bytes) -> np.ndarray:
  """Decodes to a 3-channel RGB uint8 array.

  OpenCV decodes JPEG (also CMYK and grayscale) and PNG straight into numpy and refuses
  truncated data; whatever it refuses goes to PIL, which knows more formats and also
  refuses truncated files. What neither decodes is undecodable.
  """
  try:
    image = cv2.imdecode(np.frombuffer(encoded, np.uint8), _CV2_FLAGS)
  except cv2.error:  # Raised for empty buffers, None returned for data it refuses.
    image = None
  if image is not None:
    return image
  try:
    with PIL.Image.open(io.BytesIO(encoded)) as pil_image:
      return np.asarray(pil_image.convert("RGB"))
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad data.
    raise UndecodableImageError(
        f"cannot decode ({len(encoded)} bytes): {_pil_reason(e)}") from e


def _pil_reason(error: Exception) -> str:
  """PIL's message without the repr of the in-memory file it was given
  ("<_io.BytesIO object at 0x...>"): the caller names the real file."""
  return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error))


def _array_rgb(image: np.ndarray) -> np.ndarray:
  """A decoded uint8 image as the 3-channel RGB array that _decode_rgb would return."""
  if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
      image.ndim == 3 and image.shape[2] not in (1, 3)):
    raise UndecodableImageError(f"not a uint8 grey or RGB image: {image.dtype} {image.shape}")
  if image.ndim == 2 or image.shape[2] == 1:
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
  return image


def resize(image: np.ndarray, size: int,
           box: tuple[float, float, float, float] | None = None) -> np.ndarray:
  """uint8 [H, W] or [H, W, 3] -> size x size with PIL's bilinear filter, the release's
  resize (PIL.Image.resize(BILINEAR, box), antialiased when shrinking), of the window
  `box` (left, top, right, bottom in pixels, fractional; default the whole image)."""
  height, width = image.shape[:2]
  box = (0.0, 0.0, float(width), float(height)) if box is None else tuple(map(float, box))
  if _resample is not None:
    resized = np.empty((size, size) + image.shape[2:], np.uint8)
    _resample.resize(image, resized, box)
    return resized
  if box == (0.0, 0.0, width, height) and height <= size and width <= size:
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
  return np.asarray(PIL.Image.fromarray(image).resize((size, size), PIL.Image.BILINEAR, box))


def resampler() -> str:
  """What resizes the crops on this machine (benchmarks report it with their figures)."""
  if _resample is None:
    return "Pillow (care_jax.data._resample was not built: install care_jax with a C compiler)"
  kernels = _resample.kernels()
  return (f"care_jax.data._resample ({kernels['vertical']} vertical, "
          f"{kernels['horizontal_rgb']} horizontal RGB pass)")


def crop_array_views(images: np.ndarray, boxes: np.ndarray, flips: np.ndarray,
                     size: int) -> np.ndarray:
  """images[i] cropped to boxes[i] (top, left, height, width), resized to size x size and
  flipped where flips[i]: uint8 [n, size, size, 3] RGB from uint8 [n, H, W] grey or
  [n, H, W, 3] RGB images. The pixels crop_views gives for the same image and box,
  without a colour conversion per view.
  """
  if images.ndim == 4 and images.shape[3] == 1:
    images = images[..., 0]
  resized = np.empty((len(images), size, size) + images.shape[3:], np.uint8)
  for i, (top, left, height, width) in enumerate(boxes.tolist()):  # Python ints: faster
    resized[i] = resize(images[i, top:top + height, left:left + width], size)
  flips = np.asarray(flips, bool)
  resized[flips] = resized[flips, :, ::-1]
  if resized.ndim == 4:
    return resized
  rgb = np.empty(resized.shape + (3,), np.uint8)
  rgb[...] = resized[..., None]
  return rgb


def _decoded(encoded: bytes | np.ndarray) -> np.ndarray:
  return _array_rgb(encoded) if isinstance(encoded, np.ndarray) else _decode_rgb(encoded)


def crop_views(encoded: bytes | np.ndarray, boxes: list[Box], flips: list[bool], size: int,
               full_size: tuple[int, int]) -> list[np.ndarray]:
  """Decodes once (unless already decoded), then for each box: crop, resize to size x size,
  flip. RGB uint8 out.

  `full_size` is image_size(encoded); boxes are in its pixels.
  """
  image = _decoded(encoded)
  if image.shape[:2] != tuple(full_size):
    raise UndecodableImageError(f"decoded as {image.shape[1]}x{image.shape[0]}, its header "
                                f"says {full_size[1]}x{full_size[0]}")
  views = []
  for box, flip in zip(boxes, flips):
    view = resize(image[box.top:box.top + box.height, box.left:box.left + box.width], size)
    views.append(view[:, ::-1] if flip else view)
  return views


def centre_view(encoded: bytes | np.ndarray, size: int) -> np.ndarray:
  """The validation view (centre_view_box), RGB uint8 [size, size, 3]."""
  image = _decoded(encoded)
  return resize(image, size, centre_view_box(*image.shape[:2], size))
