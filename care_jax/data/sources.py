"""Where datasets live, how big they are, and random access to their encoded examples.

Three kinds of source, all read by example index so that a batch is a pure function of
(seed, step) and each process reads only its own examples:
  - tfds datasets prepared as array_record (fashion_mnist, imagenet2012 and its 1pct/10pct
    subsets), read through tfds' data source with image decoding skipped;
  - the user's own images in ROOT/<split>/<class>/<file> (tfds ImageFolder's layout);
  - fashion_mnist_idx: Fashion-MNIST's original idx files read into memory as uint8
    arrays, with no tensorflow or tfds (data_dir: their folder, default Debian's). It is a
    name of its own rather than a fallback of fashion_mnist because tfds stores the
    examples shuffled: the same seed would give other batches on a machine without tfds.

Existence and sizes are read from the prepared dataset's json files, before importing
tensorflow_datasets, so that a missing dataset is reported in well under a second.
"""
import dataclasses
import fcntl
import functools
import json
import logging
import os
from typing import Optional, Protocol

import numpy as np

from care_jax.data.errors import DataError, DatasetNotFoundError

TFDS_DATASETS = ("fashion_mnist", "imagenet2012", "imagenet2012_subset/1pct",
                 "imagenet2012_subset/10pct")
IMAGE_FOLDER = "image_folder"
FASHION_MNIST_IDX = "fashion_mnist_idx"
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_IN_MEMORY_BYTES = 256 * 2**20
_PREPARE = "python -m care_jax.data.prepare"
# Debian's package dataset-fashion-mnist: the four original idx files, by split.
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  location: str  # The prepared dataset's folder (tfds) or the image root.
  num_train_examples: int
  num_eval_examples: int
  num_classes: int


class Source(Protocol):
  """Random access to one split by index: the image, encoded (bytes) or already decoded
  (a uint8 array, [H, W] grey or [H, W, 3] RGB), and its integer label."""

  def __len__(self) -> int: ...

  def read(self, index: int) -> tuple[bytes | np.ndarray, int]: ...

  def describe(self, index: int) -> str:
    """Names the example in log messages (file name or dataset/split[index])."""

  def labels(self) -> np.ndarray:
    """Every example's label (int64, by index), without decoding any image."""


