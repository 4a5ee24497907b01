"""The one training loop of linear evaluation and fine-tuning: epochs, evaluations,
checkpoints, preemption, the progress line, results.json.

An evaluation's workdir holds config.json, checkpoints/ (the state, the evaluations so far
and which encoder they evaluate: at the end of every epoch, and on SIGTERM wherever the
run is) and, once it ends, results.json. Rerunning the same command resumes exactly (a run
stopped during an evaluation evaluates that epoch again first). A rerun under settings
that would change the result is refused before any work, as in pretraining, and so is one
whose pretraining run has saved a newer checkpoint since.
"""
import json
import logging
import pathlib
import time
from typing import Callable

import jax
import orbax.checkpoint as ocp

from care_jax import checkpointing, errors, metric_writers, parallel, preemption
from care_jax.evaluation import encoders

# Fields an evaluation's result depends on, and those under them that change nothing.
_COMPARED = ("seed", "data", "model", "precision")
_BOOKKEEPING = ("data.data_dir", "data.folder_root", "data.num_workers")
_PROGRESS_EVERY_SECONDS = 30


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


class Evaluation:
  """One evaluation run's checkpoints, metrics, preemption and results. Made before any
  expensive work, since it refuses a rerun that would not resume the same evaluation;
  `close` must follow."""

  def __init__(self, workdir, config, section: str, source: dict):
    preemption.listen()
    self.workdir, self._source = pathlib.Path(workdir), source
    self._mgr = checkpointing.manager(workdir, keep=2)
    try:
      step = next(iter(checkpointing.agreed_steps(self._mgr)), None)
      if step is not None:
        checkpointing.check_same_run(workdir, config, compared=_COMPARED + (section,),
                                     resumable=_BOOKKEEPING)
        saved = checkpointing.restore_items(self._mgr, step,
                                            progress=ocp.args.JsonRestore()).progress
        if saved["source"] != source:
          raise checkpointing.CheckpointError(
              f"{self.workdir} holds an evaluation of {encoders.describe(saved['source'])}, "
              f"and it would now read {encoders.describe(source)}. Pass a new --workdir to "
              f"evaluate that, or move {self.workdir} away.")
      checkpointing.save_config(workdir, config)
    except Exception:
      self._mgr.close()  # an open manager's threads would fail noisily at exit
      raise
    self._writer = metric_writers.create_default_writer(
        str(workdir), just_logging=jax.process_index() > 0)
    # Per-epoch scalars go to TensorBoard only: a line per epoch would drown the log.
    self._epoch_writer = (metric_writers.SummaryWriter(str(workdir))
                          if jax.process_index() == 0 else None)
    self._first_epoch_end = None  # (time, epoch) of this process's first epoch
    self._last_line = time.monotonic()

  def restore(self, initial_state):
    """(state, evaluations so far): the latest checkpoint's, else (initial_state, [])."""
    step = next(iter(checkpointing.agreed_steps(self._mgr)), None)
    if step is None:
      return initial_state, []
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), initial_state)
    restored = checkpointing.restore_items(self._mgr, step,
                                           state=ocp.args.StandardRestore(abstract),
                                           progress=ocp.args.JsonRestore())
    logging.info("Resumed from the checkpoint of step %d in %s.", step, self._mgr.directory)
    return restored.state, list(restored.progress["history"])

  def train(self, state, history: list, *, steps_per_epoch: int, num_epochs: int,
            eval_every_epochs: int, train_epoch: Callable, evaluate: Callable,
            learning_rate: Callable) -> list:
    """Trains to the end of num_epochs and returns the evaluations (appended to `history`).

    train_epoch(state, epoch, check) -> (state, last loss) trains the rest of `epoch` and
    calls check(state) after every step but the epoch's last; evaluate(state, check) ->
    {"top1", "top5", "examples"} calls check() between batches. Both checks stop the run
    on SIGTERM, after saving the state.
    """
    due = lambda epoch: epoch == num_epochs or epoch % eval_every_epochs == 0
    epoch_done, into_epoch = divmod(int(state["step"]), steps_per_epoch)
    if (into_epoch == 0 and epoch_done and due(epoch_done)
        and not any(h["epoch"] == epoch_done for h in history)):  # stopped while evaluating
      self._evaluate(state, history, epoch_done, num_epochs, None, evaluate)
    for epoch in range(epoch_done + 1, num_epochs + 1):
      state, loss = train_epoch(state, epoch, lambda s: self._stop_if_requested(s, history))
      step, loss = int(state["step"]), float(loss)
      self._write_epoch(step, epoch, num_epochs, loss, float(learning_rate(step)))
      if due(epoch):
        self._evaluate(state, history, epoch, num_epochs, loss, evaluate)
      self._save(state, history)
      if epoch < num_epochs:
        self._stop_if_requested(state, history)
    return history

  def _evaluate(self, state, history, epoch, num_epochs, loss, evaluate) -> None:
    evaluation = evaluate(state, lambda: self._stop_if_requested(state, history,
                                                                  between_steps=False))
    history.append({"epoch": epoch, **evaluation})
    step = int(state["step"])
    self._writer.write_scalars(step, {"top1": evaluation["top1"], "top5": evaluation["top5"]})
    logging.info("epoch %d/%d: %stop-1 %.4f, top-5 %.4f", epoch, num_epochs,
                 "" if loss is None else f"loss {loss:.3f}, ", evaluation["top1"],
                 evaluation["top5"])

  def _save(self, state, history) -> None:
    progress = {"history": history, "source": self._source}
    self._mgr.save(int(state["step"]), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)), force=True)

  def _stop_if_requested(self, state, history, between_steps: bool = True) -> None:
    """On SIGTERM: checkpoints the state (unless its step is saved already) and raises
    Preempted. Between batches of an evaluation (not between steps), only single-process
    runs stop: preemption.requested."""
    step = int(state["step"])
    if not preemption.requested(self._mgr if between_steps else None, step):
      return
    if self._mgr.latest_step() != step:
      self._save(state, history)
    self._mgr.wait_until_finished()
    raise preemption.Preempted(step)

  def _write_epoch(self, step: int, epoch: int, num_epochs: int, loss: float,
                   learning_rate: float) -> None:
    """TensorBoard gets every epoch; the log a progress line at most every 30 s."""
    if self._epoch_writer is not None:
      self._epoch_writer.write_scalars(step, {"loss": loss, "learning_rate": learning_rate,
                                              "epoch": epoch})
    now = time.monotonic()
    if self._first_epoch_end is None:
      self._first_epoch_end = (now, epoch)
    started, first = self._first_epoch_end
    if now - self._last_line >= _PROGRESS_EVERY_SECONDS and epoch > first:
      self._last_line = now
      per_epoch = (now - started) / (epoch - first)
      logging.info("epoch %d/%d: loss %.3f, lr %.3g (%.1f s an epoch, ETA %.0f s)", epoch,
                   num_epochs, loss, learning_rate, per_epoch, per_epoch * (num_epochs - epoch))

  def close(self) -> None:
    try:
      self._mgr.wait_until_finished()
    finally:
      self._mgr.close()
      self._writer.flush()
      if self._epoch_writer is not None:
        self._epoch_writer.flush()

  def write_results(self, history: list, **fields) -> dict:
    """results.json (process 0, atomically): the final and the best evaluation (the release
    reports the best) and `fields`."""
    best = max(history, key=lambda h: h["top1"])
    results = {**fields, "final_top1": history[-1]["top1"], "final_top5": history[-1]["top5"],
               "best_top1": best["top1"], "best_top5": best["top5"],
               "best_epoch": best["epoch"], "history": history}
    if jax.process_index() == 0:
      path = self.workdir / "results.json"
      tmp = path.with_suffix(".tmp")
      tmp.write_text(json.dumps(results, indent=2))
      tmp.replace(path)
    return results


def per_step_epochs(step_fn: Callable, batches, steps_per_epoch: int) -> Callable:
  """A train_epoch for Evaluation.train that takes one step per batch of `batches`:
  step_fn(state, batch) -> (state, loss)."""

  def train_epoch(state, epoch, check):
    loss = None
    for step in range(int(state["step"]), epoch * steps_per_epoch):
      state, loss = step_fn(state, next(batches))
      if step + 1 < epoch * steps_per_epoch:
        check(state)
    return state, loss

  return train_epoch
