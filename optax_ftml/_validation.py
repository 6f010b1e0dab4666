"""Checks of what :func:`optax_ftml.ftml` and :func:`optax_ftml.mxnet.ftml`
are built with and given.

One path for both: bad input is refused with a ``TypeError`` or
``ValueError`` naming the argument as the caller wrote it and the allowed
range, when the optimizer is built (hyperparameters: Python numbers, NumPy
and concrete JAX scalars alike) or traced (the parameters', gradients' and
state's trees, shapes and dtypes), rather than turning into wrong numbers
later. Traced hyperparameters (under ``jit``, ``optax.inject_hyperparams``)
pass unchanged; a rate that is not a non-negative number when the step runs
makes that step's update NaN (see ``_ftml._StepScalars``).

FTML computes in at least float32, so every hyperparameter, and every
product of them the kernel forms, must be finite in float32 (the divisor
``learning_rate`` a normal number: XLA:CPU flushes smaller ones to zero).
"""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Callable
from typing import Any
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ftml import _dtypes

_LARGEST = float(np.finfo(np.float32).max)
_SMALLEST_NORMAL = float(np.finfo(np.float32).smallest_normal)
# The dtypes FTML's arithmetic supports (float8 and integers it does not).
_SUPPORTED = tuple(map(jnp.dtype, (jnp.float16, jnp.bfloat16, jnp.float32,
                                   jnp.float64, jnp.complex64,
                                   jnp.complex128)))
_REAL_STATE = _SUPPORTED[:4]
_State = TypeVar("_State")
# Gradients are limited to it, so sqrt(v / (1 - b2**t)) never exceeds it.
_FLOAT32_GRADIENT_BOUND = float(_dtypes.gradient_bound(np.float32))


