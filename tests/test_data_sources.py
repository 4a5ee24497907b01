"""Datasets through tfds (Fashion-MNIST from Debian's files, ImageNet from fake ILSVRC tars),
image folders, and the one-line error for a dataset that is not there."""
import io
import os
import tarfile
import time

import ml_collections
import numpy as np
import PIL.Image
import pytest

from care_jax.data import input_pipeline, sources, synthetic, views
from care_jax.data.errors import DataError, DatasetNotFoundError

FMNIST_DIR = sources.FASHION_MNIST_DEBIAN_DIR


def data_config(**fields):
  c = dict(name="fashion_mnist", data_dir=None, folder_root=None, image_size=28,
           train_split="train", eval_split="test", crop_min_scale=0.08, num_workers=2)
  return ml_collections.ConfigDict({**c, **fields})


@pytest.fixture(scope="module")
def fmnist(fmnist_data_dir):
  """The test run's data_dir, which its first user prepared from Debian's files (~30 s)."""
  return data_config(data_dir=fmnist_data_dir)


def test_fashion_mnist_is_prepared_from_debian_files_and_read(fmnist):
  info = input_pipeline.dataset_info(fmnist)
  assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (60000, 10000, 10)
  assert os.path.isdir(os.path.join(fmnist.data_dir, "fashion_mnist", "3.0.1"))
  batch = next(input_pipeline.pretrain_batches(fmnist, global_batch_size=8, seed=0))
  assert batch["view1"].shape == (8, 28, 28, 3)
  assert (batch["view1"][..., 0] == batch["view1"][..., 2]).all()  # Grey as 3 channels.


def test_fashion_mnist_pixels_and_labels_are_debian_files(fmnist, monkeypatch):
  from care_jax.data.fashion_mnist import read_idx
  images = read_idx(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz"))
  labels = read_idx(os.path.join(FMNIST_DIR, "t10k-labels-idx1-ubyte.gz"))
  label_of = {image.tobytes(): label for image, label in zip(images, labels)}
  source = sources.open_source(fmnist, "test")  # tfds stores the examples shuffled.
  for index in (0, 1234, 9999):
    encoded, label = source.read(index)
    whole = views.Box(0, 0, 28, 28)
    decoded, = views.crop_views(encoded, [whole], [False], 28, views.image_size(encoded))
    assert label_of[decoded[..., 0].tobytes()] == label
  # A large split is read record by record, a small one whole: the same examples.
  monkeypatch.setattr(sources, "_IN_MEMORY_BYTES", 0)
  by_record = sources.open_source(fmnist, "test")
  for index in (0, 1234, 9999):
    assert by_record.read(index) == source.read(index)
  # One validation pass sees every test example once: same label counts as the file.
  batches = list(input_pipeline.centre_view_batches(fmnist, fmnist.eval_split,
                                                    global_batch_size=2048))
  seen = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(np.bincount(seen), np.bincount(labels))


def test_fashion_mnist_without_debian_files_says_apt_get(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "nowhere"))
  with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
    input_pipeline.dataset_info(data_config(data_dir=str(tmp_path)))


def test_missing_imagenet_fails_fast_with_the_prepare_command(tmp_path):
  start = time.perf_counter()
  with pytest.raises(DataError) as error:
    input_pipeline.pretrain_batches(data_config(name="imagenet2012", data_dir=str(tmp_path)),
                                    global_batch_size=8, seed=0)
  assert time.perf_counter() - start < 2
  message = str(error.value)
  assert isinstance(error.value, DatasetNotFoundError) and "\n" not in message
  assert "'imagenet2012'" in message and str(tmp_path) in message
  assert f"python -m care_jax.data.prepare imagenet2012 --manual_dir=DIR --data_dir={tmp_path}" \
      in message


def test_dataset_prepared_as_tfrecord_says_convert(tmp_path):
  version_dir = tmp_path / "imagenet2012" / "5.1.0"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text("{}")
  (version_dir / "imagenet2012-train.tfrecord-00000-of-01024").write_bytes(b"")
  with pytest.raises(DatasetNotFoundError, match="--convert"):
    input_pipeline.dataset_info(data_config(name="imagenet2012", data_dir=str(tmp_path)))


def test_missing_image_folder_names_the_path(tmp_path):
  config = data_config(name="image_folder", folder_root=str(tmp_path), train_split="train")
  with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "train")):
    input_pipeline.dataset_info(config)


def test_image_folder_info_and_labels(tmp_path):
  synthetic.write_image_folder(str(tmp_path), splits={"train": 3, "val": 2},
                               classes=("b", "a", "c"))
  config = data_config(name="image_folder", folder_root=str(tmp_path), eval_split="val",
                       image_size=24)
  info = input_pipeline.dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (9, 6, 3)
  batch = next(input_pipeline.centre_view_batches(config, config.eval_split, global_batch_size=6))
  assert batch["label"].tolist() == [0, 0, 1, 1, 2, 2]  # Sorted: a, b, c.
  assert batch["image"].shape == (6, 24, 24, 3)


