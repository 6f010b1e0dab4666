"""Which dtypes :func:`optax_ftml.ftml` stores its state in and computes in."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp


def _promote(*dtypes: Any) -> jnp.dtype:
  """The standard JAX promotion of ``dtypes``, whatever the promotion mode."""
  with jax.numpy_dtype_promotion("standard"):
    return jnp.result_type(*dtypes)


def real_dtype(dtype: Any) -> jnp.dtype:
  """The real counterpart of ``dtype`` (float32 for complex64)."""
  return jnp.finfo(dtype).dtype


def canonical_state_dtype(state_dtype: Any) -> jnp.dtype | None:
  return None if state_dtype is None else jax.dtypes.canonicalize_dtype(
      state_dtype)


class StorageDtypes(NamedTuple):
  """Dtypes of one parameter's state buffers."""

  z: jnp.dtype
  """Of ``z``: complex for complex parameters."""
  v: jnp.dtype
  """Of the real buffers ``v`` and ``d_prev``."""

  @classmethod
  def of(cls, param_dtype: Any, state_dtype: jnp.dtype | None
         ) -> StorageDtypes:
    """The state dtypes for a parameter: by default the parameter's own."""
    if state_dtype is None:
      if param_dtype == jnp.float16:
        # FTML's state leaves float16's range: (1 - b2) g**2 is subnormal for
        # |g| < 0.25 and 0 below 5e-3, d ~ |g| / lr overflows beyond 6.5e4.
        return cls(jnp.dtype(jnp.float32), jnp.dtype(jnp.float32))
      return cls(jnp.dtype(param_dtype), real_dtype(param_dtype))
    if jnp.issubdtype(param_dtype, jnp.complexfloating):
      return cls(_promote(state_dtype, jnp.complex64), state_dtype)
    return cls(state_dtype, state_dtype)


class Precision(NamedTuple):
  """One parameter's dtypes in the step: its arithmetic and its storage."""

  compute: jnp.dtype
  """Of the weights, the gradient and ``z`` in the arithmetic: the widest of
  the parameter's and ``z``'s dtypes, and at least float32."""
  real: jnp.dtype
  """Of ``v``, ``d`` and the step's scalars in the arithmetic."""
  stored: StorageDtypes

  @classmethod
  def of(cls, param_dtype: Any, stored: StorageDtypes) -> Precision:
    compute = _promote(param_dtype, stored.z, jnp.float32)
    return cls(compute, real_dtype(compute), stored)

  def stored_v(self, v: jax.Array) -> jax.Array:
    """``v`` as the state stores it, read back for the arithmetic."""
    return v.astype(self.stored.v).astype(self.real)

  def stored_z(self, z: jax.Array) -> jax.Array:
    """``z`` as the state stores it, read back for the arithmetic."""
    return z.astype(self.stored.z).astype(self.compute)


def widest_real(precisions: list[Precision]) -> jnp.dtype:
  """The widest real arithmetic dtype of all parameters (at least float32)."""
  return _promote(jnp.float32, *(p.real for p in precisions))