def resolve_data_dir(data_dir: Optional[str]) -> str:
  """config.data.data_dir, else $TFDS_DATA_DIR, else tfds' default ~/tensorflow_datasets."""
  return os.path.expanduser(
      data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _version_key(version: str) -> tuple[int, ...]:
  return tuple(int(p) for p in version.split("."))


def find_version_dir(data_dir: str, name: str) -> Optional[str]:
  """The newest prepared version folder, data_dir/name[/config]/X.Y.Z, or None."""
  base = os.path.join(data_dir, name)
  if not os.path.isdir(base):
    return None
  versions = [v for v in os.listdir(base)
              if all(p.isdigit() for p in v.split("."))
              and os.path.isfile(os.path.join(base, v, "dataset_info.json"))]
  if not versions:
    return None
  return os.path.join(base, max(versions, key=_version_key))


def _prepare_command(name: str, data_dir: str) -> str:
  if name == "fashion_mnist":
    return ("install Debian's files with `sudo apt-get update && sudo apt-get install "
            "dataset-fashion-mnist`; care_jax then prepares it on first use")
  return (f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a folder DIR and run "
          f"`{_PREPARE} {name} --manual_dir=DIR --data_dir={data_dir}`")


def _is_array_record(version_dir: str) -> bool:
  return any(".array_record-" in f for f in os.listdir(version_dir))


@functools.cache
def _prepare_fashion_mnist(data_dir: str) -> None:
  """Prepares Fashion-MNIST once, under a file lock so that parallel processes wait."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".fashion_mnist.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if find_version_dir(data_dir, "fashion_mnist") is None:
      from care_jax.data import fashion_mnist  # Imports tensorflow_datasets: only here.
      logging.info("Preparing fashion_mnist from %s into %s (about a minute, once).",
                   FASHION_MNIST_DEBIAN_DIR, data_dir)
      fashion_mnist.prepare(data_dir)


def tfds_version_dir(name: str, data_dir: Optional[str]) -> str:
  """Finds a prepared tfds dataset (preparing Fashion-MNIST on first use) or says how to."""
  data_dir = resolve_data_dir(data_dir)
  if name == "fashion_mnist" and find_version_dir(data_dir, name) is None:
    if all(os.path.isfile(os.path.join(FASHION_MNIST_DEBIAN_DIR, f))
           for files in FASHION_MNIST_FILES.values() for f in files):
      _prepare_fashion_mnist(data_dir)
  version_dir = find_version_dir(data_dir, name)
  if version_dir is None:
    raise DatasetNotFoundError(
        f"Dataset {name!r} is not prepared in {data_dir} (looked for "
        f"{os.path.join(data_dir, name)}/<version>/dataset_info.json). To prepare it, "
        f"{_prepare_command(name, data_dir)}. See docs/data.md.")
  if not _is_array_record(version_dir):
    raise DatasetNotFoundError(
        f"Dataset {name!r} in {version_dir} is prepared as tfrecord, which has no random "
        f"access; convert it (in place, about as much disk again) with `{_PREPARE} {name} "
        f"--data_dir={data_dir} --convert`. See docs/data.md.")
  return version_dir


def _tfds_split_sizes(version_dir: str) -> dict[str, int]:
  with open(os.path.join(version_dir, "dataset_info.json")) as f:
    splits = json.load(f)["splits"]
  return {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in splits}


def _tfds_num_classes(version_dir: str) -> int:
  with open(os.path.join(version_dir, "features.json")) as f:
    features = json.load(f)["featuresDict"]["features"]
  return int(features["label"]["classLabel"]["numClasses"])


def _check_split(name: str, split: str, available) -> None:
  if split not in available:
    raise DataError(f"Dataset {name!r} has no split {split!r}; it has: "
                    f"{', '.join(sorted(available))}.")


@functools.cache
def _folder_classes(root: str, split: str) -> tuple[str, ...]:
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise DatasetNotFoundError(
        f"Image folder split {split!r} not found: {split_dir} does not exist. Put the images "
        f"as {root}/<split>/<class>/<image>.jpg and set config.data.folder_root={root}. "
        f"See docs/data.md.")
  classes = tuple(sorted(e.name for e in os.scandir(split_dir) if e.is_dir()))
  if not classes:
    raise DatasetNotFoundError(f"Image folder {split_dir} has no class folders "
                               f"({split_dir}/<class>/<image>.jpg). See docs/data.md.")
  return classes


@functools.cache
def _folder_files(root: str, split: str, label_split: str) -> tuple[tuple[str, int], ...]:
  """(path, label) of every image of a split, in a fixed order (sorted class, file).

  Labels number the class folders of `label_split` (the training split), so that a class
  has the same label in every split.
  """
  classes = _folder_classes(root, label_split)
  files = []
  for cls in _folder_classes(root, split):
    if cls not in classes:
      raise DataError(f"Class folder {cls!r} of split {split!r} in {root} is not a class of "
                      f"the training split {label_split!r}; labels come from its folders.")
    class_dir = os.path.join(root, split, cls)
    names = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(_IMAGE_EXTENSIONS))
    files.extend((os.path.join(class_dir, f), classes.index(cls)) for f in names)
  if not files:
    raise DatasetNotFoundError(f"No .jpg/.jpeg/.png images under {os.path.join(root, split)}.")
  return tuple(files)


def _folder_root(config) -> str:
  if not config.folder_root:
    raise DatasetNotFoundError(
        "Dataset 'image_folder' needs config.data.folder_root, a folder laid out as "
        "ROOT/<split>/<class>/<image>.jpg. See docs/data.md.")
  return os.path.expanduser(config.folder_root)


def _check_name(name: str) -> None:
  names = TFDS_DATASETS + (IMAGE_FOLDER, FASHION_MNIST_IDX)
  if name not in names:
    raise DataError(f"Unknown dataset {name!r}; choose one of: {', '.join(names)}.")


def _idx_folder(config) -> str:
  return os.path.expanduser(config.data_dir or FASHION_MNIST_DEBIAN_DIR)


def dataset_info(config) -> DatasetInfo:
  """Sizes and classes of config.data's dataset, without reading any example."""
  _check_name(config.name)
  if config.name == IMAGE_FOLDER:
    root = _folder_root(config)
    return DatasetInfo(config.name, root,
                       len(_folder_files(root, config.train_split, config.train_split)),
                       len(_folder_files(root, config.eval_split, config.train_split)),
                       len(_folder_classes(root, config.train_split)))
  if config.name == FASHION_MNIST_IDX:
    from care_jax.data import fashion_mnist  # noqa: PLC0415  (it imports this module)
    folder = _idx_folder(config)
    num_train, num_eval = (
        fashion_mnist.read_idx_length(fashion_mnist.split_files(folder, split)[1])
        for split in (config.train_split, config.eval_split))
    return DatasetInfo(config.name, folder, num_train, num_eval, fashion_mnist.NUM_CLASSES)
  version_dir = tfds_version_dir(config.name, config.data_dir)
  sizes = _tfds_split_sizes(version_dir)
  for split in (config.train_split, config.eval_split):
    _check_split(config.name, split, sizes)
  return DatasetInfo(config.name, version_dir, sizes[config.train_split],
                     sizes[config.eval_split], _tfds_num_classes(version_dir))


class TfdsSource:
  """A split of a prepared tfds dataset, images left encoded (we decode them ourselves).

  A split of at most _IN_MEMORY_BYTES on disk (Fashion-MNIST's) is read whole, once: a
  random read through tfds costs about ten times a bulk read per record, which makes the
  difference between a CPU demo waiting for its data or not.
  """

  def __init__(self, version_dir: str, split: str):
    import tensorflow_datasets as tfds  # Heavy: only once a dataset is really read.
    builder = tfds.builder_from_directory(version_dir)
    self._name = f"{builder.name}/{split}"
    self._records = builder.as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()})
    shards = [os.path.join(version_dir, f) for f in os.listdir(version_dir)
              if f.startswith(f"{builder.name}-{split}.array_record-")]
    if sum(os.path.getsize(f) for f in shards) <= _IN_MEMORY_BYTES:
      self._records = self._records.__getitems__(range(len(self._records)))

  def __len__(self) -> int:
    return len(self._records)

  def read(self, index: int) -> tuple[bytes, int]:
    record = self._records[index]
    return record["image"], int(record["label"])

  def labels(self) -> np.ndarray:
    return np.asarray([int(record["label"]) for record in self._records], np.int64)

  def describe(self, index: int) -> str:
    record = self._records[index]
    file_name = record.get("file_name")  # imagenet2012 keeps the original file name.
    name = f"{self._name}[{index}]"
    return f"{name} ({file_name.decode()})" if isinstance(file_name, bytes) else name


