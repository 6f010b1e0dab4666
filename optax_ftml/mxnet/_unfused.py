"""MXNet 2's ``FTML.step``: the optimizer's NDArray arithmetic, not the kernel.

With ``use_fused_step=False`` MXNet 2 runs FTML as a sequence of NDArray
operations in Python. Each line rounds once in the weight dtype, as the fused
kernel does, but the scalars differ: ``1 - beta1``, ``1 - beta2``, the bias
correction ``1 - beta2**t`` and ``(1 - beta1**t) / lr`` are computed in
Python floats (double) and rounded once where they meet an array, where the
fused kernel computes them in float32 from float32 ``beta1``, ``beta2`` and
``lr``. At ``beta2 = 0.999`` that moves ``v`` and ``d`` by about 1.3e-5
relative (a hundred float32 ulps). So the per-step scalars are computed on
the host in double and tabulated per step, as the schedules' rates are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ftml import _dtypes
from optax_ftml._ftml import FTMLState
from optax_ftml.mxnet import _schedules


def _one_minus_power(beta: float, divisor: float, bits: int
                     ) -> Callable[[jax.Array], jax.Array]:
  """``float32((1 - beta**t) / divisor)`` computed in double, as a function
  of the traced 1-based step ``t``.

  Tabulated up to the step where ``beta**t < 2**-bits`` no longer changes the
  float32 value (then held); beyond the tables' limit, in float32.
  """
  last = 1 if beta == 0 else max(
      1, math.ceil(bits * math.log(2) / -math.log(beta)))
  log_beta = np.float32(math.log(beta) if beta > 0 else -np.inf)
  return _schedules.tabulated(
      lambda t: (1 - beta**t) / divisor, 1, last,
      lambda t: -jnp.expm1(t * log_beta) / np.float32(divisor))


class _Scalars(NamedTuple):
  """One step's scalars, float32 as they meet the arrays."""

  beta1: Any
  beta2: Any
  one_minus_beta1: Any
  one_minus_beta2: Any
  bias_correction2: jax.Array
  """``1 - beta2**t``."""
  d_scale: jax.Array
  """``(1 - beta1**t) / lr``, and 0 where ``lr = 0``."""
  epsilon: Any


def _leaf_step(param: jax.Array, grad: jax.Array, v: jax.Array, z: jax.Array,
               d_prev: jax.Array, s: _Scalars
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``FTML.step`` for one parameter, line by line; later lines read ``v``
  and ``z`` as stored. A zero ``d_t`` (learning rate 0) is a step of 0 with
  ``z = 0``, as in :func:`optax_ftml.ftml`."""
  compute = _dtypes.compute_dtype(param.dtype, z.dtype)
  real = _dtypes.real_dtype(compute)
  weight, g = param.astype(compute), grad.astype(compute)

  def like_weight(x):  # real -> complex
    return jnp.asarray(x, real).astype(compute)

  v_new = (v.astype(real) * s.beta2 + s.one_minus_beta2 * jnp.real(
      g * jnp.conj(g))).astype(v.dtype)
  d_t = (jnp.sqrt(v_new.astype(real) / s.bias_correction2) + s.epsilon
         ) * s.d_scale
  sigma = -s.beta1 * d_prev.astype(real) + d_t
  frozen = d_t == 0
  z_new = jnp.where(frozen, 0, (
      z.astype(compute) * like_weight(s.beta1)
      + like_weight(s.one_minus_beta1) * g) - sigma.astype(compute) * weight
                    ).astype(z.dtype)
  step = jnp.where(frozen, 0, -z_new.astype(compute) / d_t.astype(compute)
                   - weight)
  return (step.astype(param.dtype), v_new, z_new, d_t.astype(d_prev.dtype))


def ftml_step(learning_rate: optax.ScalarOrSchedule, beta1: float,
              beta2: float, epsilon: float,
              init: optax.TransformInitFn
              ) -> optax.GradientTransformationExtraArgs:
  """MXNet 2's ``FTML.step`` after the gradient pre-processing.

  ``learning_rate`` is a Python float (MXNet's ``lr * lr_mult``, kept in
  double) or, traced or scheduled (the schedule already in MXNet's
  convention), a float32 value by which the tabulated ``1 - beta1**t`` is
  divided in float32. ``init`` gives the state (:func:`optax_ftml.ftml`'s,
  whose buffers this step shares).
  """
  constant = isinstance(learning_rate, float)
  d_scale = _one_minus_power(beta1, learning_rate if constant else 1.0, 54)
  bias_correction2 = _one_minus_power(beta2, 1.0, 26)
  f32 = np.float32

  def scalars(count: jax.Array) -> _Scalars:
    t = count + 1
    scale = d_scale(t)
    if not constant:
      rate = jnp.asarray(learning_rate(count) if callable(learning_rate)
                         else learning_rate, jnp.float32)
      positive = (rate > 0) & (rate < jnp.inf)
      scale = jnp.where(positive, scale / jnp.where(positive, rate, 1),
                        jnp.where(rate == 0, 0, jnp.nan))
    return _Scalars(f32(beta1), f32(beta2), f32(1.0 - beta1),
                    f32(1.0 - beta2), bias_correction2(t), scale,
                    jnp.asarray(epsilon, jnp.float32))

  def update_fn(updates: optax.Updates, state: optax.OptState,
                params: optax.Params | None = None, **extra_args: Any
                ) -> tuple[optax.Updates, optax.OptState]:
    del extra_args
    if not isinstance(state, FTMLState) or params is None:
      raise TypeError(
          "mxnet.ftml: update needs params and the FTMLState init returned.")
    s = scalars(state.count)
    leaves, tree = jax.tree.flatten(params)
    steps = [_leaf_step(param, grad, v, z, d_prev, s)
             for param, grad, v, z, d_prev in zip(
                 leaves, *map(tree.flatten_up_to,
                              (updates, state.v, state.z, state.d_prev)),
                 strict=True)]
    out = [tree.unflatten([step[i] for step in steps]) for i in range(4)]
    count = jnp.asarray(optax.safe_increment(state.count))
    return out[0], FTMLState(count, out[1], out[2], out[3])

  return optax.GradientTransformationExtraArgs(init, update_fn)
