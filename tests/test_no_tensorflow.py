"""The trainer on a machine without tensorflow, tensorflow-datasets or clu (the GPU
machines): fashion_mnist_idx data, TensorBoard events from the tensorboard package alone."""
import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from care_jax import metric_writers
from tests.conftest import ROOT
from tests.idx_files import write_flat_fashion_mnist

# Run first in a child interpreter: any later `import tensorflow` (or tfds, clu) fails.
BLOCK_TENSORFLOW = ("import sys\n"
                    "for name in ('tensorflow', 'tensorflow_datasets', 'clu'):\n"
                    "  sys.modules[name] = None\n")


def scalars(logdir, tag) -> list:
  events = event_accumulator.EventAccumulator(str(logdir))
  events.Reload()
  return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]


def test_event_writer_without_clu_reads_back_like_clus(tmp_path, monkeypatch):
  have_clu = metric_writers.HAVE_CLU
  if have_clu:
    with_clu = metric_writers.create_default_writer(tmp_path / "clu")
    with_clu.write_scalars(3, {"knn_top1": 0.25})
    with_clu.flush()
  monkeypatch.setattr(metric_writers, "HAVE_CLU", False)
  writer = metric_writers.create_default_writer(tmp_path / "own")
  writer.write_scalars(3, {"knn_top1": 0.25, "loss": 2})
  writer.write_scalars(5, {"knn_top1": 0.5})
  writer.flush()
  assert scalars(tmp_path / "own", "knn_top1") == [(3, 0.25), (5, 0.5)]
  assert scalars(tmp_path / "own", "loss") == [(3, 2.0)]
  if have_clu:  # clu's events read the same way
    assert scalars(tmp_path / "clu", "knn_top1") == [(3, 0.25)]


@pytest.mark.slow  # ~60 s: the GPU preset's network in a subprocess
def test_gpu_preset_pretrains_without_tensorflow_tfds_or_clu(tmp_path):
  """A few steps of the fmnist_gpu preset as the GPU machine runs it (its data path,
  bfloat16, LARS, the monitors), with the batch and the network shrunk to compile fast."""
  write_flat_fashion_mnist(tmp_path, num_train=64, num_test=16)
  workdir = tmp_path / "run"
  small_network = {"channels": 4, "hidden_dim": 32, "projection_dim": 16,
                   "t_stream.num_blocks": 2, "t_stream.heads": 2, "t_stream.head_dim": 4}
  args = ["--config=configs/care.py:fmnist_gpu", f"--workdir={workdir}",
          f"--config.data.data_dir={tmp_path}", "--config.global_batch_size=16",
          "--config.num_train_steps=2", "--config.monitor.every_steps=2",
          *(f"--config.model.{k}={v}" for k, v in small_network.items())]
  code = (BLOCK_TENSORFLOW + "import runpy\n"
          f"sys.argv = ['care_jax.main'] + {args!r}\n"
          "runpy.run_module('care_jax.main', run_name='__main__')\n")
  # Without XLA's backend optimisation: the compilation is most of this test's time.
  env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0 "
                                    "--xla_llvm_disable_expensive_passes=true"}
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  for tag in ("knn_top1", "online_probe_top1"):
    values = scalars(workdir, tag)
    assert [step for step, _ in values] == [2] and 0.0 <= values[0][1] <= 1.0, (tag, values)
  assert [step for step, _ in scalars(workdir, "loss")] == [2]
  assert "knn_top1=" in result.stderr  # the log lines of the writer without clu
  saved = json.loads((workdir / "config.json").read_text())
  assert (saved["data"]["name"], saved["precision"], saved["optimizer"]["name"],
          saved["cross_weight"]) == ("fashion_mnist_idx", "bfloat16", "lars", 100.0)
