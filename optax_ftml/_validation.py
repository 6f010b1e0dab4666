"""Checks of what :func:`optax_ftml.ftml` is built with and what it is given.

Bad input is refused with a ``TypeError`` or ``ValueError`` naming the
argument, when the optimizer is built (hyperparameters) or traced (trees,
shapes, dtypes), rather than turning into wrong numbers later.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _is_concrete_real(value: Any) -> bool:
  """Whether ``value`` is a Python or NumPy real number that can be checked."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_hyperparameter(name: str, value: Any, low: float, high: float,
                          high_open: bool, caller: str = "ftml") -> None:
  """Validates a concrete hyperparameter; traced or array values pass through.

  ``optax.inject_hyperparams`` hands the factory arrays (possibly traced), which
  must stay traceable, so only Python and NumPy scalars are checked here.
  """
  if isinstance(value, (bool, str, bytes)) or value is None:
    raise TypeError(f"{caller}: {name} must be a real number, got {value!r}.")
  if not _is_concrete_real(value):
    if not hasattr(value, "dtype"):
      raise TypeError(
          f"{caller}: {name} must be a real number or a scalar array, got"
          f" {type(value).__name__}.")
    return
  value = float(value)
  upper_ok = value < high if high_open else value <= high
  if not (low <= value and upper_ok):
    bracket = ")" if high_open else "]"
    raise ValueError(
        f"{caller}: {name} must be in [{low}, {high}{bracket}, got"
        f" {value!r}.")


def _check_beta(name: str, value: Any, caller: str) -> None:
  _check_hyperparameter(name, value, 0.0, 1.0, high_open=True, caller=caller)
  # The bias correction 1 - beta**t is computed in (at least) float32: a beta
  # that rounds to 1 there makes it 0 and every step divides by zero.
  if _is_concrete_real(value) and float(np.float32(value)) == 1.0:
    raise ValueError(
        f"{caller}: {name}={value!r} rounds to 1.0 in float32, which makes the"
        f" bias correction 1 - {name}**t zero; use {name} <= {1 - 2**-24}.")
  # optax.inject_hyperparams stores hyperparameters in the parameters' dtype
  # unless told otherwise: 0.999 is 1.0 in bfloat16, and the step 0/0.
  dtype = getattr(value, "dtype", None)
  if (dtype is not None and jnp.issubdtype(dtype, jnp.floating)
      and jnp.finfo(dtype).bits < 32):
    raise TypeError(
        f"{caller}: {name} arrives as a {jnp.dtype(dtype).name} array, which"
        f" cannot hold it (b2 = 0.999 is 1.0 in bfloat16, and the bias"
        f" correction 1 - {name}**t then divides by zero); this is what"
        " optax.inject_hyperparams does for half-precision parameters: pass"
        " it hyperparam_dtype=jnp.float32.")


def _check_learning_rate(value: Any, caller: str) -> None:
  if callable(value):
    return
  _check_hyperparameter("learning_rate", value, 0.0, float("inf"),
                        high_open=True, caller=caller)
  if _is_concrete_real(value) and float(value) == 0.0:
    raise ValueError(
        f"{caller}: a constant learning_rate must be > 0 (FTML's step divides by"
        " it); got 0. A schedule may reach 0: such a step leaves the"
        " parameters unchanged.")


def check_hyperparameters(learning_rate: Any, b1: Any, b2: Any, eps: Any, *,
                          caller: str = "ftml",
                          names: tuple[str, str, str] = ("b1", "b2", "eps")
                          ) -> None:
  """The checks of FTML's hyperparameters, with the names ``caller`` gives
  ``b1``, ``b2`` and ``eps``."""
  _check_learning_rate(learning_rate, caller)
  _check_beta(names[0], b1, caller)
  _check_beta(names[1], b2, caller)
  _check_hyperparameter(names[2], eps, 0.0, float("inf"), high_open=True,
                        caller=caller)


def check_arguments(learning_rate: Any, b1: Any, b2: Any, eps: Any,
                    state_dtype: Any, recompute_d_prev: Any) -> None:
  """The checks of :func:`ftml`'s arguments, when the optimizer is built."""
  check_hyperparameters(learning_rate, b1, b2, eps)
  if state_dtype is not None and not jnp.issubdtype(
      jax.dtypes.canonicalize_dtype(state_dtype), jnp.floating):
    raise TypeError(
        "ftml: state_dtype must be a real floating dtype, got"
        f" {jax.dtypes.canonicalize_dtype(state_dtype)}.")
  if not isinstance(recompute_d_prev, bool):
    raise TypeError(
        f"ftml: recompute_d_prev must be a bool, got {recompute_d_prev!r}.")


def check_params(params: optax.Params) -> None:
  """Parameters must be floating or complex: FTML's step divides by d_t."""
  def check(path, leaf):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise TypeError(
          f"ftml: parameter {jax.tree_util.keystr(path)} has dtype"
          f" {leaf.dtype}; FTML needs floating or complex parameters (exclude"
          " integer leaves with optax.masked or optax.multi_transform).")
  jax.tree_util.tree_map_with_path(check, params)


def check_update(params: optax.Params | None, gradients: optax.Updates,
                 buffers: tuple[optax.Updates, ...]) -> None:
  """``update``'s trees must all be shaped like the parameters.

  Mismatches would otherwise broadcast silently (e.g. a state restored for
  other parameters), so they are refused while tracing.
  """
  if params is None:
    raise ValueError(
        "ftml: update needs the current parameters: call"
        " update(grads, state, params). FTML's step depends on the weights.")
  treedef = jax.tree.structure(params)
  shapes = [jnp.shape(p) for p in jax.tree.leaves(params)]
  for name, tree in (("gradients", gradients),
                     *(("state", buffer) for buffer in buffers)):
    if jax.tree.structure(tree) != treedef:
      raise ValueError(
          f"ftml: the {name} tree does not match the parameters tree:"
          f" {jax.tree.structure(tree)} vs {treedef}.")
    tree_shapes = [jnp.shape(x) for x in jax.tree.leaves(tree)]
    if tree_shapes != shapes:
      raise ValueError(
          f"ftml: the {name} leaf shapes do not match the parameters' shapes:"
          f" {tree_shapes} vs {shapes}.")
