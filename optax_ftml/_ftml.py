"""Follow the Moving Leader (FTML), as computed by Apache MXNet's ``ftml_update``.

References:
  Zheng and Kwok, `Follow the Moving Leader in Deep Learning
  <http://proceedings.mlr.press/v70/zheng17a/zheng17a.pdf>`_, ICML 2017.

  Apache MXNet, ``mxnet.optimizer.FTML`` and the fused kernel ``ftml_update``.
"""

from __future__ import annotations

import functools
import operator
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
    beta1, beta2 = jnp.asarray(b1, real), jnp.asarray(b2, real)
    rate = jnp.asarray(lr, real)
    # As lr -> 0, d_t -> inf and the step vanishes, while z_t + d_t w_t = 0
    # (all the next step uses of z_t and d_t): the limit state is
    # z_t = d_t = 0. Taking d_t = 0 here leads there.
    frozen = rate == 0
    d_scale = jnp.where(frozen, 0, (1 - beta1**t) / jnp.where(frozen, 1, rate))
    inv_bias2 = jnp.where(first, 0, 1 / (1 - beta2**t))
    return cls(beta1, beta2, 1 - beta1, 1 - beta2, d_scale, inv_bias2,
               jnp.asarray(eps, real))


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
  float32), where MXNet's weights become NaN.

  Two comparisons and a select, rather than ``jnp.minimum``/``jnp.maximum``,
  whose NaN handling costs five vector instructions per ``d_t`` (a tenth of
  the bfloat16 step): the results are the same.
  """
  corrected = v * s.inv_bias2
  overflowed = (corrected == jnp.inf) & (v < jnp.inf)
  return jax.lax.select(overflowed, jnp.full_like(v, jnp.finfo(v.dtype).max),
                        corrected)


def _zero_where(condition: jax.Array, x: jax.Array) -> jax.Array:
  """``jnp.where(condition, 0, x)`` as one primitive."""
  return jax.lax.select(condition, jnp.zeros_like(x), x)


class _KernelOutputs(NamedTuple):
  """What the kernel computes for one parameter."""

  weight_step: jax.Array
  """``w_t - w_{t-1}``: MXNet's ``-z / d_t`` less the weight."""
  v: jax.Array
  z: jax.Array
  d: jax.Array
  """``d_t``, the next step's ``d_prev``."""


def _per_output(per_leaf: Any) -> _KernelOutputs:
  """A tree of per-leaf outputs as one tree per output.

  Not ``jax.tree.transpose``: it needs a leaf to infer from, and
  ``optax.masked`` hands over a tree without any where it excludes every
  parameter.
  """
  return _KernelOutputs._make(
      jax.tree.map(operator.attrgetter(field), per_leaf,
                   is_leaf=lambda x: isinstance(x, _KernelOutputs))
      for field in _KernelOutputs._fields)


class _Reads(NamedTuple):
  """How the kernel's later lines read the ``v`` and ``z`` it stores."""

  v: Callable[[jax.Array], jax.Array]
  z: Callable[[jax.Array], jax.Array]


def ftml_kernel(weight: jax.Array, grad: jax.Array, v: jax.Array,
                z: jax.Array, d: jax.Array, s: _StepScalars,
                stored: _Reads) -> _KernelOutputs:
  """MXNet's ``FTMLKernel`` on one parameter: its lines, order and names.

  ``weight``, ``grad`` and ``z`` are in the arithmetic's dtype, ``v`` and
  ``d`` (``d_{t-1}``) in its real counterpart. As in MXNet, ``d_t`` is
  computed from the stored ``v`` and the weight from the stored ``z``:
  ``stored`` gives them (rounded to the state's dtype, or as
  :func:`_in_place_loops` reads them). Beyond MXNet's kernel: the gradient
  limit, the overflow guard, and ``d_t = 0`` (a zero learning rate, or
  ``eps = 0`` with only zero gradients so far) taken as a step of 0 with
  ``z = 0``, which keeps ``z + d_t w = 0``.
  """
  cast = functools.partial(jnp.asarray, dtype=weight.dtype)  # real -> complex
  grad_i = _limited(grad)
  v = stored.v(s.beta2 * v
               + s.one_minus_beta2 * jnp.real(grad_i * jnp.conj(grad_i)))
  d_t = s.d_scale * (jnp.sqrt(_bias_corrected(v, s)) + s.eps)
  z = stored.z(_zero_where(d_t == 0, (
      cast(s.beta1) * z + cast(s.one_minus_beta1) * grad_i)
      - cast(d_t - s.beta1 * d) * weight))
  weight_step = _zero_where(d_t == 0, -z / cast(d_t) - weight)
  return _KernelOutputs(weight_step, v, z, d_t)


