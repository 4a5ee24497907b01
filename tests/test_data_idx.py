"""fashion_mnist_idx: Fashion-MNIST's idx files read as arrays, without tensorflow or tfds,
through the same input pipeline (crops from arrays, batch at a time)."""
import os

import cv2
import ml_collections
import numpy as np
import pytest

from care_jax.data import fashion_mnist, input_pipeline, sources, views
from care_jax.data.errors import DataError, DatasetNotFoundError
from tests.idx_files import write_flat_fashion_mnist

DEBIAN_DIR = sources.FASHION_MNIST_DEBIAN_DIR
NUM_TRAIN, NUM_TEST = 24, 6


def data_config(**fields):
  c = dict(name="fashion_mnist_idx", data_dir=None, folder_root=None, image_size=28,
           train_split="train", eval_split="test", crop_min_scale=0.25, num_workers=2)
  return ml_collections.ConfigDict({**c, **fields})


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("idx")
  write_flat_fashion_mnist(folder, NUM_TRAIN, NUM_TEST)
  return str(folder)


def take(iterator, n):
  batches = [next(iterator) for _ in range(n)]
  iterator.close()
  return batches


def test_debian_files_read_as_arrays_without_tfds():
  config = data_config()
  info = input_pipeline.dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (60000, 10000, 10)
  images = fashion_mnist.read_idx(os.path.join(DEBIAN_DIR, "t10k-images-idx3-ubyte.gz"))
  labels = fashion_mnist.read_idx(os.path.join(DEBIAN_DIR, "t10k-labels-idx1-ubyte.gz"))
  source = sources.open_source(config, "test")
  assert len(source) == 10000 and images.shape == (10000, 28, 28)
  for index in (0, 1234, 9999):  # The files' order, unshuffled.
    image, label = source.read(index)
    np.testing.assert_array_equal(image, images[index])
    assert label == labels[index]
  np.testing.assert_array_equal(source.labels(), labels)
  assert np.bincount(source.labels()).tolist() == [1000] * 10


def test_an_array_gives_the_views_of_its_png_bytes():
  image = fashion_mnist.read_split(DEBIAN_DIR, "test")[0][7]
  png = cv2.imencode(".png", image)[1].tobytes()  # What the tfds dataset stores.
  assert views.image_size(image) == views.image_size(png) == (28, 28)
  boxes = [views.Box(0, 0, 28, 28), views.Box(3, 5, 17, 12), views.Box(10, 0, 9, 28)]
  flips = [False, True, True]
  for from_array, from_png in zip(views.crop_views(image, boxes, flips, 32, (28, 28)),
                                  views.crop_views(png, boxes, flips, 32, (28, 28))):
    np.testing.assert_array_equal(from_array, from_png)
  batch = np.stack([image] * 3)
  boxes_array = np.asarray([[b.top, b.left, b.height, b.width] for b in boxes])
  np.testing.assert_array_equal(views.crop_array_views(batch, boxes_array, flips, 32),
                                np.stack(views.crop_views(png, boxes, flips, 32, (28, 28))))


def test_batch_windows_follow_the_one_at_a_time_law():
  rng = np.random.default_rng(0)
  boxes = views.random_resized_crop_boxes(rng, 20000, 28, 36, 0.25)
  top, left, height, width = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + height <= 28).all() and (left + width <= 36).all()
  one_at_a_time = [views.random_resized_crop_box(rng, 28, 36, 0.25) for _ in range(20000)]
  reference = np.asarray([[b.top, b.left, b.height, b.width] for b in one_at_a_time])
  # Same law: means and spreads of each coordinate agree within sampling noise.
  np.testing.assert_allclose(boxes.mean(0), reference.mean(0), rtol=0.03)
  np.testing.assert_allclose(boxes.std(0), reference.std(0), rtol=0.05)
  # No try can fit a 1x50 strip at >= half its area: the centred fallback, as one by one.
  fallback = views.random_resized_crop_box(rng, 1, 50, 0.5)
  strips = views.random_resized_crop_boxes(rng, 10, 1, 50, 0.5)
  assert (strips == [fallback.top, fallback.left, fallback.height, fallback.width]).all()


def test_batches_are_views_of_their_examples_and_a_function_of_seed_and_step(idx_dir):
  config = data_config(data_dir=idx_dir)
  run = lambda **kw: input_pipeline.pretrain_batches(
      config, **{"global_batch_size": 8, "seed": 0, **kw})
  whole = take(run(), 6)  # 3 batches per epoch: crosses two epoch boundaries.
  for batch in whole:
    ids = batch["index"]
    for view in (batch["view1"], batch["view2"]):  # Flat images: crops keep the grey.
      np.testing.assert_array_equal(view, np.broadcast_to(8 * ids[:, None, None, None],
                                                          view.shape))
    np.testing.assert_array_equal(batch["label"], ids % 10)
    assert batch["num_skipped"] == 0
  epoch = np.concatenate([b["index"] for b in whole[:3]])
  assert sorted(epoch) == list(range(NUM_TRAIN))
  # Other processes, other worker counts, a resume: the same global batches.
  halves = [take(run(process_index=p, process_count=2, start_step=2), 4) for p in (0, 1)]
  for step, (first, second) in enumerate(zip(*halves), start=2):
    for key in ("view1", "view2", "index", "label"):
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]),
                                    whole[step][key])
  config.num_workers = 3
  for a, b in zip(take(run(), 2), whole):
    np.testing.assert_array_equal(a["view1"], b["view1"])


def test_crops_vary_with_the_step_and_the_seed():
  config = data_config(num_workers=1)
  batches = take(input_pipeline.pretrain_batches(config, global_batch_size=64, seed=0), 2)
  other = take(input_pipeline.pretrain_batches(config, global_batch_size=64, seed=1), 1)[0]
  assert not np.array_equal(batches[0]["view1"], batches[0]["view2"])
  assert not np.array_equal(batches[0]["index"], other["index"])
  assert not np.array_equal(batches[0]["view1"], batches[1]["view1"])


def test_eval_split_is_the_test_file_in_order(idx_dir):
  config = data_config(data_dir=idx_dir)
  batches = list(input_pipeline.centre_view_batches(config, config.eval_split,
                                                    global_batch_size=4))
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.tolist() == [True] * NUM_TEST + [False] * 2
  images = np.concatenate([b["image"] for b in batches])[mask]
  ids = np.arange(NUM_TRAIN, NUM_TRAIN + NUM_TEST)
  np.testing.assert_array_equal(images[:, 0, 0, 0], 8 * ids)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask], ids % 10)


def test_missing_files_and_splits_say_what_to_do(tmp_path, idx_dir):
  with pytest.raises(DatasetNotFoundError, match=f"not in {tmp_path}.*copy the four idx"):
    input_pipeline.dataset_info(data_config(data_dir=str(tmp_path)))
  with pytest.raises(DataError, match="no split 'validation'"):
    sources.open_source(data_config(data_dir=idx_dir), "validation")
