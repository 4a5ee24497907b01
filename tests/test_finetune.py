"""Semi-supervised fine-tuning: the labelled subsets, and a run that trains the whole trunk
and resumes to the results of an uninterrupted one."""
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from care_jax import checkpointing, pretrained
from care_jax.errors import UserError
from care_jax.evaluation import finetune
from care_jax.preemption import Preempted, Preemption
from tests.conftest import load_config


def test_fashion_mnist_10pct_is_a_balanced_tenth(fmnist_data_dir):
  config = load_config("fmnist_finetune_10pct")
  config.data.data_dir = fmnist_data_dir
  data, indices = finetune.labelled_data(config)
  assert data.name == "fashion_mnist" and len(indices) == 6000
  from care_jax.data import sources
  labels = sources.open_source(data, "train").labels()[indices]
  assert np.bincount(labels).tolist() == [600] * 10


def test_imagenet_subsets_are_the_tfds_ones():
  for labels in ("1pct", "10pct"):
    config = load_config(f"finetune_{labels}")
    assert config.mode == "finetune"
    data, indices = finetune.labelled_data(config)
    assert (data.name, indices) == (f"imagenet2012_subset/{labels}", None)
    assert config.data.name == "imagenet2012"  # evaluated on ImageNet's validation split
  config.finetune.labels = "5pct"
  with pytest.raises(UserError, match="finetune.labels must be one of"):
    finetune.labelled_data(config)


def finetune_config(image_folder, pretrained_workdir):
  config = load_config("tiny")
  config.data.update(name="image_folder", folder_root=image_folder, eval_split="test")
  config.mode = "finetune"
  config.finetune.update(pretrained_workdir=pretrained_workdir, labels="all", num_epochs=3,
                         global_batch_size=16, eval_every_epochs=1, base_lr=0.05)
  return config


def final_params(workdir):
  with checkpointing.manager(workdir, read_only=True) as mgr:
    return mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state["params"]


def test_finetuning_trains_the_trunk_and_resumes_exactly(tmp_path, image_folder,
                                                         pretrained_workdir, monkeypatch):
  config = finetune_config(image_folder, pretrained_workdir)
  want = finetune.finetune(config, str(tmp_path / "whole"))
  assert json.loads((tmp_path / "whole" / "results.json").read_text()) == want
  assert [h["epoch"] for h in want["history"]] == [1, 2, 3]
  assert want["labelled_examples"] == 64 and want["labels"] == "all"

  _, start = pretrained.load(pretrained_workdir)
  end = final_params(tmp_path / "whole")
  conv = lambda params: np.asarray(params["trunk"]["conv1"]["kernel"])
  assert np.abs(conv(end) - conv(start["params"])).max() > 0  # the trunk was trained

  # Preempted after step 6 of 12 (mid-epoch), then rerun: the same results.
  monkeypatch.setattr(Preemption, "reached", lambda self, mgr, step: step == 6)
  with pytest.raises(Preempted, match="checkpoint of step 6"):
    finetune.finetune(config, str(tmp_path / "preempted"))
  monkeypatch.undo()
  assert not (tmp_path / "preempted" / "results.json").exists()
  assert finetune.finetune(config, str(tmp_path / "preempted")) == want

  config.finetune.base_lr = 0.1  # a rerun that would compute something else is refused
  with pytest.raises(checkpointing.CheckpointError, match="finetune.base_lr: 0.05 -> 0.1"):
    finetune.finetune(config, str(tmp_path / "preempted"))


def test_finetuning_a_subset_larger_batch_is_a_one_line_error(tmp_path, image_folder):
  config = finetune_config(image_folder, None)
  config.finetune.update(encoder="random_init", labels="10pct", global_batch_size=8)
  with pytest.raises(UserError, match=r"finetune.global_batch_size 8 is larger than the 6 "
                                      r"training examples"):
    finetune.finetune(config, str(tmp_path))
