"""Follow the Moving Leader (FTML), as computed by Apache MXNet's ``ftml_update``.

References:
  Zheng and Kwok, `Follow the Moving Leader in Deep Learning
  <http://proceedings.mlr.press/v70/zheng17a/zheng17a.pdf>`_, ICML 2017.

  Apache MXNet, ``mxnet.optimizer.FTML`` and the fused kernel ``ftml_update``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ftml import _dtypes
from optax_ftml import _validation


class FTMLState(NamedTuple):
  """State of :func:`ftml`."""

  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
  """Number of updates applied so far (``int32``, saturating); the kernel's
  1-based step ``t`` is ``count + 1``."""
  v: optax.Updates
  """Exponential moving average of the squared gradient magnitude (real)."""
  z: optax.Updates
  """FTML's linear term (the moving leader is ``-z / d_prev``)."""
  d_prev: optax.Updates
  """The diagonal ``d_{t-1}`` of the previous step (real)."""


class FTMLLeanState(NamedTuple):
  """State of :func:`ftml` with ``recompute_d_prev=True``: Adam's memory."""

  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
  """Number of updates applied so far (``int32``, saturating)."""
  v: optax.Updates
  """Exponential moving average of the squared gradient magnitude (real)."""
  z: optax.Updates
  """FTML's linear term (the moving leader is ``-z / d_prev``)."""
  prev_learning_rate: jax.Array
  """The learning rate of the previous step (0 before the first), from which
  and ``v`` the previous diagonal ``d_prev`` is recomputed."""


class _StepScalars(NamedTuple):
  """The scalars of one step, in one real dtype.

  MXNet evaluates them per element in the weight dtype; they depend only on
  the step, so computing them once per step gives the same roundings.
  """

  beta1: jax.Array
  beta2: jax.Array
  one_minus_beta1: jax.Array
  one_minus_beta2: jax.Array
  d_scale: jax.Array
  """``(1 - b1**t) / lr``, and 0 where ``lr = 0``."""
  inv_bias2: jax.Array
  """``1 / (1 - b2**t)``, and 0 where ``t = 0`` (so that ``d_0 = 0``)."""
  eps: jax.Array

  @classmethod
  def at(cls, t: jax.Array, lr: Any, b1: Any, b2: Any, eps: Any,
         real: Any) -> _StepScalars:
    """The scalars of the 1-based step ``t`` with learning rate ``lr``."""
    first = t == 0
    t = t.astype(real)
    # Python numbers would be compile-time constants, which XLA folds into the
    # scalars with other roundings (pow, division by a constant) than the
    # kernel's: the barrier makes them computed as for traced values, so a
    # rate or beta given as a float, an injected or a traced array steps
    # alike, bit for bit.
    beta1, beta2, rate, eps = jax.lax.optimization_barrier(tuple(
        jnp.asarray(x, real) for x in (b1, b2, lr, eps)))
    # As lr -> 0, d_t -> inf and the step vanishes, while z_t + d_t w_t = 0
    # (all the next step uses of z_t and d_t): the limit state is
    # z_t = d_t = 0. Taking d_t = 0 here leads there.
    # A rate that is not a non-negative number (a schedule's or an injected
    # value) makes the step NaN rather than a silent ascent or no-op.
    positive = (rate > 0) & (rate < jnp.inf)
    d_scale = jnp.where(positive, (1 - beta1**t) / jnp.where(positive, rate, 1),
                        jnp.where(rate == 0, 0, jnp.nan))
    inv_bias2 = jnp.where(first, 0, 1 / (1 - beta2**t))
    return cls(beta1, beta2, 1 - beta1, 1 - beta2, d_scale, inv_bias2, eps)


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
  real = _dtypes.real_dtype(dtype).type
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


def _limited(g: jax.Array) -> jax.Array:
  """``g`` with finite components limited to :func:`gradient_bound`.

  A larger finite gradient would overflow ``v`` and turn that element's
  state into NaN for good, unseen by ``optax.apply_if_finite`` (which checks
  the incoming gradients). Infinities pass: like NaN, they propagate as in
  every Optax optimizer.
  """
  bound = gradient_bound(g.dtype)

  def limit(x):
    return jax.lax.select(jnp.abs(x) == jnp.inf, x,
                          jax.lax.clamp(-bound, x, bound))

  if jnp.iscomplexobj(g):
    return jax.lax.complex(limit(g.real), limit(g.imag))
  return limit(g)


