"""Real photographs that packages ship (no download): scikit-learn's two sample photos and
matplotlib's, plus one of them under a colour cast, as uint8 RGB arrays and JPEG bytes."""
import functools
import io
import os

import matplotlib
import numpy as np
import PIL.Image
from sklearn.datasets import load_sample_images

# A warm cast (red kept, green and blue dimmed), as under tungsten light: the case where
# blending each channel with its own mean and blending with one grey differ most.
WARM_CAST = np.array([1.0, 0.8, 0.55])


@functools.cache
def photos() -> dict[str, np.ndarray]:
  """name -> uint8 [H, W, 3] RGB."""
  china, flower = load_sample_images().images  # 427 x 640 each
  hopper_path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data",
                             "sample_data", "grace_hopper.jpg")
  with PIL.Image.open(hopper_path) as image:
    hopper = np.asarray(image.convert("RGB"))  # 600 x 512
  cast = np.round(china * WARM_CAST).astype(np.uint8)
  return {"china": china, "flower": flower, "grace_hopper": hopper, "china_warm_cast": cast}


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()
