"""Optimisers as optax chains. The learning rate is injected as a hyperparameter and set
from the state's step by the train step, so skipped (overflowed) steps cannot shift the
schedule."""
import jax
import optax

from care_jax.errors import UserError


def decay_and_adapt(params):
  """BYOL's predicate: biases and BatchNorm parameters get neither weight decay nor the
  LARS trust ratio. In care_jax they are exactly the 1-D leaves named bias or scale."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"), params)


def create(optimizer_config) -> optax.GradientTransformation:
  name = optimizer_config.name
  if name == "sgd":
    # torch.optim.SGD: decay added to the gradient, momentum buffer, then the lr.
    make = lambda learning_rate: optax.chain(
        optax.add_decayed_weights(optimizer_config.weight_decay),
        optax.sgd(learning_rate, momentum=optimizer_config.momentum))
  elif name == "lars":
    make = lambda learning_rate: optax.lars(
        learning_rate, weight_decay=optimizer_config.weight_decay,
        weight_decay_mask=decay_and_adapt, trust_ratio_mask=decay_and_adapt,
        momentum=optimizer_config.momentum)
  else:
    raise UserError(f"optimizer.name must be 'sgd' or 'lars', got {name!r}.")
  return optax.inject_hyperparams(make)(learning_rate=0.0)
