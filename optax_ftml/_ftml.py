"""Follow the Moving Leader (FTML), as computed by Apache MXNet's ``ftml_update``.

References:
  Zheng and Kwok, `Follow the Moving Leader in Deep Learning
  <http://proceedings.mlr.press/v70/zheng17a/zheng17a.pdf>`_, ICML 2017.

  Apache MXNet, ``mxnet.optimizer.FTML`` and the fused kernel ``ftml_update``.
"""

import functools
from typing import Any
from typing import NamedTuple
from typing import Self

import jax
import jax.numpy as jnp
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
         real: Any) -> Self:
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


def _limited(g: jax.Array) -> jax.Array:
  """``g`` with finite components limited to :func:`_dtypes.gradient_bound`.

  A larger finite gradient would overflow ``v`` and turn that element's
  state into NaN for good, unseen by ``optax.apply_if_finite`` (which checks
  the incoming gradients). Infinities pass: like NaN, they propagate as in
  every Optax optimizer.
  """
  bound = _dtypes.gradient_bound(g.dtype)

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


class _InPlaceOrder(NamedTuple):
  """Lays out one parameter's step so that XLA:CPU updates it in place.

  XLA:CPU computes each output array (the update, ``v``, ``z``, ``d_prev``)
  in a loop of its own and, with the parameters and the state donated,
  writes it over its input array. A temporary array (``d_t``, which three
  outputs use) or a copy (of an input overwritten before another loop reads
  it) would cost whole passes over memory, which is what FTML's step time is
  made of. So every loop reads stored arrays only and computes ``d_t`` from
  them itself, and the loops run ``v``, ``z``, ``d_prev``, weights (the lean
  state: ``z``, reading the old ``v``, before ``v``). Two devices, which
  change no value, get XLA there:

  * :meth:`after`: XLA orders loops by data dependence only and resolves any
    other write-after-read order with a copy; a loop that overwrites an array
    another loop reads is made to depend on that loop's output, by a select
    on a condition false when the step runs but not known to be when
    compiling (``count < 0``).
  * :meth:`own_d_t`: an ``optimization_barrier`` on the step's scalars hides
    that the weights' ``d_t`` equals the one the other loops compute, so XLA
    does not merge them into one temporary array.

  The arrangement applies on every platform rather than on CPU only
  (``jax.lax.platform_dependent``): it changes no value, one program traced
  once is the program the tests run, and elsewhere it costs at most a
  recomputed square root per element (XLA:GPU fuses the outputs into shared
  kernels; not measured). ``tests/test_compiled_structure.py`` checks the
  compiled step by XLA's ``memory_analysis`` (a few hundred bytes of scalar
  temporaries, no array) and ``cost_analysis``, in every dtype and both
  states.
  """

  false_when_run: jax.Array
  """``count < 0`` for the incremented, non-negative count."""

  def after(self, written: jax.Array, x: jax.Array) -> jax.Array:
    """``x``, read by a loop that runs once ``written`` is written."""
    return jax.lax.select(self.false_when_run,
                          jnp.real(written).astype(x.dtype), x)

  @staticmethod
  def own_d_t(scalars: _StepScalars) -> _StepScalars:
    """``scalars``, not known to XLA to be the ones the other loops use."""
    return jax.lax.optimization_barrier(scalars)


