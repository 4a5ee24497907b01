"""Watching pretraining: the weighted kNN, the online probe, and both written as it trains."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from care_jax.evaluation import knn
from care_jax.training import online_probe, pretraining
from tests.conftest import load_config, quick_compile


def brute_force_knn(queries, bank, bank_labels, k, temperature, num_classes):
  """The weighted kNN written plainly, one query at a time."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  predictions = []
  for q in unit(queries):
    similarity = unit(bank) @ q
    nearest = np.argsort(-similarity, kind="stable")[:k]
    votes = np.zeros(num_classes)
    for i in nearest:
      votes[bank_labels[i]] += np.exp(similarity[i] / temperature)
    predictions.append(np.argmax(votes))
  return np.array(predictions)


@pytest.mark.parametrize("k", [1, 5, 200])
def test_weighted_knn_matches_a_plain_implementation(k):
  rng = np.random.default_rng(k)
  centres = rng.normal(size=(4, 16))
  bank_labels = rng.integers(0, 4, 120)
  bank = centres[bank_labels] + rng.normal(scale=1.5, size=(120, 16))
  query_labels = rng.integers(0, 4, 40)
  queries = centres[query_labels] + rng.normal(scale=1.5, size=(40, 16))
  # Invalid bank rows (padding, undecodable images) must never vote: give them the
  # queries themselves, which would win every vote if they counted.
  bank_mask = np.ones(120 + 40, bool)
  bank_mask[120:] = False
  padded_bank = np.concatenate([bank, queries])
  padded_labels = np.concatenate([bank_labels, (query_labels + 1) % 4])
  votes = knn.weighted_votes(jnp.asarray(queries, jnp.float32),
                             jnp.asarray(padded_bank, jnp.float32),
                             jnp.asarray(padded_labels), jnp.asarray(bank_mask), k=k,
                             temperature=0.07, num_classes=4)
  want = brute_force_knn(queries, bank, bank_labels, min(k, 120), 0.07, 4)
  np.testing.assert_array_equal(np.argmax(votes, -1), want)
  mask = np.arange(40) < 30  # padded queries are not counted
  count = knn.correct_count(jnp.asarray(queries, jnp.float32), jnp.asarray(query_labels),
                            jnp.asarray(mask), jnp.asarray(padded_bank, jnp.float32),
                            jnp.asarray(padded_labels), jnp.asarray(bank_mask), k=k,
                            temperature=0.07, num_classes=4)
  assert int(count) == int(np.sum((want == query_labels)[:30]))
  assert int(count) > 30 // 4 + 5  # the classes are separable enough to beat chance


def test_bank_sample_is_fixed_and_covers_small_splits():
  assert knn.bank_indices(1000, -1, seed=0) is None
  assert knn.bank_indices(1000, 1000, seed=0) is None
  sample = knn.bank_indices(1000, 100, seed=0)
  assert len(np.unique(sample)) == 100 and np.all(np.diff(sample) > 0)
  np.testing.assert_array_equal(sample, knn.bank_indices(1000, 100, seed=0))
  assert not np.array_equal(sample, knn.bank_indices(1000, 100, seed=1))


def test_online_probe_learns_separable_features():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 256)
  feats = jnp.asarray(np.eye(3)[labels] * 3 + rng.normal(size=(256, 3)), jnp.float32)
  probe = online_probe.OnlineProbe(num_classes=3, learning_rate=0.05, total_steps=100)
  state = probe.init(jax.random.key(0), 3)
  update = jax.jit(probe.update)
  first = None
  for _ in range(100):
    state, metrics = update(state, feats, jnp.asarray(labels))
    first = first if first is not None else float(metrics["online_probe_loss"])
  assert float(metrics["online_probe_loss"]) < 0.5 * first
  correct = probe.correct_count(state.params, feats, jnp.asarray(labels), jnp.ones(256, bool))
  assert int(correct) > 0.9 * 256


@pytest.mark.slow  # ~90 s and ~165 s: the step compiled with and without the probe
@pytest.mark.parametrize("optimised,precision", [(False, "float32"), (True, "float16")])
def test_the_online_probe_leaves_the_encoder_update_bitwise_unchanged(optimised, precision):
  """Also compiled with XLA's backend optimisations (which fuse the programs with and
  without the probe each their own way) and under float16's loss scaling."""
  config = load_config("tiny")
  config.precision = precision
  views = np.random.default_rng(1).standard_normal((2, 8, 16, 16, 3), np.float32)
  labels = np.arange(8, dtype=np.int32) % 2
  states, initial_probe = {}, None
  probes = (("off", None), ("on", online_probe.OnlineProbe(2, 1e-2, total_steps=20)))
  for name, probe in probes:
    setup = pretraining.build(config, steps_per_epoch=10, total_steps=20, probe=probe)
    state = setup.init_state(jax.random.key(0))
    initial_probe = jax.device_get(state.probe)
    args = (state, (views[0], views[1]), labels)
    step = (jax.jit(setup.train_step).lower(*args).compile() if optimised
            else quick_compile(setup.train_step, *args))
    # Later steps start from the earlier (probe-trained) states. float16's first steps
    # overflow at the initial loss scale of 2^16 and are skipped: more steps there.
    skipped = []
    for _ in range(2 if precision == "float32" else 8):
      state, metrics = step(state, (views[0], views[1]), labels)
      skipped.append(int(metrics["skipped_step"]))
    states[name] = jax.device_get(state)
  off, on = states["off"], states["on"]
  assert 0 in skipped[:-1]  # a step that counted, and a step after it
  assert off.probe is None and on.probe is not None
  assert "online_probe_loss" in metrics
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), on.probe.params, initial_probe.params)
  assert all(jax.tree.leaves(moved))  # the probe did train
  for part in ("step", "online_params", "online_stats", "target_params", "target_stats",
               "opt_state", "rng", "loss_scale"):
    for a, b in zip(jax.tree.leaves(getattr(off, part)), jax.tree.leaves(getattr(on, part))):
      np.testing.assert_array_equal(a, b, err_msg=part)


