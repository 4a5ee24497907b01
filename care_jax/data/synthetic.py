"""Natural-looking synthetic photographs, for tests and the input benchmark.

Real photographs have a roughly 1/f amplitude spectrum; a sum of upsampled noise octaves
with amplitude falling as 1/octave, plus sensor-like pixel noise, gives JPEGs of about the
size and decoding cost of ImageNet's (~90 KB at 500x375, quality 90).
"""
import os

import cv2
import numpy as np
import PIL.Image


def natural_image(rng: np.random.Generator, height: int = 375, width: int = 500) -> np.ndarray:
  """uint8 [height, width, 3]."""
  image = np.full((height, width, 3), 128.0, np.float32)
  for octave in range(1, 8):
    cells = 2 ** octave
    noise = rng.normal(size=(cells * height // width + 2, cells + 2, 3)).astype(np.float32)
    image += cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC) * 60 / octave
  image += rng.normal(scale=14, size=image.shape).astype(np.float32)
  return np.clip(image, 0, 255).astype(np.uint8)


def write_jpegs(directory: str, count: int, *, height: int = 375, width: int = 500,
                seed: int = 0, quality: int = 90) -> list[str]:
  """Writes count JPEGs img00000.jpg... into directory; returns their paths."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    path = os.path.join(directory, f"img{i:05d}.jpg")
    PIL.Image.fromarray(natural_image(rng, height, width)).save(path, quality=quality)
    paths.append(path)
  return paths


def write_image_folder(root: str, *, splits: dict[str, int],
                       classes: tuple[str, ...] = ("cat", "dog"),
                       height: int = 40, width: int = 48, seed: int = 0) -> None:
  """root/<split>/<class>/img*.jpg with splits[split] images per class (tfds ImageFolder)."""
  for i, (split, per_class) in enumerate(sorted(splits.items())):
    for j, cls in enumerate(classes):
      write_jpegs(os.path.join(root, split, cls), per_class, height=height, width=width,
                  seed=seed + 100 * i + j)
