"""moe-jax: Mixture-of-Experts routing research in JAX/Flax."""