class FolderSource:
  """Image files read by index: a split of ROOT/<split>/<class>/<file> or any file list."""

  def __init__(self, files: tuple[tuple[str, int], ...]):
    self._files = files  # (path, label)

  def __len__(self) -> int:
    return len(self._files)

  def read(self, index: int) -> tuple[bytes, int]:
    path, label = self._files[index]
    with open(path, "rb") as f:
      return f.read(), label

  def describe(self, index: int) -> str:
    return self._files[index][0]

  def labels(self) -> np.ndarray:
    return np.asarray([label for _, label in self._files], np.int64)


class ArraySource:
  """A split already decoded in memory: uint8 images [N, H, W] (grey) or [N, H, W, 3]
  (RGB) and their labels. The views are cut from the arrays, with no encode/decode."""

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise DataError(f"{name}: {len(images)} images but {len(labels)} labels.")
    self._name, self._images, self._labels = name, images, np.asarray(labels, np.int64)

  def __len__(self) -> int:
    return len(self._images)

  def read(self, index: int) -> tuple[np.ndarray, int]:
    return self._images[index], int(self._labels[index])

  @property
  def images(self) -> np.ndarray:
    """All images, for batch-at-a-time cropping (array_pipeline)."""
    return self._images

  def describe(self, index: int) -> str:
    return f"{self._name}[{index}]"

  def labels(self) -> np.ndarray:
    return self._labels


def open_source(config, split: str) -> Source:
  """Random access to `split` of config.data's dataset; raises DatasetNotFoundError."""
  _check_name(config.name)
  if config.name == IMAGE_FOLDER:
    return FolderSource(_folder_files(_folder_root(config), split, config.train_split))
  if config.name == FASHION_MNIST_IDX:
    from care_jax.data import fashion_mnist  # noqa: PLC0415  (it imports this module)
    return ArraySource(f"{config.name}/{split}",
                       *fashion_mnist.read_split(_idx_folder(config), split))
  version_dir = tfds_version_dir(config.name, config.data_dir)
  _check_split(config.name, split, _tfds_split_sizes(version_dir))
  return TfdsSource(version_dir, split)


class SubsetSource:
  """The examples of `source` at `indices`, renumbered 0..len(indices)-1."""

  def __init__(self, source: Source, indices):
    self._source, self._indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def read(self, index: int) -> tuple[bytes, int]:
    return self._source.read(int(self._indices[index]))

  def describe(self, index: int) -> str:
    return self._source.describe(int(self._indices[index]))

  def labels(self) -> np.ndarray:
    return self._source.labels()[self._indices]


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """A class-balanced sample: round(fraction x n_c) examples of each class c (at least
  one), drawn with `seed`, as sorted indices. The same (labels, fraction, seed) always
  gives the same sample."""
  if not 0 < fraction <= 1:
    raise DataError(f"The labelled fraction must be in (0, 1], got {fraction}.")
  rng = np.random.default_rng([seed, 3])
  chosen = []
  for cls in np.unique(labels):
    members = np.flatnonzero(labels == cls)
    count = max(1, round(fraction * len(members)))
    chosen.append(rng.choice(members, count, replace=False))
  return np.sort(np.concatenate(chosen))
