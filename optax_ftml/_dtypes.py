"""Which dtypes :func:`optax_ftml.ftml` stores its state in and computes in,
and the largest gradient each can square."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def widest(*dtypes: Any) -> jnp.dtype:
  """The standard JAX promotion of ``dtypes``, whatever the promotion mode."""
  with jax.numpy_dtype_promotion("standard"):
    return jnp.result_type(*dtypes)


def real_dtype(dtype: Any) -> jnp.dtype:
  """The real counterpart of ``dtype`` (float32 for complex64)."""
  return jnp.finfo(dtype).dtype


def v_dtype(param_dtype: Any, state_dtype: jnp.dtype | None) -> jnp.dtype:
  """Of a parameter's real buffers ``v`` and ``d_prev``: ``state_dtype``, by
  default the parameter's real dtype, except float32 for float16."""
  if state_dtype is not None:
    return state_dtype
  if param_dtype == jnp.float16:
    # FTML's state leaves float16's range: (1 - b2) g**2 is subnormal for
    # |g| < 0.25 and 0 below 5e-3, d ~ |g| / lr overflows beyond 6.5e4.
    return jnp.dtype(jnp.float32)
  return real_dtype(param_dtype)


def z_dtype(param_dtype: Any, state_dtype: jnp.dtype | None) -> jnp.dtype:
  """Of a parameter's ``z``: ``v``'s, made complex for complex parameters."""
  real = v_dtype(param_dtype, state_dtype)
  if jnp.issubdtype(param_dtype, jnp.complexfloating):
    return widest(real, jnp.complex64)
  return real


def compute_dtype(param_dtype: Any, z_dtype: Any) -> jnp.dtype:
  """Of the weights, the gradient and ``z`` in the arithmetic: the widest of
  the parameter's and ``z``'s dtypes, and at least float32 (``v``, ``d`` and
  the step's scalars are in its real counterpart)."""
  return widest(param_dtype, z_dtype, jnp.float32)


@functools.cache
def gradient_bound(dtype: Any) -> np.ndarray:
  """The largest gradient component whose squared magnitude is finite.

  MXNet's kernel computes ``g * g``: beyond this bound it overflows, ``v``
  becomes infinite and the weights NaN. Within it, ``v_t`` (an average of
  the ``|g|**2`` seen, from ``v_0 = 0``) and ``v_t / (1 - b2**t)`` do not
  exceed the largest ``|g|**2`` but for rounding. For complex ``dtype`` the
  bound applies to each component: ``|g|**2 = re**2 + im**2``. 1.8e19 for
  float32 (the float below 2**64), 1.3e154 for float64; 1.3e19 for
  complex64.
  """
  real = real_dtype(dtype).type
  terms = real(2 if jnp.issubdtype(dtype, jnp.complexfloating) else 1)
  with np.errstate(over="ignore"):
    def finite(x):
      return bool(np.isfinite(terms * (x * x)))
    bound = np.sqrt(np.finfo(real).max / terms)
    while not finite(bound):
      bound = np.nextafter(bound, real(0))
    while finite(np.nextafter(bound, real(np.inf))):
      bound = np.nextafter(bound, real(np.inf))
  return bound
