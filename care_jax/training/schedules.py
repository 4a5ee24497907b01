"""Learning-rate and EMA schedules as pure functions of the global step, so a resumed run
computes exactly the values an uninterrupted one does (spec, "Optimisation" and
"Target update")."""
import jax.numpy as jnp
import optax


def learning_rate(base_lr: float, global_batch_size: int, warmup_steps: int,
                  total_steps: int) -> optax.Schedule:
  """base_lr x batch/256, linear warm-up from 1e-6, then cosine to 0 at `total_steps`."""
  peak = base_lr * global_batch_size / 256
  warmup_steps = min(warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=1e-6, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def target_decay(base_tau: float, total_steps: int) -> optax.Schedule:
  """tau(k) = 1 - (1 - base_tau) (cos(pi k / K) + 1) / 2: base_tau at 0, 1 at K."""

  def tau(step):
    progress = jnp.minimum(step / total_steps, 1.0)
    return 1.0 - (1.0 - base_tau) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0

  return tau
