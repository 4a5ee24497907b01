"""care_jax: CARE (NeurIPS 2021) self-supervised pretraining in JAX/Flax."""
