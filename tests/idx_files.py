"""Small files in the idx format of Fashion-MNIST's originals, for tests."""
import gzip

import numpy as np

from care_jax.data import sources


def write_idx(path, array: np.ndarray) -> None:
  """Magic (0, 0, 8 = uint8, ndim), the dims as big-endian int32, then the bytes; gzipped."""
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_flat_fashion_mnist(folder, num_train: int, num_test: int) -> None:
  """The four files under Fashion-MNIST's names; example i (train first, then test) is a
  flat grey 28x28 image of value 8 * i, its own id, with label i mod 10."""
  for split, count, offset in (("train", num_train, 0), ("test", num_test, num_train)):
    ids = np.arange(offset, offset + count)
    images_file, labels_file = sources.FASHION_MNIST_FILES[split]
    write_idx(f"{folder}/{images_file}", np.broadcast_to(8 * ids[:, None, None], (count, 28, 28)))
    write_idx(f"{folder}/{labels_file}", ids % 10)
