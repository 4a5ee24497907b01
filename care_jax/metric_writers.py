"""Metric writers (TensorBoard events and log lines), with or without clu, and the
profiling hook.

The trainer and the evaluations call this module as they would clu's `metric_writers`
(create_default_writer, SummaryWriter). Where clu imports, these are clu's. clu needs
tensorflow, which the GPU machines lack (gpu-runbook): there the same calls write
TensorBoard event files with the `tensorboard` package alone, scalars stored as the tensor
summaries tf.summary writes, so that TensorBoard, EventAccumulator and care_jax.plot read
both alike, and log lines through absl logging. The profiling hook is always this
module's: clu's traces again every hour and cannot be stopped from outside, so a run
preempted inside its window would leave the trace running.
"""
import logging
import time

import jax

from care_jax import errors

try:
  from clu import metric_writers as _clu_writers
except ImportError:  # No clu, or clu without tensorflow.
  _clu_writers = None

HAVE_CLU = _clu_writers is not None


class NullWriter:
  """Writes nothing: what processes other than 0 write to TensorBoard."""

  def write_scalars(self, step: int, scalars) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class _LogWriter(NullWriter):
  """Scalars as one log line per call, as clu's LoggingWriter writes them."""

  def write_scalars(self, step: int, scalars) -> None:
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}"
                                            for k, v in sorted(scalars.items())))


class _EventWriter:
  """Scalars into a TensorBoard event file in `logdir`, with no tensorflow."""

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import summary_pb2  # noqa: PLC0415
    from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: PLC0415
    self._file = EventFileWriter(str(logdir))
    self._metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

  def write_scalars(self, step: int, scalars) -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2  # noqa: PLC0415
    from tensorboard.compat.proto import tensor_shape_pb2, types_pb2  # noqa: PLC0415
    values = [summary_pb2.Summary.Value(
        tag=tag, metadata=self._metadata,
        tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(value)],
                                      tensor_shape=tensor_shape_pb2.TensorShapeProto()))
              for tag, value in scalars.items()]
    self._file.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                         summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class _Writers:
  """Every call goes to each writer."""

  def __init__(self, writers: list):
    self._writers = writers

  def write_scalars(self, step: int, scalars) -> None:
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def flush(self) -> None:
    for writer in self._writers:
      writer.flush()

  def close(self) -> None:
    for writer in self._writers:
      writer.close()


class _NamingWriteFailures:
  """A writer whose refused writes (full disk, ...) are errors.WriteFailed naming `logdir`:
  TensorBoard's writers report them far from the file, at a flush."""

  def __init__(self, writer, logdir):
    self._writer, self._logdir = writer, logdir

  def _call(self, method, *args):
    try:
      return getattr(self._writer, method)(*args)
    except Exception as e:  # TensorFlow, tensorboard and the OS raise many types
      errors.raise_if_write_failed(e, f"{self._logdir} (TensorBoard events)")
      raise

  def write_scalars(self, step: int, scalars) -> None:
    self._call("write_scalars", step, scalars)

  def flush(self) -> None:
    self._call("flush")

  def close(self) -> None:
    self._call("close")


def create_default_writer(logdir, *, just_logging: bool = False):
  """Log lines, plus TensorBoard events in `logdir` unless just_logging (other processes)."""
  if HAVE_CLU:
    writer = _clu_writers.create_default_writer(logdir, just_logging=just_logging)
  else:
    writer = _Writers([_LogWriter()] + ([] if just_logging else [_EventWriter(logdir)]))
  return _NamingWriteFailures(writer, logdir)


def SummaryWriter(logdir):  # noqa: N802  (clu's class name)
  """TensorBoard events only, no log lines."""
  writer = _clu_writers.SummaryWriter(str(logdir)) if HAVE_CLU else _EventWriter(logdir)
  return _NamingWriteFailures(writer, logdir)


class Profile:
  """A hook, called with each completed step, that traces steps first_profile ..
  first_profile + num_profile_steps into `logdir`; close() ends a trace the run left
  running (stopped early, inside the window)."""

  def __init__(self, *, logdir, num_profile_steps: int, first_profile: int):
    self._logdir, self._start = str(logdir), first_profile
    self._stop = first_profile + num_profile_steps
    self._tracing = False

  def __call__(self, step: int, state=None, metrics=None) -> None:
    """A training-loop hook (training.loop): only the step matters here."""
    if step == self._start:
      jax.profiler.start_trace(self._logdir)
      self._tracing = True
      logging.info("Profiling steps %d to %d into %s.", self._start, self._stop, self._logdir)
    elif step == self._stop:
      self.close()

  def close(self) -> None:
    if self._tracing:
      jax.profiler.stop_trace()
      self._tracing = False
