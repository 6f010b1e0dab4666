"""Strict numerics for every test: no silent dtype promotion or rank broadcasting."""

import os

# Eight CPU devices for the sharding tests; must precede JAX's initialisation.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
