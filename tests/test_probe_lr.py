"""experiments/probe_lr.py trains the probe's head with its schedule and scores it on the
images it did not train on."""
import ml_collections
import numpy as np

from tests.conftest import ROOT


def test_the_head_learns_separable_features_and_is_scored_on_each_split(monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / "experiments"))
  import probe_lr
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 8)) * 4

  def split(n):
    labels = rng.integers(0, 3, n)
    return (centres[labels] + rng.normal(size=(n, 8))).astype(np.float32), labels.astype(np.int32)

  linear = ml_collections.ConfigDict(dict(global_batch_size=32, num_epochs=5, momentum=0.9,
                                          weight_decay=0.0))
  held_out, shuffled = split(200), split(200)
  shuffled = (shuffled[0], rng.permutation(shuffled[1]))  # labels unrelated to features
  top1 = probe_lr.train_head(linear, split(512), {"held_out": held_out, "shuffled": shuffled},
                             lr=0.5, seed=0)
  assert top1["held_out"] > 0.95 and top1["shuffled"] < 0.6, top1
