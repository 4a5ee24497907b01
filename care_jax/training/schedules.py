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
  # Written as init + slope * step (not optax.linear_schedule's end-relative form) so that
  # step 0 gives exactly 1e-6 in float32.
  warmup = lambda step: 1e-6 + (peak - 1e-6) * step / max(warmup_steps, 1)
  cosine = optax.cosine_decay_schedule(peak, decay_steps=max(total_steps - warmup_steps, 1))
  return optax.join_schedules([warmup, cosine], boundaries=[warmup_steps])


def target_decay(base_tau: float, total_steps: int) -> optax.Schedule:
  """tau(k) = 1 - (1 - base_tau) (cos(pi k / K) + 1) / 2: base_tau at 0, 1 at K."""

  def tau(step):
    progress = jnp.minimum(step / total_steps, 1.0)
    return 1.0 - (1.0 - base_tau) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0

  return tau
