"""Writes ILSVRC2012 tars with ImageNet's real counts but small images, for the rehearsal.

  python experiments/fake_imagenet.py --manual_dir=DIR

DIR gets what docs/data.md asks users to download: ILSVRC2012_img_train.tar (1,000 inner
tars, one per synset of tfds' labels.txt, 1,281,167 JPEGs in all) and ILSVRC2012_img_val.tar
(50,000 JPEGs named as the real ones), plus SimCLR-style 1percent.txt (12,811 names). The
images are natural-looking noise (care_jax.data.synthetic) of random sizes from 32 to 96
px a side: decoding stays cheap enough for a 2-core CPU, while every count, file name and
the tars' layout are the real ones. A pool of distinct JPEGs is reused across entries.
"""
import argparse
import io
import os
import tarfile

import numpy as np
import PIL.Image

from care_jax.data import synthetic

NUM_TRAIN, NUM_VAL, NUM_CLASSES, NUM_1PCT = 1_281_167, 50_000, 1000, 12_811


def _labels_file() -> str:
  import tensorflow_datasets as tfds
  return os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")


def jpeg_pool(size: int, seed: int = 0) -> list[bytes]:
  rng = np.random.default_rng(seed)
  pool = []
  for _ in range(size):
    height, width = rng.integers(32, 97, size=2)
    buffer = io.BytesIO()
    PIL.Image.fromarray(synthetic.natural_image(rng, height, width)).save(buffer, "JPEG",
                                                                          quality=90)
    pool.append(buffer.getvalue())
  return pool


def _add(tar, name: str, data: bytes) -> None:
  member = tarfile.TarInfo(name)
  member.size = len(data)
  tar.addfile(member, io.BytesIO(data))


def write(manual_dir: str, pool_size: int = 4096) -> None:
  os.makedirs(manual_dir, exist_ok=True)
  with open(_labels_file()) as f:
    synsets = f.read().split()
  assert len(synsets) == NUM_CLASSES
  pool = jpeg_pool(pool_size)
  per_class = [NUM_TRAIN // NUM_CLASSES + (c < NUM_TRAIN % NUM_CLASSES)
               for c in range(NUM_CLASSES)]
  subset = []
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
    n = 0
    for c, synset in enumerate(synsets):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as images:
        for i in range(per_class[c]):
          # Numbers from 900000: clear of the real names tfds re-encodes (CMYK, PNG).
          name = f"{synset}_{900000 + i}.JPEG"
          _add(images, name, pool[n % pool_size])
          if i < NUM_1PCT // NUM_CLASSES + (c < NUM_1PCT % NUM_CLASSES):
            subset.append(name)
          n += 1
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
    for i in range(NUM_VAL):
      _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", pool[(7 * i) % pool_size])
  with open(os.path.join(manual_dir, "1percent.txt"), "w") as f:
    f.write("\n".join(subset) + "\n")
  print(f"{n} train, {NUM_VAL} validation images, {len(subset)} in 1percent.txt: {manual_dir}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--manual_dir", required=True)
  parser.add_argument("--pool_size", type=int, default=4096)
  args = parser.parse_args()
  write(args.manual_dir, args.pool_size)