def _in_place_loops(weight: jax.Array, grad: jax.Array, v: jax.Array,
                    z: jax.Array, d_prev: jax.Array, now: _StepScalars,
                    never: jax.Array, precision: _dtypes.Precision,
                    reads_old_v: bool) -> _KernelOutputs:
  """The kernel's outputs, arranged so that XLA:CPU updates each in place.

  XLA:CPU computes each output array of the jitted step in a loop of its own
  and, with the parameters and the state donated, writes it over its input
  array. A temporary array (``d_t``, which three outputs use) or a copy (of
  an input overwritten before another loop read it) would cost whole passes
  over memory, which is what FTML's step time is made of. So each output is
  its own evaluation of the kernel (XLA drops what it does not use) that
  reads stored arrays only and recomputes ``d_t`` from them (a square root
  costs less than a temporary's two passes), in this order:

  1. ``v`` reads the old ``v`` and the gradient;
  2. ``z`` reads the weights, the gradient, the new ``v``, the old ``z`` and
     ``d_prev``. When ``d_prev`` is recomputed from the old ``v``
     (``reads_old_v``), ``z`` reads the old ``v`` instead (recomputing the new
     one) and comes first, so that ``v`` is overwritten after it;
  3. ``d_prev`` (only the default state stores it) reads the new ``v`` and
     overwrites ``d_prev``, which loop 2 read;
  4. the weights read the new ``v`` and ``z`` and overwrite the weights,
     which loop 2 read.

  XLA orders loops by data dependence only, and resolves any other
  write-after-read order with a copy: a loop that must follow the ``z`` loop
  without reading its result reads it through ``after``'s select, whose
  condition ``never`` is false (it costs no memory traffic: the condition
  does not depend on the element). Distinct inputs also keep XLA from
  merging the loops' ``d_t`` computations into one, which it would
  materialize: the weights' loop computes it with scalars (``apart``) that
  pass such a select. ``tests/test_compiled_structure.py`` checks the
  compiled step: one loop per output array and no copies, in every dtype.
  """
  stored = _Reads(v=precision.stored_v, z=precision.stored_z)

  def after(loop_output, x):
    """``x``, read once ``loop_output`` is written."""
    return jax.lax.select(never, jnp.real(loop_output).astype(x.dtype), x)

  if reads_old_v:
    new_z = ftml_kernel(weight, grad, v, z, d_prev, now, stored).z
    new_v = ftml_kernel(weight, grad, after(new_z, v), z, d_prev, now,
                        stored).v
  else:
    new_v = ftml_kernel(weight, grad, v, z, d_prev, now, stored).v
    new_z = ftml_kernel(weight, grad, v, z, d_prev, now, _Reads(
        v=lambda _: new_v, z=stored.z)).z
  new_d = ftml_kernel(weight, grad, v, z, d_prev, now, _Reads(
      v=lambda _: after(new_z, new_v), z=stored.z)).d
  apart = now._replace(inv_bias2=jax.lax.select(
      never, jnp.zeros_like(now.inv_bias2), now.inv_bias2))
  weight_step = ftml_kernel(weight, grad, v, z, d_prev, apart, _Reads(
      v=lambda _: new_v, z=lambda _: new_z)).weight_step
  return _KernelOutputs(weight_step, new_v, new_z, new_d)


def _recomputed_d_prev(weight: jax.Array, grad: jax.Array, v: jax.Array,
                       z: jax.Array, before: _StepScalars,
                       precision: _dtypes.Precision) -> jax.Array:
  """``d_{t-1}`` as the previous step computed it from the ``v`` it stored
  (``before``: that step's scalars), rounded as the default state stores it.
  """
  d_t = ftml_kernel(weight, grad, v, z, jnp.zeros_like(v), before, _Reads(
      v=lambda _: v, z=precision.stored_z)).d
  return precision.stored_v(d_t)


