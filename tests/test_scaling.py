"""Data parallelism: on several devices each device computes only its own examples."""
import re

import pytest

from care_jax import scaling
from tests.conftest import run_on_devices

PROGRAMS = set(scaling.PROGRAMS)
# kNN's count moves the query batch (32 queries: 4 a device) and each part of the bank's
# candidates for each device's queries, never the bank: an all-gather of [32, D] and
# all-to-alls of [1, 4, k'] per device.
KNN_MOVES = (re.compile(r"all-gather f32\[32,\d+\] \(.*"),
             re.compile(r"all-to-all ([fs]32\[1,4,\d+\](, )?)+ \(.*"))


@pytest.mark.slow  # ~145 s: every program compiled for several device counts
def test_every_program_computes_only_its_devices_examples():
  """Compiled for 8 devices: no collective that moves examples (before the fix the
  pretraining step all-gathered both views before the trunk's first convolution, and kNN's
  top-k gathered every device's similarities) but kNN's queries and candidates, and
  per-device scratch memory within 1.5x of one device's at the same per-device batch, plus
  the buffers of the all-reduces (gradients and statistics), which one device does not
  need. The kNN bank and linear evaluation's feature cache are sharded: 1/8 a device."""
  result = run_on_devices("programs_on_devices.py", 8)
  assert result["devices"] == 8
  one, many = result["one"], result["many"]
  assert set(one) == set(many) == PROGRAMS
  problems = []
  for name in sorted(PROGRAMS):
    allowed = KNN_MOVES if name == "knn_count" else ()
    moves = [m for m in many[name]["moves"] if not any(p.fullmatch(m) for p in allowed)]
    if moves:
      problems.append(f"{name} moves examples: {moves[:3]}")
    reductions = many[name]["collectives"].get("all-reduce", [0, 0])[1]
    allowed = 1.5 * one[name]["temp_bytes"] + reductions
    if many[name]["temp_bytes"] > allowed:
      problems.append(f"{name}: {many[name]['temp_bytes']} bytes per device on 8 devices, "
                      f"{one[name]['temp_bytes']} on one, all-reduces {reductions}")
  assert not problems, "\n".join(problems)
  # The step reduces gradients and BatchNorm statistics over the devices.
  assert many["pretrain_step"]["collectives"]["all-reduce"][0] > 10

  # Linear evaluation's cache of features (N x D float32) holds N x D x 4 / 8 bytes per
  # device (it was replicated: N x D x 4 on every device and every host), and a batch
  # looked up from it is the batch of the features cached.
  cache = result["feature_cache"]
  assert cache["bytes_per_device"] == [cache["bytes"] // 8] * 8, cache
  assert cache["label_bytes_per_device"] == 5 * 32 * 4 // 8
  assert cache["valid_is_the_mask"] and cache["lookup_labels_equal"], cache
  assert cache["lookup_error"] == 0.0, cache

  # The kNN bank likewise (it was replicated), and the count against it is the count of one
  # device with the whole bank (58 of 61 valid queries on these clustered points).
  bank = result["knn_bank"]
  assert bank["bytes_per_device"] == [bank["bytes"] // 8] * 8, bank
  assert bank["correct_sharded"] == bank["correct_whole_bank"], bank
  assert bank["correct_whole_bank"] > bank["valid_queries"] / 2, bank


HLO = """
  %all-gather.1 = f32[2,32,16,16,3]{4,3,2,0,1} all-gather(f32[2,4,16,16,3]{4,3,2,0,1} %p), channel_id=1, replica_groups=[1,8]<=[8], dimensions={1}, use_global_device_ids=true, metadata={op_name="jit(step)/trunk/conv1/reshape"}
  %all-reduce.2 = (f32[16]{0}, bf16[4,8]{1,0}) all-reduce(f32[16]{0} %a, bf16[4,8]{1,0} %b), channel_id=2, to_apply=%add, metadata={op_name="jit(step)/psum"}
  %all-gather-done = f32[8]{0} all-gather-done(%start)
  %add.3 = f32[16]{0} add(f32[16]{0} %x, f32[16]{0} %y)
"""


def test_collectives_read_from_hlo():
  found = scaling.collectives(HLO)
  assert [c.kind for c in found] == ["all-gather", "all-reduce"]
  gather, reduce = found
  assert gather.shapes == (("f32", (2, 32, 16, 16, 3)),)
  assert gather.bytes == 2 * 32 * 16 * 16 * 3 * 4
  assert gather.op_name == "jit(step)/trunk/conv1/reshape"
  assert reduce.bytes == 16 * 4 + 4 * 8 * 2
  assert "all-gather f32[2,32,16,16,3]" in gather.describe()


def test_evaluation_loops_bound_their_queue_of_collective_programs():
  """The rehearsal's monitor and linear evaluation hung on 8 simulated devices with dozens
  of such programs queued (and the script does without parallel.InFlight, which keeps
  two). XLA:CPU gives up after 60 s here, so a regression fails instead of hanging."""
  out = run_on_devices("queued_collectives.py", 8, collective_timeout=60)
  assert out == {"a": 60 * 8 * 128 * 128, "b": 60 * 8 * 64}