def test_image_folder_takes_labels_from_train_split_whatever_its_name(tmp_path):
  # No ROOT/train at all; the labelled split is "labelled", with classes a, b, c; the
  # held-out split has only b and c, which must keep labels 1 and 2.
  synthetic.write_image_folder(str(tmp_path), splits={"labelled": 2}, classes=("b", "a", "c"))
  synthetic.write_image_folder(str(tmp_path), splits={"holdout": 1}, classes=("c", "b"))
  config = data_config(name="image_folder", folder_root=str(tmp_path),
                       train_split="labelled", eval_split="holdout", image_size=16)
  info = input_pipeline.dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (6, 2, 3)
  assert sources.open_source(config, "holdout").labels().tolist() == [1, 2]
  assert sources.open_source(config, "labelled").labels().tolist() == [0, 0, 1, 1, 2, 2]
  batch = next(input_pipeline.centre_view_batches(config, config.eval_split, global_batch_size=2))
  assert batch["label"].tolist() == [1, 2]
  (tmp_path / "holdout" / "d").mkdir()
  sources._folder_files.cache_clear()
  sources._folder_classes.cache_clear()
  with pytest.raises(DataError, match="'d' of split 'holdout' .* not a class of the "
                                      "training split 'labelled'"):
    sources.open_source(config, "holdout")


def test_stratified_subset_is_class_balanced_and_fixed_by_its_seed():
  labels = np.repeat(np.arange(4), [100, 200, 300, 400])
  subset = sources.stratified_indices(labels, 0.1, seed=0)
  assert np.bincount(labels[subset]).tolist() == [10, 20, 30, 40]
  assert np.all(np.diff(subset) > 0)
  np.testing.assert_array_equal(subset, sources.stratified_indices(labels, 0.1, seed=0))
  assert not np.array_equal(subset, sources.stratified_indices(labels, 0.1, seed=1))
  assert np.bincount(labels[sources.stratified_indices(labels, 0.001, 0)]).tolist() == [1] * 4
  with pytest.raises(DataError, match=r"fraction must be in \(0, 1\]"):
    sources.stratified_indices(labels, 0.0, seed=0)


# ImageNet through tfds' real imagenet2012 builder, fed tars shaped like the real ones.
SYNSETS = ("n01440764", "n01443537")  # The first two classes of labels.txt.


def _jpeg(rng, height=60, width=80) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(synthetic.natural_image(rng, height, width)).save(buffer, "JPEG")
  return buffer.getvalue()


def _add(tar, name, data):
  member = tarfile.TarInfo(name)
  member.size = len(data)
  tar.addfile(member, io.BytesIO(data))


def write_fake_ilsvrc(manual_dir, per_class=3, num_val=4):
  """ILSVRC2012_img_train.tar (one inner tar per synset) and ILSVRC2012_img_val.tar."""
  rng = np.random.default_rng(0)
  with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train:
    for synset in SYNSETS:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as images:
        for i in range(per_class):
          _add(images, f"{synset}_{i + 10}.JPEG", _jpeg(rng))
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val:
    for i in range(num_val):
      _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(rng, 50, 70))


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  manual_dir = tmp_path_factory.mktemp("manual")
  write_fake_ilsvrc(manual_dir)
  return manual_dir


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory, manual_dir):
  from care_jax.data import prepare
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  prepare.prepare("imagenet2012", data_dir, str(manual_dir))
  return data_config(name="imagenet2012", data_dir=data_dir, image_size=32,
                     eval_split="validation")


def test_imagenet2012_through_the_tfds_builder(imagenet):
  info = input_pipeline.dataset_info(imagenet)
  assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (6, 4, 1000)
  batch = next(input_pipeline.labelled_batches(imagenet, seed=0, global_batch_size=6))
  assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 1]
  batch = next(input_pipeline.pretrain_batches(imagenet, global_batch_size=4, seed=0))
  assert batch["view1"].shape == (4, 32, 32, 3) and batch["num_skipped"] == 0
  batch = next(input_pipeline.centre_view_batches(imagenet, imagenet.eval_split,
                                                  global_batch_size=4))
  assert batch["mask"].all() and batch["image"].shape == (4, 32, 32, 3)


def test_imagenet_1pct_subset_from_a_local_file_list(tmp_path, manual_dir, monkeypatch):
  """SimCLR's 1percent.txt beside the tars: no internet needed.

  Our short list cannot have the real file's checksum, so only its validation is skipped.
  """
  from tensorflow_datasets.core.download import download_manager

  from care_jax.data import prepare
  monkeypatch.setattr(download_manager.DownloadManager, "_register_or_validate_checksums",
                      lambda self, url, url_info, path: None)
  (manual_dir / "1percent.txt").write_text("n01440764_10.JPEG\nn01443537_12.JPEG\n")
  prepare.prepare("imagenet2012_subset/1pct", str(tmp_path), str(manual_dir))
  config = data_config(name="imagenet2012_subset/1pct", data_dir=str(tmp_path),
                       eval_split="validation")
  info = input_pipeline.dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples) == (2, 4)
  batch = next(input_pipeline.labelled_batches(config, seed=0, global_batch_size=2))
  assert sorted(batch["label"].tolist()) == [0, 1]


def test_image_size_reads_png_and_jpeg_headers():
  import cv2
  image = np.zeros((17, 30, 3), np.uint8)
  for ext in (".png", ".jpg"):
    encoded = cv2.imencode(ext, image)[1].tobytes()
    assert views.image_size(encoded) == (17, 30)
    with pytest.raises(views.UndecodableImageError):
      views.image_size(encoded[:20])  # cut inside the header
