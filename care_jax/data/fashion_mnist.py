"""Fashion-MNIST prepared into a tfds dataset from Debian's files, without internet.

The Debian package `dataset-fashion-mnist` installs the four original idx .gz files in
/usr/share/datasets/fashion-mnist/. The stock tfds builder would download those same files;
here it reads the local copies instead and keeps the stock name, version and features, so
the prepared dataset is the stock one and either builder can read what the other wrote.
"""
import gzip
import os

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist

from care_jax.data.sources import FASHION_MNIST_DEBIAN_DIR, FASHION_MNIST_FILES


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped idx file (the MNIST format: magic, dims as big-endian int32, uint8 data)."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = np.frombuffer(data, ">i4", count=ndim, offset=4)
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMnistFromFiles(mnist.FashionMNIST, skip_registration=True):
  """The stock `fashion_mnist` builder, reading the idx files from `source_dir`."""

  name = "fashion_mnist"

  def __init__(self, *, source_dir: str = FASHION_MNIST_DEBIAN_DIR, **kwargs):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return [tfds.core.SplitGenerator(name=split, gen_kwargs=dict(files=files))
            for split, files in FASHION_MNIST_FILES.items()]

  def _generate_examples(self, files):
    images, labels = (read_idx(os.path.join(self._source_dir, f)) for f in files)
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": image[..., None], "label": int(label)}


def prepare(data_dir: str, source_dir: str = FASHION_MNIST_DEBIAN_DIR) -> None:
  """Writes fashion_mnist into `data_dir` as array_record (random access for the pipeline)."""
  builder = FashionMnistFromFiles(data_dir=data_dir, source_dir=source_dir,
                                  file_format="array_record")
  builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"))
