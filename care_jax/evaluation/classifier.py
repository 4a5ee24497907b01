"""A classifier's state, training step and top-1/top-5 counts: what linear evaluation (a
head on frozen features) and fine-tuning (trunk and head) train the same way."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from care_jax.training import state as state_lib

head = functools.partial(nn.Dense, kernel_init=nn.initializers.normal(0.01),
                         bias_init=nn.initializers.zeros)


def initial_state(params, batch_stats, tx) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
          "opt_state": tx.init(params)}


def training_step(apply, tx):
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


def _top_k_correct(logits, labels, mask, k: int):
  top = jnp.argsort(-logits, axis=-1)[:, :k]
  return jnp.sum(jnp.any(top == labels[:, None], axis=-1) & mask)


def correct_counts(logits, labels, mask):
  """[top-1 correct, top-5 correct, valid examples] of one batch (top-5: top-k of the k
  classes when there are fewer than 5)."""
  return jnp.stack([_top_k_correct(logits, labels, mask, 1),
                    _top_k_correct(logits, labels, mask, min(5, logits.shape[-1])),
                    jnp.sum(mask)])


def accuracy(counts) -> dict:
  top1, top5, examples = (int(c) for c in jax.device_get(counts))
  return {"top1": top1 / examples, "top5": top5 / examples, "examples": examples}


class Classifier(nn.Module):
  """A CARE trunk, global average pooling and a linear layer."""
  trunk: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images, train: bool):
    _, layer4 = self.trunk(images, train=train)
    pooled = jnp.mean(layer4, axis=(1, 2)).astype(jnp.float32)
    return head(self.num_classes, name="head")(pooled)


def classifier_model(trunk, num_classes: int, precision: str) -> Classifier:
  """The pretraining network's trunk with a head; its BatchNorms in training mode reduce
  over the sharded batch as XLA partitions them (no shard_map axis: a plain jitted step)."""
  return Classifier(trunk.clone(dtype=state_lib.PRECISIONS[precision], axis_name=None),
                    num_classes)