@functools.partial(jax.jit, static_argnames="precision")
def _leaf_step(param: jax.Array, grad: jax.Array, v: jax.Array, z: jax.Array,
               d_prev: jax.Array | _StepScalars, now: _StepScalars,
               never: jax.Array, precision: _dtypes.Precision
               ) -> _KernelOutputs:
  """One parameter's step, in its storage dtypes; ``d_prev`` is the stored
  array, or the previous step's scalars to recompute it with.

  Jitted so that parameters of one shape and dtype share one trace: a model's
  step then traces in about the time of its distinct shapes (XLA inlines the
  calls; the compiled step is the same).
  """
  p = precision
  weight, grad, v, z = (param.astype(p.compute), grad.astype(p.compute),
                        v.astype(p.real), z.astype(p.compute))
  recompute = isinstance(d_prev, _StepScalars)
  d_prev = (_recomputed_d_prev(weight, grad, v, z, d_prev, p)
            if isinstance(d_prev, _StepScalars) else d_prev.astype(p.real))
  new = _in_place_loops(weight, grad, v, z, d_prev, now, never, p,
                        reads_old_v=recompute)
  return _KernelOutputs(new.weight_step.astype(param.dtype),
                        new.v.astype(p.stored.v), new.z.astype(p.stored.z),
                        new.d.astype(p.stored.v))


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

  Conventions:

  * ``learning_rate`` may be a schedule; like every Optax optimizer it is
    evaluated at the number of updates made so far (0 on the first step).
    MXNet's schedulers see the count after incrementing (1 on the first
    step): to reproduce an MXNet schedule ``s`` pass ``lambda n: s(n + 1)``.
  * A step whose learning rate is exactly 0 (e.g. the first step of a warm-up
    from 0) leaves the parameters unchanged. It stores the limit of the
    recursion as :math:`\eta_t \to 0`: there :math:`d_t \to \infty` while
    :math:`z_t + d_t w_t = 0`, which is all the next step uses of them, so
    ``z = d_prev = 0`` (``v`` and ``count`` advance as usual); the next steps
    are those that vanishing learning rates would give. Likewise, with
    ``eps = 0`` an element whose gradients have all been zero has
    :math:`d_t = 0` and a 0/0 step, taken as 0. Finite gradients whose
    square overflows (beyond 1.8e19 in float32, 1.3e154 in float64), where
    MXNet's weights become NaN, are limited to the largest whose square is
    finite; below that, MXNet's numbers are kept, state included (where
    rounding makes :math:`v_t / (1 - \beta_2^t)` overflow from a finite
    :math:`v_t`, as MXNet's does, it is taken as the largest finite number).
    No step produces a NaN from finite inputs; NaN and infinite gradients
    propagate.
  * Scalars (``1 - b**t``, ``(1 - b1**t) / lr``) are computed in float32 (or
    float64 for float64 parameters), and the per-element arithmetic runs in
    at least float32, so bfloat16 and float16 parameters neither lose the
    bias correction nor flush ``eps = 1e-8`` to zero; results are rounded to
    the parameters' and the state's dtypes. As in MXNet's kernel, ``d_t`` is
    computed from the stored ``v_t`` and the weights from the stored ``z_t``.
  * Complex parameters use :math:`|g|^2` in :math:`v`; ``v`` and ``d_prev``
    are real.
  * ``recompute_d_prev=True`` stores two buffers per parameter, as Adam does,
    instead of three: the state is :class:`FTMLLeanState` ``(count, v, z,
    prev_learning_rate)``, and each step recomputes ``d_prev`` from the
    previous ``v``, step and learning rate with the operations that first
    computed it. The trajectory is the default state's to rounding (XLA
    compiles the two a little differently: ``v`` agrees within 1 ulp per step,
    the weights to float32 rounding of the recursion), steps with a learning
    rate of 0 and ``eps = 0`` included (both give ``d_prev = 0`` again).

  Args:
    learning_rate: a positive float, or a schedule mapping the update count to
      a learning rate (a step where the schedule returns 0 is a no-op).
    b1: decay of the linear term, in [0, 1). MXNet's ``beta1``.
    b2: decay of the squared-gradient average, in [0, 1). MXNet's ``beta2``.
    eps: non-negative term added to the root of the second moment. MXNet's
      ``epsilon``.
    state_dtype: optional floating dtype of ``v``, ``z`` and ``d_prev`` (e.g.
      ``jnp.float32`` for bfloat16 parameters); by default the parameters'
      dtype (its real part for ``v`` and ``d_prev``), except float32 for
      float16 parameters, whose range cannot hold FTML's state.
    recompute_d_prev: keyword only; if true, recompute ``d_prev`` at each
      step instead of storing it (see above): Adam's memory, and about 20%
      less memory traffic per step than the default state.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`. Its
    ``update`` requires ``params``.

  Raises:
    TypeError: if a hyperparameter has the wrong type, or ``state_dtype`` is
      not a floating dtype.
    ValueError: if a concrete hyperparameter is out of range.

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
  _validation.check_arguments(learning_rate, b1, b2, eps, state_dtype,
                              recompute_d_prev)
  state_dtype = _dtypes.canonical_state_dtype(state_dtype)

  def storage(param: jax.Array) -> _dtypes.StorageDtypes:
    return _dtypes.StorageDtypes.of(param.dtype, state_dtype)

  def init_fn(params: optax.Params) -> FTMLState | FTMLLeanState:
    _validation.check_params(params)

    # Separate zeros trees: buffers must not alias so that donating the state
    # to a jitted step can reuse each of them in place.
    def zeros(dtype: Callable[[_dtypes.StorageDtypes], Any]) -> optax.Updates:
      return jax.tree.map(
          lambda p: jnp.zeros_like(p, dtype=dtype(storage(p))), params)

    count = jnp.zeros([], jnp.int32)
    v, z = zeros(lambda s: s.v), zeros(lambda s: s.z)
    if recompute_d_prev:
      # The learning rate is kept in the widest dtype the update computes in.
      real = _dtypes.widest_real([_dtypes.Precision.of(p.dtype, storage(p))
                                  for p in jax.tree.leaves(params)])
      return FTMLLeanState(count, v, z, jnp.zeros([], real))
    return FTMLState(count, v, z, d_prev=zeros(lambda s: s.v))

  def update_fn(updates: optax.Updates, state: optax.OptState,
                params: optax.Params | None = None, **extra_args: Any
                ) -> tuple[optax.Updates, optax.OptState]:
    del extra_args
    state = cast(FTMLState | FTMLLeanState, state)
    stored_d_prev = () if isinstance(state, FTMLLeanState) else (state.d_prev,)
    _validation.check_update(params, updates,
                             (state.v, state.z, *stored_d_prev))

    # The step's scalars, once per real dtype; the lean state's d_prev is
    # recomputed with the previous step's.
    count = jnp.asarray(optax.safe_increment(state.count))
    never = count < 0
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    now = functools.cache(
        lambda real: _StepScalars.at(count, lr, b1, b2, eps, real))
    before = None
    if isinstance(state, FTMLLeanState):
      lean = state
      before = functools.cache(lambda real: _StepScalars.at(
          lean.count, lean.prev_learning_rate, b1, b2, eps, real))

    def update_leaf(param, grad, v, z, *stored_d_prev):
      p = _dtypes.Precision.of(param.dtype,
                               _dtypes.StorageDtypes(z=z.dtype, v=v.dtype))
      d_prev = stored_d_prev[0] if before is None else before(p.real)
      return _leaf_step(param, grad, v, z, d_prev, now(p.real), never, p)

    new = _per_output(jax.tree.map(update_leaf, params, updates, state.v,
                                   state.z, *stored_d_prev))
    if isinstance(state, FTMLLeanState):
      return new.weight_step, FTMLLeanState(count, new.v, new.z, jnp.asarray(
          lr, state.prev_learning_rate.dtype))
    return new.weight_step, FTMLState(count, new.v, new.z, new.d)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
