"""What linear evaluation and fine-tuning share: checks made before any work, the encoder
they start from, a classifier's training step, a state that orbax checkpoints and a rerun
resumes exactly, TensorBoard scalars, top-1/top-5 counts on the eval split, results.json.

An evaluation's workdir holds config.json, checkpoints/ (the state, the evaluations so far
and which encoder they evaluate, at the end of every epoch and on SIGTERM) and, once it
ends, results.json. Rerunning the same command resumes from the latest checkpoint; a rerun
under settings that would change the result is refused, as in pretraining, and so is one
whose pretraining run has saved a newer checkpoint since.
"""
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from care_jax import checkpointing, errors, metric_writers, parallel, pretrained
from care_jax.errors import UserError
from care_jax.preemption import Preempted, Preemption

# Fields an evaluation's result depends on, and those under them that change nothing.
_COMPARED = ("seed", "data", "model", "precision")
_BOOKKEEPING = ("data.data_dir", "data.folder_root", "data.num_workers")


def check_encoder(section_config, section: str, encoders: tuple) -> None:
  kind = section_config.encoder
  if kind not in encoders:
    raise UserError(f"{section}.encoder must be one of {encoders}, got {kind!r}.")
  if kind == "pretrained" and not section_config.pretrained_workdir:
    raise UserError(f"{section}.pretrained_workdir is not set: pass "
                    f"--config.{section}.pretrained_workdir=<pretraining workdir>.")


def check_before_work(config, section: str, encoders: tuple, workdir):
  """What linear evaluation and fine-tuning check before any work: the workdir, the
  encoder, the epoch counts and that the batch divides over the devices. Returns the mesh."""
  section_config = config[section]
  checkpointing.check_workdir(workdir)
  check_encoder(section_config, section, encoders)
  errors.check_positive(section_config.num_epochs, f"{section}.num_epochs")
  errors.check_positive(section_config.eval_every_epochs, f"{section}.eval_every_epochs")
  mesh = parallel.create_mesh()
  parallel.check_batch_size(section_config.global_batch_size, mesh)
  return mesh


def pretrained_config(section_config):
  """The config.json of the pretraining run an evaluation reads, or None."""
  if section_config.encoder != "pretrained":
    return None
  return checkpointing.load_config(section_config.pretrained_workdir)


def encoder_source(section_config) -> dict:
  """Which encoder an evaluation starts from: for a pretraining run, its workdir and the
  checkpoint step read, so that a resumed evaluation can tell it still has the same one."""
  if section_config.encoder != "pretrained":
    return {"encoder": section_config.encoder}
  workdir = section_config.pretrained_workdir
  return {"encoder": "pretrained", "workdir": str(pathlib.Path(workdir).absolute()),
          "step": pretrained.latest_step(workdir)}


def image_size(config, section: str, pretrained_config=None) -> int:
  """The resolution to evaluate at: the pretraining run's, unless config.<section>.
  image_size asks for another on purpose. Says which, and why."""
  override = config[section].image_size
  pretrained = None if pretrained_config is None else pretrained_config.data.image_size
  if override > 0:
    if pretrained is not None and override != pretrained:
      logging.warning("Evaluating at %d px (%s.image_size); the encoder was pretrained at "
                      "%d px.", override, section, pretrained)
    return override
  if pretrained is None:
    return config.data.image_size
  if pretrained != config.data.image_size:
    logging.info("Evaluating at %d px, the pretraining run's resolution (not data.image_size "
                 "%d); set --config.%s.image_size to choose another.", pretrained,
                 config.data.image_size, section)
  return pretrained


def top_k_correct(logits, labels, mask, k: int):
  top = jnp.argsort(-logits, axis=-1)[:, :k]
  return jnp.sum(jnp.any(top == labels[:, None], axis=-1) & mask)


def correct_counts(logits, labels, mask):
  """[top-1 correct, top-5 correct, valid examples] of one batch."""
  return jnp.stack([top_k_correct(logits, labels, mask, 1),
                    top_k_correct(logits, labels, mask, min(5, logits.shape[-1])),
                    jnp.sum(mask)])


def accuracy(counts) -> dict:
  top1, top5, examples = (int(c) for c in jax.device_get(counts))
  return {"top1": top1 / examples, "top5": top5 / examples, "examples": examples}


def initial_state(params, batch_stats, tx) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
          "opt_state": tx.init(params)}


def classifier_step(apply, tx):
  """(state, inputs, labels) -> (state, loss): one step of softmax cross-entropy for a
  flax classifier `apply(variables, inputs, train=True, mutable=["batch_stats"])`."""

  def step(state, inputs, labels):
    def loss_fn(params):
      logits, new = apply({"params": params, "batch_stats": state["batch_stats"]}, inputs,
                          train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "batch_stats": stats, "opt_state": opt_state}, loss

  return step


