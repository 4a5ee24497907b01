"""What linear evaluation and fine-tuning share: a supervised run in its own workdir,
trained by the one training loop (training.loop), its evaluations kept as a history.

The workdir holds config.json, checkpoints/ (the state, the evaluations so far and which
encoder they evaluate: at the end of every epoch, and on a stop request wherever the run
is) and, once it ends, results.json. Rerunning the same command resumes exactly: an
evaluation that a stop interrupted (or that ran after the last save) runs again first. A
rerun under settings that would change the result is refused before any work, as in
pretraining, and so is one whose encoder is another.
"""
import json
import logging
import pathlib
from typing import Callable, Iterator, Sequence

import jax
import orbax.checkpoint as ocp

from care_jax import checkpointing, errors, metric_writers, parallel, run_safety
from care_jax.evaluation import classifier, encoders
from care_jax.training import loop

# Fields an evaluation's result depends on, and those under them that change nothing.
_COMPARED = ("seed", "data", "model", "precision")
_BOOKKEEPING = ("data.data_dir", "data.folder_root", "data.num_workers")


def check_before_work(config, section: str, encoder_kinds: tuple, workdir):
  """What linear evaluation and fine-tuning check before any work: the workdir, the
  encoder, the epoch counts and that the batch divides over the devices. Returns the mesh."""
  section_config = config[section]
  checkpointing.check_workdir(workdir)
  encoders.check(section_config, section, encoder_kinds)
  errors.check_positive(section_config.num_epochs, f"{section}.num_epochs")
  errors.check_positive(section_config.eval_every_epochs, f"{section}.eval_every_epochs")
  mesh = parallel.create_mesh()
  parallel.check_batch_size(section_config.global_batch_size, mesh)
  return mesh


class TopK:
  """An evaluator (`evaluate(state) -> {"top1", "top5", "examples"}`): sums
  counts(state, batch) ([top-1, top-5, examples], classifier.correct_counts) over the
  batches that batches() yields, asking `safety` between them."""

  def __init__(self, batches: Callable[[], Iterator], counts: Callable, safety):
    self._batches, self._counts, self._safety = batches, counts, safety

  def evaluate(self, state) -> dict:
    total, in_flight = 0, parallel.InFlight()
    for batch in self._batches():
      total = in_flight(total + self._counts(state, batch))
      self._safety.check()
    return classifier.accuracy(total)


class SupervisedRun:
  """One evaluation run's checkpoints, metrics, history and results. Made before any
  expensive work, since it refuses a rerun that would not resume the same evaluation;
  `close` must follow."""

  def __init__(self, workdir, config, section: str, source: dict, safety):
    self.workdir, self._source, self._safety = pathlib.Path(workdir), source, safety
    self._mgr = checkpointing.manager(workdir, keep=2)
    try:
      self._step = next(iter(checkpointing.agreed_steps(self._mgr)), None)
      if self._step is not None:
        checkpointing.check_same_run(workdir, config, compared=_COMPARED + (section,),
                                     resumable=_BOOKKEEPING)
        self._check_source(checkpointing.restore_items(
            self._mgr, self._step, progress=ocp.args.JsonRestore()).progress["source"])
      checkpointing.save_config(workdir, config)
    except Exception:
      self._mgr.close()  # an open manager's threads would fail noisily at exit
      raise
    self._writer = metric_writers.create_default_writer(
        str(workdir), just_logging=jax.process_index() > 0)
    # Per-epoch scalars go to TensorBoard only: a line per epoch would drown the log.
    self._epoch_writer = (metric_writers.SummaryWriter(str(workdir))
                          if jax.process_index() == 0 else metric_writers.NullWriter())

  def _check_source(self, saved: dict) -> None:
    if saved != self._source:
      raise checkpointing.CheckpointError(
          f"{self.workdir} holds an evaluation of {encoders.describe(saved)}, and it would "
          f"now read {encoders.describe(self._source)}. Pass a new --workdir to evaluate "
          f"that, or move {self.workdir} away.")

  def restore(self, initial_state):
    """(state, its step, evaluations so far): the latest checkpoint's, else
    (initial_state, 0, [])."""
    if self._step is None:
      return initial_state, 0, []
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), initial_state)
    restored = checkpointing.restore_items(self._mgr, self._step,
                                           state=ocp.args.StandardRestore(abstract),
                                           progress=ocp.args.JsonRestore())
    logging.info("Resumed from the checkpoint of step %d in %s.", self._step,
                 self._mgr.directory)
    return restored.state, self._step, list(restored.progress["history"])

  def train(self, state, history: list, *, start: int, step_fn: Callable, batches: Iterator,
            steps_per_epoch: int, num_epochs: int, eval_every_epochs: int,
            evaluators: Sequence, learning_rate: Callable, batch_size: int,
            stride: int = 1) -> list:
    """Trains from step `start` to the end of num_epochs with step_fn(state, batch) ->
    (state, {"loss"}), evaluating every eval_every_epochs epochs and at the end; returns
    the evaluations (appended to `history`)."""
    total = num_epochs * steps_per_epoch
    epoch_end = lambda step: step % steps_per_epoch == 0
    due = lambda step: epoch_end(step) and (step == total
                                            or (step // steps_per_epoch) % eval_every_epochs == 0)

    def save(mgr, step, state):
      # A copy: orbax writes the JSON later, in its own thread, and the history grows.
      checkpointing.save_items(mgr, step, state=ocp.args.StandardSave(state),
                               progress=ocp.args.JsonSave({"history": list(history),
                                                           "source": self._source}))

    def keep(step, evaluation):
      history.append({"epoch": step // steps_per_epoch, **evaluation})

    metrics = loop.Metrics(self._epoch_writer, every=steps_per_epoch, total_steps=total,
                           start_step=start, global_batch_size=batch_size,
                           steps_per_epoch=steps_per_epoch,
                           extra=lambda step: {"learning_rate": float(learning_rate(step))})
    checkpoints = loop.Checkpoints(self._mgr, save, self._safety, total_steps=total,
                                   due=epoch_end)
    evaluations = loop.Evaluations(evaluators, self._writer, checkpoints, due=due,
                                   on_result=keep, metrics=metrics)
    if start and due(start) and not any(h["epoch"] == start // steps_per_epoch
                                        for h in history):
      evaluations.evaluate(start, state)  # stopped during it, or it ran after the last save
    hooks = [loop.Progress(start, total, self._epoch_writer), metrics, checkpoints,
             evaluations]
    loop.run(state, step_fn, batches, start=start, stop=total, stride=stride, hooks=hooks)
    return history

  def close(self) -> None:
    try:
      checkpointing.finish(self._mgr)
    finally:
      self._writer.flush()
      self._epoch_writer.flush()

  def write_results(self, history: list, **fields) -> dict:
    """results.json (process 0, atomically): the final and the best evaluation (the release
    reports the best) and `fields`."""
    best = max(history, key=lambda h: h["top1"])
    results = {**fields, "final_top1": history[-1]["top1"], "final_top5": history[-1]["top5"],
               "best_top1": best["top1"], "best_top5": best["top5"],
               "best_epoch": best["epoch"], "history": history}
    if jax.process_index() == 0:
      run_safety.write_atomic(self.workdir / "results.json", json.dumps(results, indent=2))
    return results