def real_scalar_unless_traced(value: Any, name: str, caller: str) -> float | None:
  """A hyperparameter's value as a float, or None while it is traced.

  Python and NumPy numbers and 0-d real arrays (NumPy or JAX, concrete or
  traced) are accepted; booleans, strings, sequences, complex numbers and
  arrays of other shapes are refused.
  """
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{caller}: {name} must be a real number, got {value!r}.")
  if isinstance(value, numbers.Real):
    return float(value)
  dtype, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
  if dtype is None or shape is None:
    raise TypeError(
        f"{caller}: {name} must be a real number or a 0-d array, got"
        f" {reprlib.repr(value)} ({type(value).__name__}).")
  if tuple(shape) != ():
    raise TypeError(
        f"{caller}: {name} must be a scalar (one value for every element),"
        f" got an array of shape {tuple(shape)}.")
  if not (jnp.issubdtype(dtype, jnp.floating)
          or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(
        f"{caller}: {name} must be a real number, got an array of dtype"
        f" {jnp.dtype(dtype)}.")
  try:
    return float(value)
  except jax.errors.ConcretizationTypeError:  # traced
    return None


def _in_float32(x: float) -> float:
  with np.errstate(over="ignore"):
    return float(np.float32(x))


def check_finite(value: float, name: str, caller: str) -> None:
  """``value`` must be finite in float32, the narrowest arithmetic."""
  if not np.isfinite(_in_float32(value)):
    raise ValueError(
        f"{caller}: {name} must be finite in float32 (|{name}| <="
        f" {_LARGEST:.4g}), got {value!r}.")


def check_range(value: float, name: str, caller: str, low: float,
                high: float, *, high_open: bool = False) -> None:
  """``low <= value <= high`` (``< high`` if ``high_open``), and finite."""
  upper_ok = value < high if high_open else value <= high
  if not (low <= value and upper_ok):
    bracket = ")" if high_open else "]"
    raise ValueError(
        f"{caller}: {name} must be in [{low:g}, {high:g}{bracket}, got"
        f" {value!r}.")
  check_finite(value, name, caller)


def _check_beta(value: Any, name: str, caller: str) -> float | None:
  # optax.inject_hyperparams stores hyperparameters in the parameters' dtype
  # unless told otherwise: 0.999 is 1.0 in bfloat16, and the step 0/0.
  dtype = None if isinstance(value, numbers.Real) else getattr(
      value, "dtype", None)
  if (dtype is not None and jnp.issubdtype(dtype, jnp.floating)
      and jnp.finfo(dtype).bits < 32):
    raise TypeError(
        f"{caller}: {name} arrives as a {jnp.dtype(dtype).name} array, which"
        f" cannot hold it (b2 = 0.999 is 1.0 in bfloat16, and the bias"
        f" correction 1 - {name}**t then divides by zero); this is what"
        " optax.inject_hyperparams does for half-precision parameters: pass"
        " it hyperparam_dtype=jnp.float32.")
  beta = real_scalar_unless_traced(value, name, caller)
  if beta is None:
    return None
  check_range(beta, name, caller, 0.0, 1.0, high_open=True)
  # The bias correction 1 - beta**t is computed in (at least) float32: a beta
  # that rounds to 1 there makes it 0 and every step divides by zero.
  if _in_float32(beta) == 1.0:
    raise ValueError(
        f"{caller}: {name}={value!r} rounds to 1.0 in float32, which makes the"
        f" bias correction 1 - {name}**t zero; use {name} <= {1 - 2**-24}.")
  return beta


def check_learning_rate(value: Any, name: str, caller: str,
                        b1: float | None = None) -> float | None:
  """A constant learning rate (a schedule is checked only by its values when
  steps run): positive, with ``(1 - b1**t) / learning_rate`` a normal
  float32 number at every step. Arrays may be 0 (``inject_hyperparams``
  passes a schedule's values this way; such a step is a no-op)."""
  if callable(value):
    return None
  rate = real_scalar_unless_traced(value, name, caller)
  if rate is None:
    return None
  if rate == 0 and isinstance(value, numbers.Real):
    raise ValueError(
        f"{caller}: a constant {name} must be > 0 (FTML's step divides by"
        " it), got 0. A schedule may reach 0: such a step leaves the"
        " parameters unchanged.")
  if not rate >= 0:  # NaN included
    raise ValueError(
        f"{caller}: {name} must be a positive number, got {value!r}.")
  # The largest rate whose first step's (1 - b1) / learning_rate is a normal
  # float32 number (XLA:CPU flushes subnormals to 0, which freezes the step).
  largest = (1 - _in_float32(b1 or 0.0)) / _SMALLEST_NORMAL
  divisor = f"({name})" if " " in name else name
  if not (rate == 0 or _SMALLEST_NORMAL <= rate <= largest):
    raise ValueError(
        f"{caller}: {name} must be from {_SMALLEST_NORMAL:.4g} to"
        f" {largest:.4g}{'' if b1 is None else f' (with b1 = {b1:g})'}, got"
        f" {value!r}: outside, (1 - b1**t) / {divisor} rounds to 0 or"
        " overflows in float32, and the steps do nothing or turn NaN.")
  return rate


def check_hyperparameters(learning_rate: Any, b1: Any, b2: Any, eps: Any, *,
                          caller: str = "ftml",
                          names: tuple[str, str, str, str] = (
                              "learning_rate", "b1", "b2", "eps")) -> None:
  """FTML's hyperparameters, with the names ``caller`` gives them."""
  beta1 = _check_beta(b1, names[1], caller)
  _check_beta(b2, names[2], caller)
  epsilon = real_scalar_unless_traced(eps, names[3], caller)
  if epsilon is not None:
    check_range(epsilon, names[3], caller, 0.0, float("inf"), high_open=True)
  rate = check_learning_rate(learning_rate, names[0], caller, beta1)
  if not rate or epsilon is None:
    return
  # d_t <= (sqrt(v / (1 - b2**t)) + eps) / learning_rate, and the root is at
  # most the gradient bound: d_t must stay finite in float32 (else the
  # weights turn NaN) for every gradient the kernel accepts.
  if (_FLOAT32_GRADIENT_BOUND + epsilon) / rate <= _LARGEST:
    return
  lr_name, eps_name = names[0], names[3]
  if epsilon > _FLOAT32_GRADIENT_BOUND:
    raise ValueError(
        f"{caller}: {eps_name} must be at most"
        f" {rate * _LARGEST - _FLOAT32_GRADIENT_BOUND:.4g} with {lr_name} ="
        f" {rate:g}, got {eps!r}: above it d_t = (|g| + {eps_name}) /"
        f" {lr_name} overflows float32.")
  raise ValueError(
      f"{caller}: {lr_name} must be at least"
      f" {(_FLOAT32_GRADIENT_BOUND + epsilon) / _LARGEST:.4g}, got"
      f" {learning_rate!r}: below it d_t = (|g| + {eps_name}) / {lr_name}"
      " overflows float32 for the largest gradients the kernel accepts"
      f" (|g| up to {_FLOAT32_GRADIENT_BOUND:.4g}).")


def check_state_dtype(state_dtype: Any) -> jnp.dtype | None:
  """``ftml``'s ``state_dtype``: None or a real floating dtype FTML supports."""
  if state_dtype is None:
    return None
  try:
    dtype = jax.dtypes.canonicalize_dtype(state_dtype)
  except (TypeError, ValueError):
    dtype = None
  # (Not `dtype not in ...`: NumPy takes None for float64 in comparisons.)
  if dtype is None or dtype not in _REAL_STATE:
    raise TypeError(
        "ftml: state_dtype must be None or one of float32, float64, bfloat16"
        f" and float16, got {reprlib.repr(state_dtype) if dtype is None else dtype}.")
  return dtype


def check_arguments(learning_rate: Any, b1: Any, b2: Any, eps: Any,
                    state_dtype: Any, recompute_d_prev: Any) -> jnp.dtype | None:
  """:func:`ftml`'s arguments, when the optimizer is built; returns the
  canonical ``state_dtype``."""
  check_hyperparameters(learning_rate, b1, b2, eps)
  if not isinstance(recompute_d_prev, bool):
    raise TypeError(
        f"ftml: recompute_d_prev must be a bool, got {recompute_d_prev!r}.")
  return check_state_dtype(state_dtype)


def _leaf_name(tree_name: str, path: Any) -> str:
  return tree_name + jax.tree_util.keystr(path)


def check_params(params: optax.Params) -> None:
  """Parameters must be arrays of a floating or complex dtype FTML's
  arithmetic supports: its step divides by ``d_t``."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = _leaf_name("params", path)
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or getattr(leaf, "shape", None) is None:
      raise TypeError(
          f"ftml: {name} is a {type(leaf).__name__}, not an array; pass"
          " parameters as arrays (e.g. jnp.asarray(...)).")
    if dtype in _SUPPORTED:
      continue
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"ftml: {name} has dtype {dtype}; FTML needs floating or complex"
          " parameters (exclude integer leaves with optax.masked or"
          " optax.multi_transform).")
    raise TypeError(
        f"ftml: {name} has dtype {dtype}, which FTML's arithmetic does not"
        " support; use float32, float64, bfloat16, float16, complex64 or"
        " complex128 (e.g. a float32 master copy of float8 weights).")


def check_state(state: Any, state_type: type[_State],
                recompute_d_prev: bool) -> _State:
  """``state`` must be the ``state_type`` that ``init`` returns (its fields
  are checked by :func:`check_update`)."""
  if not isinstance(state, state_type):
    raise TypeError(
        f"ftml: state must be the {state_type.__name__} that init returns"
        f" (with recompute_d_prev={recompute_d_prev}), got"
        f" {type(state).__name__}.")
  return state


def _check_trees(params: optax.Params, trees: dict[str, Any]) -> None:
  """Each of ``trees`` has the parameters' tree structure and leaf shapes."""
  treedef = jax.tree.structure(params)
  shapes = [jnp.shape(p) for p in jax.tree.leaves(params)]
  for name, tree in trees.items():
    if jax.tree.structure(tree) != treedef:
      raise ValueError(
          f"ftml: the {name} tree does not match the parameters tree:"
          f" {jax.tree.structure(tree)} vs {treedef}.")
    tree_shapes = [jnp.shape(x) for x in jax.tree.leaves(tree)]
    if tree_shapes != shapes:
      raise ValueError(
          f"ftml: the {name} leaf shapes do not match the parameters' shapes:"
          f" {tree_shapes} vs {shapes}.")


def _leaves_with_params(name: str, tree: Any, params: optax.Params):
  """``(leaf name, leaf dtype, parameter)`` of each leaf of ``tree``."""
  return [(_leaf_name(name, path), jnp.result_type(leaf), param)
          for (path, leaf), param in zip(
              jax.tree_util.tree_leaves_with_path(tree),
              jax.tree.leaves(params), strict=True)]


def _check_gradient_dtypes(params: optax.Params, gradients: Any) -> None:
  """Gradients are floating, complex only for complex parameters."""
  for name, dtype, param in _leaves_with_params("gradients", gradients, params):
    if dtype not in _SUPPORTED or (
        jnp.issubdtype(dtype, jnp.complexfloating)
        and not jnp.issubdtype(param.dtype, jnp.complexfloating)):
      raise TypeError(
          f"ftml: {name} has dtype {dtype} for parameters of dtype"
          f" {param.dtype}; gradients must be floating (complex only for"
          " complex parameters).")


def _check_buffer_dtypes(params: optax.Params, buffers: dict[str, Any],
                         dtypes: Callable[[Any], tuple[Any, ...]]) -> None:
  """Each state buffer in the dtype ``init`` gives it: ``dtypes(param
  dtype)``, in the order of ``buffers``."""
  for index, (name, tree) in enumerate(buffers.items()):
    for leaf_name, dtype, param in _leaves_with_params(name, tree, params):
      expected = dtypes(param.dtype)[index]
      if dtype != expected:
        raise TypeError(
            f"ftml: {leaf_name} has dtype {dtype} where init makes {expected}"
            f" for {param.dtype} parameters: a state for other parameters or"
            " another state_dtype?")


def _check_count(count: Any) -> None:
  """A non-negative int32 scalar (only its type and shape while traced)."""
  if jnp.result_type(count) != jnp.int32 or jnp.shape(count) != ():
    raise TypeError(
        f"ftml: state.count must be an int32 scalar, got"
        f" {jnp.result_type(count)} of shape {jnp.shape(count)}.")
  try:
    negative = int(count) < 0
  except jax.errors.ConcretizationTypeError:  # traced
    return
  if negative:
    raise ValueError(f"ftml: state.count must be >= 0, got {int(count)}.")


def _check_prev_learning_rate(rate: Any, dtype: jnp.dtype) -> None:
  """The lean state's learning rate: a scalar of ``dtype``."""
  if jnp.shape(rate) != () or jnp.result_type(rate) != dtype:
    raise TypeError(
        "ftml: state.prev_learning_rate must be a scalar of dtype"
        f" {dtype}, got {jnp.result_type(rate)} of shape {jnp.shape(rate)}.")


def check_update(params: optax.Params | None, gradients: optax.Updates,
                 state: Any, dtypes: Callable[[Any], tuple[Any, ...]],
                 rate_dtype: Callable[[optax.Params], jnp.dtype]
                 ) -> tuple[optax.Updates, ...]:
  """``update``'s inputs, given the state :func:`check_state` passed: trees
  shaped like the parameters, gradients of the parameters' kind, each state
  buffer in the dtype ``init`` gives it (``dtypes(param_dtype)``: of ``v``,
  ``z`` and ``d_prev``), the count a non-negative int32 scalar and the lean
  state's learning rate of ``rate_dtype(params)``. Returns the state's
  per-parameter buffers: ``(v, z, d_prev)``, or ``(v, z)`` for the lean
  state.

  Mismatches would otherwise broadcast or promote silently (e.g. a state
  restored for other parameters), so they are refused while tracing.
  """
  if params is None:
    raise ValueError(
        "ftml: update needs the current parameters: call"
        " update(grads, state, params). FTML's step depends on the weights.")
  check_params(params)
  buffers = {f"state.{name}": getattr(state, name)
             for name in ("v", "z", "d_prev") if name in state._fields}
  _check_trees(params, {"gradients": gradients, **buffers})
  _check_gradient_dtypes(params, gradients)
  _check_buffer_dtypes(params, buffers, dtypes)
  _check_count(state.count)
  if "prev_learning_rate" in state._fields:
    _check_prev_learning_rate(state.prev_learning_rate, rate_dtype(params))
  return tuple(buffers.values())