def _bias_corrected(v: jax.Array, s: _StepScalars) -> jax.Array:
  """``v / (1 - b2**t)``, and at most the largest finite number if ``v`` is.

  XLA turns a division by a broadcast scalar into this product; writing it
  out makes every computation of ``d_t`` round the same way. Near the
  gradient bound the result can round above the largest finite number (by
  the rounding of ``1 - b2**t``: up to 3e-5 relative for b2 = 0.999 in
  float32), where MXNet's weights become NaN. Two comparisons and a select,
  rather than ``jnp.minimum``, whose NaN handling costs five vector
  instructions per ``d_t`` (a tenth of the bfloat16 step).
  """
  corrected = v * s.inv_bias2
  overflowed = (corrected == jnp.inf) & (v < jnp.inf)
  return jax.lax.select(overflowed, jnp.full_like(v, jnp.finfo(v.dtype).max),
                        corrected)


def _zero_where(condition: jax.Array, x: jax.Array) -> jax.Array:
  """``jnp.where(condition, 0, x)`` as one primitive."""
  return jax.lax.select(condition, jnp.zeros_like(x), x)


# MXNet's FTMLKernel, line by line. ``weight``, ``grad`` and ``z`` are in the
# arithmetic's dtype, ``v`` and ``d`` in its real counterpart; ``d_t = 0`` (a
# zero learning rate, or eps = 0 with only zero gradients so far) is a step
# of 0 with z = 0, which keeps z + d_t w = 0.


def next_v(v: jax.Array, grad: jax.Array, s: _StepScalars) -> jax.Array:
  """``v = beta2 * v + (1 - beta2) * |g|**2``."""
  return s.beta2 * v + s.one_minus_beta2 * jnp.real(grad * jnp.conj(grad))


def diagonal(v: jax.Array, s: _StepScalars) -> jax.Array:
  """``d_t = (1 - beta1**t) / lr * (sqrt(v / (1 - beta2**t)) + eps)``."""
  return s.d_scale * (jnp.sqrt(_bias_corrected(v, s)) + s.eps)


def next_z(z: jax.Array, grad: jax.Array, weight: jax.Array, d_t: jax.Array,
           d_prev: jax.Array, s: _StepScalars) -> jax.Array:
  """``z = beta1 * z + (1 - beta1) * g - (d_t - beta1 * d_prev) * w``."""
  def like_weight(x):  # real -> complex
    return x.astype(weight.dtype)
  return _zero_where(d_t == 0, (
      like_weight(s.beta1) * z + like_weight(s.one_minus_beta1) * grad)
      - like_weight(d_t - s.beta1 * d_prev) * weight)


def weight_step(z: jax.Array, weight: jax.Array, d_t: jax.Array) -> jax.Array:
  """``w_t - w_{t-1}``, with ``w_t = -z / d_t``."""
  return _zero_where(d_t == 0, -z / d_t.astype(weight.dtype) - weight)