class Run:
  """The bookkeeping of one evaluation run: checkpoints, metrics, preemption, results.

  Made once every check has passed and the encoder is loaded; `close` must follow.
  `source` (encoder_source) is checkpointed with the state and must match on resume.
  """

  def __init__(self, workdir, config, section: str, source: dict):
    self.workdir, self._source = pathlib.Path(workdir), source
    self.mgr = checkpointing.manager(workdir, keep=2)
    try:
      if self.mgr.latest_step() is not None:
        checkpointing.check_same_run(workdir, config, compared=_COMPARED + (section,),
                                     resumable=_BOOKKEEPING)
      checkpointing.save_config(workdir, config)
    except Exception:
      self.mgr.close()  # an open manager's threads would fail noisily at exit
      raise
    self.writer = metric_writers.create_default_writer(
        str(workdir), just_logging=jax.process_index() > 0)
    # Per-epoch scalars go to TensorBoard only: a line per epoch would drown the log.
    self._epoch_writer = (metric_writers.SummaryWriter(str(workdir))
                          if jax.process_index() == 0 else None)
    self._preemption = Preemption()
    self._progress, self._last_line = None, time.monotonic()

  def restore(self, initial_state):
    """(state, history): the latest checkpoint's, else (initial_state, [])."""
    step = self.mgr.latest_step()
    if step is None:
      return initial_state, []
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), initial_state)
    restored = checkpointing.restore_items(self.mgr, step,
                                           state=ocp.args.StandardRestore(abstract),
                                           progress=ocp.args.JsonRestore())
    saved = restored.progress["source"]
    if saved != self._source:
      raise checkpointing.CheckpointError(
          f"{self.workdir} holds an evaluation of {_describe(saved)}, and it would now read "
          f"{_describe(self._source)}. Pass a new --workdir to evaluate that, or move "
          f"{self.workdir} away.")
    logging.info("Resumed from the checkpoint of step %d in %s.", step, self.mgr.directory)
    return restored.state, list(restored.progress["history"])

  def save(self, step: int, state, history: list) -> None:
    progress = {"history": history, "source": self._source}
    self.mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                progress=ocp.args.JsonSave(progress)),
                  force=True)

  def stop_if_preempted(self, step: int, state, history: list) -> None:
    """On SIGTERM: checkpoints `step` (if not just saved) and raises Preempted."""
    if not self._preemption.reached(self.mgr, step):
      return
    if self.mgr.latest_step() != step:
      self.save(step, state, history)
    self.mgr.wait_until_finished()
    raise Preempted(step)

  def write_epoch(self, step: int, epoch: int, num_epochs: int, loss: float,
                  learning_rate: float) -> None:
    """TensorBoard gets every epoch; the log a progress line at most every 30 s."""
    if self._epoch_writer is not None:
      self._epoch_writer.write_scalars(step, {"loss": loss, "learning_rate": learning_rate,
                                              "epoch": epoch})
    now = time.monotonic()
    if self._progress is None:  # (time, epoch) of this process's first epoch end
      self._progress = (now, epoch)
    started, first = self._progress
    if now - self._last_line >= 30 and epoch > first:
      self._last_line = now
      per_epoch = (now - started) / (epoch - first)
      logging.info("epoch %d/%d: loss %.3f, lr %.3g (%.1f s an epoch, ETA %.0f s)", epoch,
                   num_epochs, loss, learning_rate, per_epoch, per_epoch * (num_epochs - epoch))

  def log_evaluation(self, step: int, epoch: int, num_epochs: int, loss: float,
                     evaluation: dict) -> None:
    self.writer.write_scalars(step, {"top1": evaluation["top1"], "top5": evaluation["top5"]})
    logging.info("epoch %d/%d: loss %.3f, top-1 %.4f, top-5 %.4f", epoch, num_epochs, loss,
                 evaluation["top1"], evaluation["top5"])

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()
    self.writer.flush()
    if self._epoch_writer is not None:
      self._epoch_writer.flush()

  def write_results(self, results: dict) -> dict:
    """results.json, written atomically by process 0."""
    if jax.process_index() == 0:
      path = self.workdir / "results.json"
      tmp = path.with_suffix(".tmp")
      tmp.write_text(json.dumps(results, indent=2))
      tmp.replace(path)
    return results


def summarise(history: list, **fields) -> dict:
  """results.json: the final and the best evaluation (the release reports the best)."""
  best = max(history, key=lambda h: h["top1"])
  return {**fields, "final_top1": history[-1]["top1"], "final_top5": history[-1]["top5"],
          "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
          "history": history}


def _describe(source: dict) -> str:
  if source["encoder"] != "pretrained":
    return f"the {source['encoder']} encoder"
  return f"checkpoint {source['step']} of {source['workdir']}"
