"""The batch stream is a pure function of (seed, step), sharded across processes."""
import ml_collections
import numpy as np
import pytest

from care_jax.data import input_pipeline, synthetic

PER_CLASS = 10  # Two classes: 20 training images, 5 batches of 4 per epoch.


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  synthetic.write_image_folder(str(root), splits={"train": PER_CLASS, "val": 3})
  return ml_collections.ConfigDict(dict(
      name="image_folder", data_dir=None, folder_root=str(root), image_size=16,
      train_split="train", eval_split="val", crop_min_scale=0.08, num_workers=2))


def take(iterator, n):
  batches = [next(iterator) for _ in range(n)]
  iterator.close()
  return batches


def pretrain(config, **kwargs):
  kwargs = {"global_batch_size": 4, "seed": 0, **kwargs}
  return input_pipeline.pretrain_batches(config, **kwargs)


def assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_layout(config):
  batch = take(pretrain(config), 1)[0]
  assert batch["view1"].shape == batch["view2"].shape == (4, 16, 16, 3)
  assert batch["view1"].dtype == np.uint8
  assert batch["index"].dtype == np.int64 and batch["num_skipped"] == 0
  assert not np.array_equal(batch["view1"], batch["view2"])  # Two different crops.


def test_same_seed_same_batches_other_seed_others(config):
  first, second = take(pretrain(config), 3), take(pretrain(config), 3)
  for a, b in zip(first, second):
    assert_same(a, b)
  other = take(pretrain(config, seed=1), 1)[0]
  assert not np.array_equal(other["index"], first[0]["index"])


def test_resume_at_step_k_sees_the_uninterrupted_batches(config):
  uninterrupted = take(pretrain(config), 8)  # Crosses the epoch boundary at step 5.
  resumed = take(pretrain(config, start_step=3), 5)
  for a, b in zip(uninterrupted[3:], resumed):
    assert_same(a, b)


def test_an_epoch_visits_every_example_once_then_reshuffles(config):
  batches = take(pretrain(config), 10)
  epoch0 = np.concatenate([b["index"] for b in batches[:5]])
  epoch1 = np.concatenate([b["index"] for b in batches[5:]])
  assert sorted(epoch0) == sorted(epoch1) == list(range(2 * PER_CLASS))
  assert not np.array_equal(epoch0, epoch1)


def test_two_processes_read_disjoint_halves_of_the_same_global_batch(config):
  whole = take(pretrain(config), 2)
  halves = [take(pretrain(config, process_index=p, process_count=2), 2) for p in (0, 1)]
  for step in range(2):
    first, second = halves[0][step], halves[1][step]
    assert first["view1"].shape[0] == second["view1"].shape[0] == 2
    assert not set(first["index"]) & set(second["index"])
    for key in ("view1", "view2", "index"):
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[step][key])


def test_global_batch_must_divide_among_processes(config):
  with pytest.raises(ValueError, match="divisible"):
    pretrain(config, global_batch_size=5, process_count=2)


def test_eval_split_is_one_padded_pass_in_order(config):
  batches = list(input_pipeline.centre_view_batches(config, config.eval_split,
                                                    global_batch_size=4))
  assert len(batches) == 2  # 6 validation images.
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.tolist() == [True] * 6 + [False] * 2
  indices = np.concatenate([b["index"] for b in batches])[mask]
  assert indices.tolist() == list(range(6))
  labels = np.concatenate([b["label"] for b in batches])[mask]
  assert labels.tolist() == [0, 0, 0, 1, 1, 1]  # Sorted class folders: cat, dog.
  assert batches[1]["image"].shape == (4, 16, 16, 3) and not batches[1]["image"][2:].any()


def test_eval_split_view_is_deterministic(config):
  def images():
    return np.concatenate([b["image"] for b in input_pipeline.centre_view_batches(
        config, config.eval_split, global_batch_size=2)])
  np.testing.assert_array_equal(images(), images())


def test_linear_eval_train_split_is_random_crops_with_labels(config):
  batches = take(input_pipeline.labelled_batches(config, global_batch_size=4, seed=3), 5)
  assert all(b["mask"].all() and b["image"].shape == (4, 16, 16, 3) for b in batches)
  indices = np.concatenate([b["index"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert sorted(indices) == list(range(2 * PER_CLASS))
  np.testing.assert_array_equal(labels, indices // PER_CLASS)