@jax.jit
def _leaf_step(param: jax.Array, grad: jax.Array, v: jax.Array, z: jax.Array,
               d_prev: jax.Array | None, now: _StepScalars,
               before: _StepScalars | None, never: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """One parameter's step: its update and new ``v``, ``z`` and ``d_prev``.

  ``d_prev`` is the stored array or, for the lean state, None: it is then
  recomputed from ``v`` with the previous step's scalars ``before``.

  XLA:CPU computes each output array in a loop of its own and, with the
  parameters and the state donated, writes it over its input array. A
  temporary (``d_t``, which three outputs use) or a copy (of an input
  overwritten before another loop reads it) would cost whole passes over
  memory, which is what FTML's step time is made of. So every loop reads
  stored arrays only and recomputes ``d_t`` from them, and the loops run
  ``v``, ``z``, ``d_prev``, weights (the lean state: ``z``, reading the old
  ``v``, before ``v``). XLA orders loops by data dependence only and resolves
  any other write-after-read order with a copy, hence the selects on
  ``never`` (false, but not known to be when compiling; they cost no memory
  traffic): ``after`` makes a loop read a value once another has written,
  and ``apart`` keeps the weights' ``d_t`` from being merged with the
  others' into one array. ``tests/test_compiled_structure.py`` checks the
  compiled step: one loop per output array and no copies, in every dtype.

  Jitted so that parameters of one shape and dtype share one trace (XLA
  inlines the calls; the compiled step is the same).
  """
  compute = _dtypes.compute_dtype(param.dtype, z.dtype)
  real = _dtypes.real_dtype(compute)

  def stored(x, dtype):
    """``x`` as the state stores it, read back in the arithmetic's dtype."""
    return x.astype(dtype).astype(x.dtype)

  def after(written, x):
    """``x``, read once ``written`` is."""
    return jax.lax.select(never, jnp.real(written).astype(x.dtype), x)

  apart = now._replace(inv_bias2=_zero_where(never, now.inv_bias2))

  weight, grad = param.astype(compute), _limited(grad.astype(compute))
  v_old, z_old = v.astype(real), z.astype(compute)
  if before is None:
    v_new = stored(next_v(v_old, grad, now), v.dtype)
    z_new = stored(next_z(z_old, grad, weight, diagonal(v_new, now),
                          jnp.asarray(d_prev, real), now), z.dtype)
    d_new = diagonal(after(z_new, v_new), now).astype(v.dtype)
  else:  # The lean state: z's loop reads the old v, so it comes first.
    d_prev = stored(diagonal(v_old, before), v.dtype)
    v_in_z = stored(next_v(v_old, grad, now), v.dtype)
    z_new = stored(next_z(z_old, grad, weight, diagonal(v_in_z, now), d_prev,
                          now), z.dtype)
    v_new = stored(next_v(after(z_new, v_old), grad, now), v.dtype)
    d_new = None
  step = weight_step(z_new, weight, diagonal(v_new, apart))
  return step.astype(param.dtype), v_new.astype(v.dtype), z_new.astype(
      z.dtype), d_new


def ftml(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    b1: jax.typing.ArrayLike = 0.6,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    state_dtype: jax.typing.DTypeLike | None = None,
    *,
    recompute_d_prev: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Follow the Moving Leader (FTML) optimizer, as computed by MXNet.

  With gradient :math:`g_t`, parameters :math:`w_{t-1}`, learning rate
  :math:`\eta_t` and the 1-based step :math:`t`, each element is updated as

  .. math::

    \begin{aligned}
      v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, |g_t|^2 \\
      d_t &= \frac{1 - \beta_1^t}{\eta_t}
             \left(\sqrt{\frac{v_t}{1 - \beta_2^t}} + \epsilon\right) \\
      z_t &= \beta_1 z_{t-1} + (1 - \beta_1)\, g_t
             - (d_t - \beta_1 d_{t-1})\, w_{t-1} \\
      w_t &= -z_t / d_t
    \end{aligned}

  starting from :math:`v_0 = z_0 = d_0 = 0`, and the returned update is
  :math:`w_t - w_{t-1}`. The operations follow MXNet's ``ftml_update`` kernel
  in order and precision (``1 - b1`` and ``1 - b2`` are rounded in the
  computation dtype), so float32 results agree with MXNet to rounding.

  When nothing else changes the parameters, :math:`z_t = -d_t w_t` at every
  step and the update collapses to :math:`-(1 - \beta_1) g_t / d_t`, an
  Adam-like step with bias-corrected momentum replaced by the current
  gradient. Anything applied *after* FTML (a projection, another transform)
  is pulled back towards the leader :math:`-z_t / d_t` at the next step, so
  gradient pre-processing such as clipping and weight decay belongs *before*
  ``ftml`` in an :func:`optax.chain`.

  Like every Optax optimizer, a schedule is evaluated at the number of updates
  made so far (0 on the first step, where MXNet's schedulers see 1:
  :ref:`schedules`). A step whose learning rate is 0 leaves the parameters
  unchanged, finite gradients whose square would overflow are limited, half
  precision is computed in float32, and no step produces a NaN from finite
  inputs: :doc:`/guides/what_ftml_computes` and :doc:`/guides/numerics` say
  how, each point tested.

  Args:
    learning_rate: a positive float, or a schedule mapping the update count to
      a learning rate (a step where the schedule returns 0 is a no-op; a
      negative or non-finite value makes that step's update NaN).
    b1: decay of the linear term, in [0, 1). MXNet's ``beta1``.
    b2: decay of the squared-gradient average, in [0, 1). MXNet's ``beta2``.
    eps: non-negative term added to the root of the second moment. MXNet's
      ``epsilon``.
    state_dtype: optional floating dtype of ``v``, ``z`` and ``d_prev`` (e.g.
      ``jnp.float32`` for bfloat16 parameters); by default the parameters'
      dtype (its real part for ``v`` and ``d_prev``), except float32 for
      float16 parameters, whose range cannot hold FTML's state.
    recompute_d_prev: keyword only; if true, store two buffers per parameter,
      as Adam does, instead of three: the state is :class:`FTMLLeanState`,
      and each step recomputes ``d_prev`` from the previous ``v``, count and
      learning rate (about 20% less memory traffic per step; the trajectory
      is the default state's to rounding, :ref:`the lean state <lean-state>`).

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`. Its
    ``update`` requires ``params``.

  Raises:
    TypeError: if a hyperparameter is not a real scalar, or ``state_dtype``
      not a floating dtype; at ``init`` and ``update``, for parameters,
      gradients or a state of dtypes FTML cannot compute with.
    ValueError: if a concrete hyperparameter (a number or an array) is out of
      range, or would overflow or underflow FTML's float32 arithmetic
      (:ref:`the limits <input-limits>`).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optax_ftml import ftml
    >>> def f(x): return jnp.sum(x ** 2)
    >>> solver = ftml(learning_rate=0.1)
    >>> params = jnp.array([1., 2., 3.])
    >>> opt_state = solver.init(params)
    >>> for _ in range(3):
    ...   grad = jax.grad(f)(params)
    ...   updates, opt_state = solver.update(grad, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(f"{f(params):.4f}")
    12.8300
    12.1469
    11.6127

  References:
    Zheng and Kwok, `Follow the Moving Leader in Deep Learning
    <http://proceedings.mlr.press/v70/zheng17a/zheng17a.pdf>`_, ICML 2017.

    Apache MXNet, ``mxnet.optimizer.FTML`` (kernel ``ftml_update``).
  """
  state_dtype = _validation.check_arguments(learning_rate, b1, b2, eps,
                                            state_dtype, recompute_d_prev)

  def v_dtype(param_dtype):
    return _dtypes.v_dtype(param_dtype, state_dtype)

  def z_dtype(param_dtype):
    return _dtypes.z_dtype(param_dtype, state_dtype)

  def rate_dtype(params):
    """The lean state's learning rate: the widest dtype the update computes
    in."""
    return _dtypes.widest(jnp.float32, *(
        _dtypes.real_dtype(_dtypes.compute_dtype(p.dtype, z_dtype(p.dtype)))
        for p in jax.tree.leaves(params)))

  def init_fn(params: optax.Params) -> FTMLState | FTMLLeanState:
    _validation.check_params(params)

    # Separate zeros trees: buffers must not alias so that donating the state
    # to a jitted step can reuse each of them in place.
    def zeros(dtype_of: Callable[[Any], jnp.dtype]) -> optax.Updates:
      return jax.tree.map(
          lambda p: jnp.zeros_like(p, dtype=dtype_of(p.dtype)), params)

    count = jnp.zeros([], jnp.int32)
    if recompute_d_prev:
      return FTMLLeanState(count, zeros(v_dtype), zeros(z_dtype),
                           jnp.zeros([], rate_dtype(params)))
    return FTMLState(count, zeros(v_dtype), zeros(z_dtype), zeros(v_dtype))

  def update_fn(updates: optax.Updates, state: optax.OptState,
                params: optax.Params | None = None, **extra_args: Any
                ) -> tuple[optax.Updates, optax.OptState]:
    del extra_args
    kind = FTMLLeanState if recompute_d_prev else FTMLState
    if not isinstance(state, kind):
      raise TypeError(
          f"ftml: state must be the {kind.__name__} that init returns (with"
          f" recompute_d_prev={recompute_d_prev}), got {type(state).__name__}.")
    state = cast(FTMLState | FTMLLeanState, state)
    lean = isinstance(state, FTMLLeanState)
    buffers = (state.v, state.z) if lean else (state.v, state.z, state.d_prev)
    dtypes = (v_dtype, z_dtype, v_dtype)[:len(buffers)]
    _validation.check_update(params, updates, dict(zip(
        ("v", "z", "d_prev"), zip(buffers, dtypes, strict=True),
        strict=False)), state.count)
    if lean:
      rate = state.prev_learning_rate
      if jnp.shape(rate) != () or jnp.result_type(rate) != rate_dtype(params):
        raise TypeError(
            "ftml: state.prev_learning_rate must be a scalar of dtype"
            f" {rate_dtype(params)}, got {jnp.result_type(rate)} of shape"
            f" {jnp.shape(rate)}.")

    # The step's scalars, once per real dtype; the lean state recomputes
    # d_prev with the previous step's.
    count = jnp.asarray(optax.safe_increment(state.count))
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    now = functools.cache(
        lambda real: _StepScalars.at(count, lr, b1, b2, eps, real))
    before = None
    if lean:
      previous = state
      before = functools.cache(lambda real: _StepScalars.at(
          previous.count, previous.prev_learning_rate, b1, b2, eps, real))
    never = count < 0

    def leaf_step(param, grad, v, z, d_prev=None):
      real = _dtypes.real_dtype(_dtypes.compute_dtype(param.dtype, z.dtype))
      return _leaf_step(param, grad, v, z, d_prev, now(real),
                        before(real) if before else None, never)

    leaves, tree = jax.tree.flatten(params)
    steps = [leaf_step(*leaf) for leaf in zip(
        leaves, *map(tree.flatten_up_to, (updates, *buffers)), strict=True)]

    def output(index):
      return tree.unflatten([step[index] for step in steps])

    if lean:
      return output(0), FTMLLeanState(count, output(1), output(2), jnp.asarray(
          lr, state.prev_learning_rate.dtype))
    return output(0), FTMLState(count, output(1), output(2), output(3))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
