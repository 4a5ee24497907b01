"""One CARE update: both views through both networks, the loss, SGD/LARS, the EMA target.

`train_step` is pure: everything it needs is in the state or bound by `make_train_step`.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from care_jax import objectives, parallel
from care_jax.training.state import TrainState, target_subtree


def apply_to_views(net, params, stats, views, mesh=None):
  """Runs `net` on both views as separate BatchNorm batches, each device on its examples.

  `views` is [2, batch, ...] with the batch sharded over `mesh` (default: one device);
  `net` must have been built with axis_name=parallel.DATA_AXIS (create_networks), so its
  BatchNorms take the global statistics. The release calls its encoder once per view, so
  each view is its own BN batch and the running statistics are updated twice in a row.
  Here each device passes its examples of both views through the network at once, as one
  batch of two views (layers.GroupedBatchNorm): one graph, and every convolution on twice
  the examples.
  """
  mesh = parallel.create_mesh(jax.devices()[:1]) if mesh is None else mesh
  if net.axis_name != parallel.DATA_AXIS:
    raise ValueError(f"apply_to_views needs a network built with axis_name="
                     f"{parallel.DATA_AXIS!r} (create_networks): its BatchNorms would "
                     "otherwise normalise each device's examples alone.")

  def on_device(params, stats, views):
    both = views.reshape(-1, *views.shape[2:])  # view 0's examples, then view 1's
    outputs, new = net.apply({"params": params, "batch_stats": stats}, both, train=True,
                             views=len(views), mutable=["batch_stats"])
    outputs = jax.tree.map(lambda a: a.reshape(len(views), -1, *a.shape[1:]), outputs)
    return outputs, new["batch_stats"]

  views_spec = P(None, parallel.DATA_AXIS)
  return parallel.per_device(on_device, mesh, in_specs=(P(), P(), views_spec),
                             out_specs=(views_spec, P()))(params, stats, views)


def _split_views(outputs):
  return ({k: v[0] for k, v in outputs.items()}, {k: v[1] for k, v in outputs.items()})


def care_objective(online_params, target_params, online_stats, target_stats, views, *,
                   online_net, target_net, cross_weight: float, mesh=None):
  """(loss, (terms, new online stats, new target stats, online pooled features [2, B, D]))
  for views [2, batch, H, W, C].

  A function of both parameter sets so tests can show where gradients go; the train step
  differentiates it with respect to the online parameters only.
  """
  # The target sees the other view (spec, "Objective"): k_1 = target(x2), k_2 = target(x1).
  target_out, target_stats = apply_to_views(target_net, target_params, target_stats,
                                            views[::-1], mesh)
  online_out, online_stats = apply_to_views(online_net, online_params, online_stats, views,
                                            mesh)
  (out_1, out_2), (target_1, target_2) = _split_views(online_out), _split_views(target_out)
  loss, terms = objectives.care_loss(out_1, out_2, target_1, target_2, cross_weight)
  return loss, (terms, online_stats, target_stats, online_out["features"])


def train_step(state: TrainState, views, labels=None, *, online_net, target_net, optimizer,
               lr_fn, tau_fn, cross_weight: float, probe=None, mesh=None):
  """One step, data-parallel over `mesh` (default: one device). With `probe` (an
  online_probe.OnlineProbe) and the batch's labels, the online probe also takes a step on
  the first view's stop-gradient features."""
  loss_fn = functools.partial(
      care_objective, target_params=state.target_params, online_stats=state.online_stats,
      target_stats=state.target_stats, views=jnp.stack(views), online_net=online_net,
      target_net=target_net, cross_weight=cross_weight, mesh=mesh)

  if state.loss_scale is None:
    (_, (terms, online_stats, target_stats, features)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.online_params)
    loss_scale, finite = None, jnp.array(True)
  else:
    loss_scale, finite, (_, (terms, online_stats, target_stats, features)), grads = (
        state.loss_scale.value_and_grad(loss_fn, has_aux=True)(state.online_params))

  lr = lr_fn(state.step)
  # Target update with tau of the next step: the release updates the target at the start of
  # iteration k+1 from the online weights after step k, with tau(k+1).
  tau = tau_fn(state.step + 1)

  def update(grads, online_stats, target_stats):
    """The new (online params, online stats, target params, target stats, opt state)."""
    opt_state = state.opt_state._replace(hyperparams={
        **state.opt_state.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)})
    updates, opt_state = optimizer.update(grads, opt_state, state.online_params)
    online_params = optax.apply_updates(state.online_params, updates)
    target_params = optax.incremental_update(target_subtree(online_params),
                                             state.target_params, 1.0 - tau)
    return online_params, online_stats, target_params, target_stats, opt_state

  if loss_scale is None:
    parts = update(grads, online_stats, target_stats)
  else:
    # An overflowed float16 step changes nothing but the loss scale (and the step counter,
    # so the data stream and schedules stay on time). One conditional, not a select per
    # state leaf: XLA copied `finite`'s chain of per-leaf checks into every select (N^2
    # operations for N leaves), which tripled the step's compilation time.
    unchanged = lambda *_: (state.online_params, state.online_stats, state.target_params,
                            state.target_stats, state.opt_state)
    parts = jax.lax.cond(finite, update, unchanged, grads, online_stats, target_stats)
  online_params, online_stats, target_params, target_stats, opt_state = parts
  new_state = state.replace(
      step=state.step + 1, online_params=online_params, online_stats=online_stats,
      target_params=target_params, target_stats=target_stats, opt_state=opt_state,
      loss_scale=loss_scale)
  metrics = dict(terms, learning_rate=lr, tau=tau, grad_norm=optax.global_norm(grads),
                 skipped_step=1 - finite.astype(jnp.int32))
  if loss_scale is not None:
    metrics["loss_scale"] = loss_scale.scale
  if probe is not None:
    new_probe, probe_metrics = probe.update(state.probe, features[0], labels)
    new_probe = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_probe, state.probe)
    new_state = new_state.replace(probe=new_probe)
    metrics.update(probe_metrics)
  return new_state, metrics


def make_train_step(*, online_net, target_net, optimizer, lr_fn, tau_fn, cross_weight,
                    probe=None):
  return functools.partial(train_step, online_net=online_net, target_net=target_net,
                           optimizer=optimizer, lr_fn=lr_fn, tau_fn=tau_fn,
                           cross_weight=cross_weight, probe=probe)
