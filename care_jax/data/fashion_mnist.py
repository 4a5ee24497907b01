"""Fashion-MNIST from the original idx .gz files, without internet.

The Debian package `dataset-fashion-mnist` installs the four original idx .gz files in
/usr/share/datasets/fashion-mnist/. Two ways to use them:
  - `fashion_mnist_idx`: read straight into memory as uint8 arrays (`read_split`), in the
    files' order. Needs neither tensorflow nor tfds (machines that have neither, such as
    the GPU machines, read it this way).
  - `fashion_mnist`: prepared once into a tfds dataset (`prepare`). The stock tfds builder
    would download those same files; here it reads the local copies instead and keeps the
    stock name, version and features, so the prepared dataset is the stock one and either
    builder can read what the other wrote. tfds stores the examples shuffled, so the two
    names give the same examples at different indices.

Only `prepare` imports tensorflow_datasets.
"""
import functools
import gzip
import os

import numpy as np

from care_jax.data.errors import DataError, DatasetNotFoundError
from care_jax.data.sources import FASHION_MNIST_DEBIAN_DIR, FASHION_MNIST_FILES

NUM_CLASSES = 10


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped idx file (the MNIST format: magic, dims as big-endian int32, uint8 data)."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = np.frombuffer(data, ">i4", count=ndim, offset=4)
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_idx_length(path: str) -> int:
  """The first dimension of a gzipped idx file, from its header alone."""
  with gzip.open(path, "rb") as f:
    header = f.read(8)
  return int(np.frombuffer(header, ">i4", count=1, offset=4)[0])


def split_files(folder: str, split: str) -> tuple[str, str]:
  """(images, labels) paths of a split; raises DatasetNotFoundError when one is missing."""
  if split not in FASHION_MNIST_FILES:
    raise DataError(f"Fashion-MNIST has no split {split!r}; it has: "
                    f"{', '.join(FASHION_MNIST_FILES)}.")
  paths = tuple(os.path.join(folder, f) for f in FASHION_MNIST_FILES[split])
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    how = ("install them with `sudo apt-get update && sudo apt-get install "
           "dataset-fashion-mnist`" if folder == FASHION_MNIST_DEBIAN_DIR else
           f"copy the four idx .gz files of {FASHION_MNIST_DEBIAN_DIR} there")
    raise DatasetNotFoundError(f"Fashion-MNIST's idx files are not in {folder} (missing "
                               f"{', '.join(os.path.basename(p) for p in missing)}); {how}.")
  return paths


@functools.cache
def read_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, 28, 28], int64 labels [N]) of a split, in the files' order.

  Cached: the trainer, the monitors and the probes open the same split several times,
  and decompressing the training images takes about half a second.
  """
  images_path, labels_path = split_files(folder, split)
  images, labels = read_idx(images_path), read_idx(labels_path).astype(np.int64)
  if len(images) != len(labels):
    raise DataError(f"{images_path} holds {len(images)} images but {labels_path} "
                    f"{len(labels)} labels.")
  return images, labels


def _builder_class():
  """The stock `fashion_mnist` tfds builder, reading the idx files from `source_dir`.

  Defined on first use, because subclassing it imports tensorflow_datasets.
  """
  import tensorflow_datasets as tfds  # noqa: PLC0415
  from tensorflow_datasets.image_classification import mnist  # noqa: PLC0415

  class FashionMnistFromFiles(mnist.FashionMNIST, skip_registration=True):
    name = "fashion_mnist"

    def __init__(self, *, source_dir: str, **kwargs):
      self._source_dir = source_dir
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download.
      return [tfds.core.SplitGenerator(name=split, gen_kwargs=dict(split=split))
              for split in FASHION_MNIST_FILES]

    def _generate_examples(self, split):
      images, labels = read_split(self._source_dir, split)
      for index, (image, label) in enumerate(zip(images, labels)):
        yield index, {"image": image[..., None], "label": int(label)}

  return FashionMnistFromFiles


def prepare(data_dir: str, source_dir: str = FASHION_MNIST_DEBIAN_DIR) -> None:
  """Writes fashion_mnist into `data_dir` as array_record (random access for the pipeline)."""
  builder = _builder_class()(data_dir=data_dir, source_dir=source_dir,
                             file_format="array_record")
  builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"))