@jax.jit
def _leaf_step(param: jax.Array, grad: jax.Array, v: jax.Array, z: jax.Array,
               d_prev: jax.Array | None, now: _StepScalars,
               before: _StepScalars | None, order: _InPlaceOrder
               ) -> tuple[jax.Array, ...]:
  """One parameter's update, new ``v``, ``z`` and (default state) ``d_prev``.

  MXNet's lines, each loop reading the state as stored (rounded to its
  dtype), laid out by ``order``. For the lean state ``d_prev`` is None: it
  is recomputed from ``v`` with the previous step's scalars ``before``, and
  no ``d_prev`` is returned.

  Jitted so that parameters of one shape and dtype share one trace (XLA
  inlines the calls; the compiled step is the same).
  """
  compute = _dtypes.compute_dtype(param.dtype, z.dtype)
  real = _dtypes.real_dtype(compute)

  def stored(x, buffer):
    """``x`` rounded to ``buffer``'s dtype, in the arithmetic's."""
    return x.astype(buffer.dtype).astype(x.dtype)

  weight, grad = param.astype(compute), _limited(grad.astype(compute))
  v_old, z_old = v.astype(real), z.astype(compute)
  if before is None:
    v_new = stored(next_v(v_old, grad, now), v)
    z_new = stored(next_z(z_old, grad, weight, diagonal(v_new, now),
                          jnp.asarray(d_prev, real), now), z)
    # d_prev's loop overwrites the d_prev that z's loop reads.
    new_state = (v_new, z_new, diagonal(order.after(z_new, v_new), now))
  else:
    d_prev = stored(diagonal(v_old, before), v)
    z_new = stored(next_z(z_old, grad, weight, diagonal(
        stored(next_v(v_old, grad, now), v), now), d_prev, now), z)
    # v's loop overwrites the v that z's loop reads.
    v_new = stored(next_v(order.after(z_new, v_old), grad, now), v)
    new_state = (v_new, z_new)
  step = weight_step(z_new, weight, diagonal(v_new, order.own_d_t(now)))
  return step.astype(param.dtype), *(
      x.astype(buffer.dtype) for x, buffer in zip(new_state, (v, z, v),
                                                  strict=False))


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
  state_type = FTMLLeanState if recompute_d_prev else FTMLState

  def dtypes(param_dtype):
    """The dtypes of a parameter's ``v``, ``z`` (and ``d_prev``)."""
    v = _dtypes.v_dtype(param_dtype, state_dtype)
    return v, _dtypes.z_dtype(param_dtype, state_dtype), v

  def rate_dtype(params):
    """The lean state's learning rate: the widest dtype the update computes
    in."""
    return _dtypes.widest(jnp.float32, *(
        _dtypes.real_dtype(_dtypes.compute_dtype(p.dtype, dtypes(p.dtype)[1]))
        for p in jax.tree.leaves(params)))

  def init_fn(params: optax.Params) -> FTMLState | FTMLLeanState:
    _validation.check_params(params)
    # Separate zeros trees: buffers must not alias so that donating the state
    # to a jitted step can reuse each of them in place.
    v, z, d_prev = (jax.tree.map(lambda p, i=i: jnp.zeros_like(
        p, dtype=dtypes(p.dtype)[i]), params) for i in range(3))
    count = jnp.zeros([], jnp.int32)
    if recompute_d_prev:
      return FTMLLeanState(count, v, z, jnp.zeros([], rate_dtype(params)))
    return FTMLState(count, v, z, d_prev)

  def update_fn(updates: optax.Updates, state: optax.OptState,
                params: optax.Params | None = None, **extra_args: Any
                ) -> tuple[optax.Updates, optax.OptState]:
    del extra_args
    state = _validation.check_state(state, state_type, recompute_d_prev)
    buffers = _validation.check_update(params, updates, state, dtypes,
                                       rate_dtype)
    count = jnp.asarray(optax.safe_increment(state.count))
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    prev_rate = getattr(state, "prev_learning_rate", None)  # the lean state's
    # The step's scalars, once per real dtype (and the previous step's).
    now = functools.cache(
        lambda real: _StepScalars.at(count, lr, b1, b2, eps, real))
    before = functools.cache(lambda real: _StepScalars.at(
        state.count, prev_rate, b1, b2, eps, real))
    order = _InPlaceOrder(count < 0)

    def leaf_step(param, grad, v, z, d_prev=None):
      real = _dtypes.real_dtype(_dtypes.compute_dtype(param.dtype, z.dtype))
      return _leaf_step(param, grad, v, z, d_prev, now(real),
                        None if prev_rate is None else before(real), order)

    per_leaf = jax.tree.map(leaf_step, params, updates, *buffers)
    step, *new_buffers = (jax.tree.map(lambda _, out, i=i: out[i], params,
                                       per_leaf) for i in range(1 + len(buffers)))
    new: dict[str, Any] = dict(zip(("v", "z", "d_prev"), new_buffers,
                                   strict=False))
    if prev_rate is not None:
      new["prev_learning_rate"] = jnp.asarray(lr, prev_rate.dtype)
    return step, state._replace(count=count, **new)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