@pytest.mark.slow  # ~120 s: a whole run of the trainer
def test_label_free_data_trains_without_probe_and_says_so_once(tmp_path, caplog):
  from care_jax import checkpointing, train
  from care_jax.data import synthetic
  synthetic.write_image_folder(str(tmp_path / "images"), splits={"train": 16, "test": 4},
                               classes=("all",), height=20, width=20)
  config = load_config("tiny")
  config.data.update(name="image_folder", folder_root=str(tmp_path / "images"))
  config.update(num_train_steps=1, checkpoint_every_steps=1)
  config.monitor.every_steps = 1
  with caplog.at_level(logging.INFO):
    metrics = train.pretrain(config, str(tmp_path / "run"))
  notes = [r.getMessage() for r in caplog.records if "has no labels" in r.getMessage()]
  assert notes == ["image_folder has no labels (one class): no online probe and no kNN "
                   "monitor."]
  assert not any(k.startswith(("knn", "online_probe")) for k in metrics)
  assert not (tmp_path / "run" / "checkpoints" / "1" / "online_probe").exists()
  assert (tmp_path / "run" / "checkpoints" / "1" / "state").exists()
  assert checkpointing.load_config(tmp_path / "run").monitor.online_probe


@pytest.mark.slow  # ~180 s: the demo preset's own network
def test_demo_preset_writes_knn_and_probe_accuracy_to_tensorboard(tmp_path, fmnist_data_dir):
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  from care_jax import train
  config = load_config("fmnist_demo")
  config.data.data_dir = fmnist_data_dir
  config.update(num_train_steps=2, global_batch_size=32, log_every_steps=1,
                checkpoint_every_steps=2)
  config.monitor.update(every_steps=1, knn_bank_size=2000)  # after steps 1 and 2
  metrics = train.pretrain(config, str(tmp_path))
  events = event_accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  read = lambda tag: [float(tensor_util.make_ndarray(e.tensor_proto))
                      for e in events.Tensors(tag)]
  for tag in ("knn_top1", "online_probe_top1"):
    values = read(tag)
    assert len(values) == 2, (tag, values)
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values[-1] == pytest.approx(metrics[tag])
  # Features of a (nearly) random network already separate Fashion-MNIST's classes well
  # above chance (0.1) under kNN: labels and features are paired correctly.
  assert read("knn_top1")[-1] > 0.4


@pytest.mark.slow  # ~100 s: a whole run of the trainer
def test_a_failing_monitor_at_the_end_keeps_the_final_checkpoint(tmp_path, image_folder,
                                                                monkeypatch, caplog):
  """The full-count rehearsal's monitor crashed after the last step, which had not been
  saved: the save now comes before any evaluation. The rerun has no step left to take;
  it evaluates and says what it found (it used to return the figures unlogged)."""
  from care_jax import checkpointing, train
  from care_jax.evaluation import monitor

  def crash(self, state):
    raise RuntimeError("the monitor failed")

  monkeypatch.setattr(monitor.Monitor, "evaluate", crash)
  config = load_config("tiny")
  config.data.update(name="image_folder", folder_root=image_folder)
  config.update(num_train_steps=3, checkpoint_every_steps=100)
  config.monitor.every_steps = 3
  with pytest.raises(RuntimeError, match="the monitor failed"):
    train.pretrain(config, str(tmp_path))
  assert checkpointing.manager(str(tmp_path), keep=1, read_only=True).latest_step() == 3
  monkeypatch.undo()
  with caplog.at_level(logging.INFO):
    metrics = train.pretrain(config, str(tmp_path))
  assert 0 <= metrics["knn_top1"] <= 1
  assert any(r.getMessage().startswith("evaluation at step 3: knn_top1 ")
             for r in caplog.records)


def test_knn_top1_of_raw_pixels_matches_a_plain_count_over_the_bank_sample(image_folder):
  """The demo's baseline: knn.top1 of any encoder, here raw pixels, against a bank sample."""
  from care_jax import parallel, run_safety
  from care_jax.evaluation import features, linear
  config = load_config("tiny")
  config.data.update(name="image_folder", folder_root=image_folder, eval_split="test")
  mesh = parallel.create_mesh()
  pixels, _ = linear.encoder_features(config, {"encoder": "raw_pixels"},
                                      config.data.image_size, mesh)
  bank = knn.bank_indices(64, 40, seed=0)
  got = knn.top1(pixels, config.data, mesh, k=5, temperature=0.07, num_classes=2, bank=bank,
                 safety=run_safety.RunSafety())

  def split(name, indices=None):
    parts = [jax.device_get(p) for p in features.apply_to_split(pixels, config.data, name, mesh,
                                                                indices)]
    feats, labels, mask = (np.concatenate(x) for x in zip(*parts))
    return feats[mask], labels[mask]

  bank_feats, bank_labels = split("train", bank)
  assert len(bank_feats) == 40
  queries, labels = split("test")
  want = np.mean(brute_force_knn(queries, bank_feats, bank_labels, 5, 0.07, 2) == labels)
  assert got == pytest.approx(want) and len(queries) == 16
