"""Follow the Moving Leader (FTML), as computed by Apache MXNet's ``ftml_update``.

References:
  Zheng and Kwok, `Follow the Moving Leader in Deep Learning
  <http://proceedings.mlr.press/v70/zheng17a/zheng17a.pdf>`_, ICML 2017.

  Apache MXNet, ``mxnet.optimizer.FTML`` and the fused kernel ``ftml_update``.
"""

from __future__ import annotations

import numbers
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class FTMLState(NamedTuple):
  """State of :func:`ftml`."""

  count: jax.Array
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

  count: jax.Array
  """Number of updates applied so far (``int32``, saturating)."""
  v: optax.Updates
  """Exponential moving average of the squared gradient magnitude (real)."""
  z: optax.Updates
  """FTML's linear term (the moving leader is ``-z / d_prev``)."""
  prev_learning_rate: jax.Array
  """The learning rate of the previous step (0 before the first), from which
  and ``v`` the previous diagonal ``d_prev`` is recomputed."""


class _Coefficients(NamedTuple):
  """The per-step scalars of the update, in one real dtype.

  MXNet evaluates them per element in the weight dtype; they depend only on
  the step, so computing them once per step gives the same roundings.
  """

  real: Any
  beta1: jax.Array
  beta2: jax.Array
  one_minus_beta1: jax.Array
  one_minus_beta2: jax.Array
  d_scale: jax.Array
  """``(1 - b1**t) / lr``, and 0 where ``lr = 0``."""
  grad_bound: jax.Array
  """``sqrt(max * (1 - b2)) / 2``: below it no ``|g|**2 / (1 - b2**t)``
  overflows (2.9e17 in float32 for b2 = 0.999)."""
  inv_bias2: jax.Array
  """``1 / (1 - b2**t)``, and 0 where ``t = 0`` (so that ``d_0 = 0``)."""
  eps: jax.Array

  @classmethod
  def at(cls, t: jax.Array, lr: Any, b1: Any, b2: Any, eps: Any,
         real: Any) -> _Coefficients:
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
    grad_bound = jnp.sqrt(jnp.finfo(real).max * (1 - beta2)) / 2
    return cls(real, beta1, beta2, 1 - beta1, 1 - beta2, d_scale, grad_bound,
               inv_bias2, jnp.asarray(eps, real))

  def second_moment(self, v: jax.Array, g: jax.Array) -> jax.Array:
    """``v_t`` from ``v_{t-1}`` and the gradient."""
    return self.beta2 * v + self.one_minus_beta2 * jnp.real(g * jnp.conj(g))

  def diagonal(self, v: jax.Array) -> jax.Array:
    """``d_t`` from ``v_t``."""
    # XLA rewrites a division by a broadcast scalar into this product; writing
    # it out makes every computation of d_t round the same way.
    return self.d_scale * (jnp.sqrt(v * self.inv_bias2) + self.eps)


def _bounded(g: jax.Array, bound: jax.Array) -> jax.Array:
  """``g`` with finite components limited to ``bound`` (half of it per
  component for complex).

  The bound is far beyond any ordinary gradient, which it leaves exactly as
  it is. A larger finite gradient would otherwise overflow ``v`` or ``d_t``
  and turn that element's state into NaN for good, unseen by
  ``optax.apply_if_finite`` (which checks the incoming gradients).
  """

  def limit(x, bound):
    # Infinities pass: like NaN, they propagate as in every Optax optimizer.
    return jax.lax.select(jnp.abs(x) == jnp.inf, x,
                          jax.lax.clamp(-bound, x, bound))

  if jnp.iscomplexobj(g):
    return jax.lax.complex(limit(g.real, bound / 2), limit(g.imag, bound / 2))
  return limit(g, bound)


def _zero_where(condition: jax.Array, x: jax.Array) -> jax.Array:
  """``jnp.where(condition, 0, x)`` as one primitive (the per-leaf update is
  written with ``lax`` operations: fewer to trace and to compile)."""
  return jax.lax.select(condition, jnp.zeros_like(x), x)


def _is_concrete_real(value: Any) -> bool:
  """Whether ``value`` is a Python or NumPy real number that can be checked."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_hyperparameter(name: str, value: Any, low: float, high: float,
                          high_open: bool) -> None:
  """Validates a concrete hyperparameter; traced or array values pass through.

  ``optax.inject_hyperparams`` hands the factory arrays (possibly traced), which
  must stay traceable, so only Python and NumPy scalars are checked here.
  """
  if isinstance(value, (bool, str, bytes)) or value is None:
    raise TypeError(f"ftml: {name} must be a real number, got {value!r}.")
  if not _is_concrete_real(value):
    if not hasattr(value, "dtype"):
      raise TypeError(
          f"ftml: {name} must be a real number or a scalar array, got"
          f" {type(value).__name__}.")
    return
  value = float(value)
  upper_ok = value < high if high_open else value <= high
  if not (low <= value and upper_ok):
    bracket = ")" if high_open else "]"
    raise ValueError(
        f"ftml: {name} must be in [{low}, {high}{bracket}, got {value!r}.")


def _check_beta(name: str, value: Any) -> None:
  _check_hyperparameter(name, value, 0.0, 1.0, high_open=True)
  # The bias correction 1 - beta**t is computed in (at least) float32: a beta
  # that rounds to 1 there makes it 0 and every step divides by zero.
  if _is_concrete_real(value) and float(np.float32(value)) == 1.0:
    raise ValueError(
        f"ftml: {name}={value!r} rounds to 1.0 in float32, which makes the"
        f" bias correction 1 - {name}**t zero; use {name} <= {1 - 2**-24}.")


def _check_learning_rate(value: Any) -> None:
  if callable(value):
    return
  _check_hyperparameter("learning_rate", value, 0.0, float("inf"),
                        high_open=True)
  if _is_concrete_real(value) and float(value) == 0.0:
    raise ValueError(
        "ftml: a constant learning_rate must be > 0 (FTML's step divides by"
        " it); got 0. A schedule may reach 0: such a step leaves the"
        " parameters unchanged.")


def _promote(*dtypes: Any) -> jnp.dtype:
  """The standard JAX promotion of ``dtypes``, whatever the promotion mode."""
  with jax.numpy_dtype_promotion("standard"):
    return jnp.result_type(*dtypes)


def _real_dtype(dtype: Any) -> jnp.dtype:
  """The real counterpart of ``dtype`` (float32 for complex64)."""
  return jnp.finfo(dtype).dtype


def _compute_dtype(param_dtype: Any, z_dtype: Any) -> jnp.dtype:
  """The per-element arithmetic's dtype: the widest of both, at least float32."""
  return _promote(param_dtype, z_dtype, jnp.float32)


def _buffer_dtypes(param_dtype: Any, state_dtype: Any) -> tuple[Any, Any]:
  """Storage dtypes of ``z`` and of the real buffers ``v`` and ``d_prev``."""
  if state_dtype is None:
    if param_dtype == jnp.float16:
      # FTML's state leaves float16's range: (1 - b2) g**2 is subnormal for
      # |g| < 0.25 and 0 below 5e-3, d ~ |g| / lr overflows beyond 6.5e4.
      return jnp.dtype(jnp.float32), jnp.dtype(jnp.float32)
    return param_dtype, _real_dtype(param_dtype)
  if jnp.issubdtype(param_dtype, jnp.complexfloating):
    return _promote(state_dtype, jnp.complex64), state_dtype
  return state_dtype, state_dtype


def _check_params_dtypes(params: optax.Params) -> None:
  def check(path, leaf):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise TypeError(
          f"ftml: parameter {jax.tree_util.keystr(path)} has dtype"
          f" {leaf.dtype}; FTML needs floating or complex parameters (exclude"
          " integer leaves with optax.masked or optax.multi_transform).")
  jax.tree_util.tree_map_with_path(check, params)


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

    \begin{align*}
      v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, |g_t|^2 \\
      d_t &= \frac{1 - \beta_1^t}{\eta_t}
             \left(\sqrt{\frac{v_t}{1 - \beta_2^t}} + \epsilon\right) \\
      z_t &= \beta_1 z_{t-1} + (1 - \beta_1)\, g_t
             - (d_t - \beta_1 d_{t-1})\, w_{t-1} \\
      w_t &= -z_t / d_t
    \end{align*}

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
    :math:`d_t = 0` and a 0/0 step, taken as 0. Finite gradients beyond
    ``sqrt(max * (1 - b2)) / 2`` (2.9e17 in float32 for ``b2 = 0.999``),
    whose square would overflow, are limited to that bound. No step produces
    a NaN from finite inputs; NaN and infinite gradients propagate.
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
  _check_learning_rate(learning_rate)
  _check_beta("b1", b1)
  _check_beta("b2", b2)
  _check_hyperparameter("eps", eps, 0.0, float("inf"), high_open=True)
  if state_dtype is not None:
    state_dtype = jax.dtypes.canonicalize_dtype(state_dtype)
    if not jnp.issubdtype(state_dtype, jnp.floating):
      raise TypeError(
          f"ftml: state_dtype must be a real floating dtype, got {state_dtype}.")
  if not isinstance(recompute_d_prev, bool):
    raise TypeError(
        f"ftml: recompute_d_prev must be a bool, got {recompute_d_prev!r}.")

  def init_fn(params: optax.Params) -> FTMLState | FTMLLeanState:
    _check_params_dtypes(params)

    def zeros(dtype_index: int):
      return jax.tree.map(
          lambda p: jnp.zeros_like(
              p, dtype=_buffer_dtypes(p.dtype, state_dtype)[dtype_index]),
          params)

    # Separate zeros trees: buffers must not alias so that donating the state
    # to a jitted step can reuse each of them in place.
    count = jnp.zeros([], jnp.int32)
    if recompute_d_prev:
      # The learning rate is kept in the widest dtype the update computes in.
      reals = (_real_dtype(_compute_dtype(p.dtype, _buffer_dtypes(
          p.dtype, state_dtype)[0])) for p in jax.tree.leaves(params))
      return FTMLLeanState(count=count, v=zeros(1), z=zeros(0),
                           prev_learning_rate=jnp.zeros([], _promote(
                               jnp.float32, *reals)))
    return FTMLState(count=count, v=zeros(1), z=zeros(0), d_prev=zeros(1))

  def update_fn(updates: optax.Updates, state: FTMLState | FTMLLeanState,
                params: optax.Params | None = None,
                **extra_args: Any
                ) -> tuple[optax.Updates, FTMLState | FTMLLeanState]:
    del extra_args
    if params is None:
      raise ValueError(
          "ftml: update needs the current parameters: call"
          " update(grads, state, params). FTML's step depends on the weights.")
    treedef = jax.tree.structure(params)
    shapes = [jnp.shape(p) for p in jax.tree.leaves(params)]
    # Mismatches would otherwise broadcast silently (e.g. a state restored
    # for other parameters), so they are refused while tracing.
    buffers = (state.v, state.z) if recompute_d_prev else (
        state.v, state.z, state.d_prev)
    for name, tree in (("gradients", updates),
                       *(("state", buffer) for buffer in buffers)):
      if jax.tree.structure(tree) != treedef:
        raise ValueError(
            f"ftml: the {name} tree does not match the parameters tree:"
            f" {jax.tree.structure(tree)} vs {treedef}.")
      if [jnp.shape(x) for x in jax.tree.leaves(tree)] != shapes:
        raise ValueError(
            f"ftml: the {name} leaf shapes do not match the parameters' shapes:"
            f" {[jnp.shape(x) for x in jax.tree.leaves(tree)]} vs {shapes}.")

    count_inc = optax.safe_increment(state.count)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    grads, weights, vs, zs = (treedef.flatten_up_to(tree) for tree in (
        updates, params, state.v, state.z))
    computes = [_compute_dtype(w.dtype, z.dtype)
                for w, z in zip(weights, zs, strict=True)]
    reals = [_real_dtype(compute) for compute in computes]
    now_by_dtype = {real: _Coefficients.at(count_inc, lr, b1, b2, eps, real)
                    for real in set(reals)}
    now = [now_by_dtype[real] for real in reals]
    # As in MXNet's kernel, d_t is computed from the stored v_t and the
    # weights from the stored z_t (d_t itself stays in the computation dtype
    # within the step). With a lower-precision state this lets each loop
    # below read stored arrays only, never a wider intermediate.
    if recompute_d_prev:
      # The same operations on the same values as when d_{t-1} was computed
      # from v_{t-1}, rounded as the default state stores it: the same d_prev.
      # 0 before the first step.
      before = {real: _Coefficients.at(state.count, state.prev_learning_rate,
                                       b1, b2, eps, real)
                for real in set(reals)}
      d_prevs = [before[real].diagonal(v.astype(real)).astype(v.dtype)
                 .astype(real) for v, real in zip(vs, reals, strict=True)]
    else:
      stored_d_prevs = treedef.flatten_up_to(state.d_prev)
      d_prevs = [d.astype(real)
                 for d, real in zip(stored_d_prevs, reals, strict=True)]

    # XLA:CPU computes each output array in a loop of its own. These loops
    # read only inputs and outputs, never a temporary: d_t is recomputed from
    # v in every loop that needs it (a d_t temporary would cost two passes
    # over memory; the square root is free next to them).
    grads = [_bounded(g.astype(compute), c.grad_bound)
             for g, compute, c in zip(grads, computes, now, strict=True)]
    v_outs, z_outs = [], []
    for g, w, v, z, d_prev, compute, c in zip(grads, weights, vs, zs, d_prevs,
                                              computes, now, strict=True):
      v_outs.append(c.second_moment(v.astype(c.real), g).astype(v.dtype))
      d_t = c.diagonal(v_outs[-1].astype(c.real))
      z_new = (c.beta1.astype(compute) * z.astype(compute)
               + c.one_minus_beta1.astype(compute) * g) - (
                   d_t - c.beta1 * d_prev).astype(compute) * w.astype(compute)
      # d_t = 0 also arises with eps = 0 where v = 0 (only zero gradients so
      # far): the step -(1 - b1) g / d_t is then 0/0, taken as 0. Either way
      # the weight stays and z = 0 keeps z + d_t w = 0.
      z_outs.append(_zero_where(d_t == 0, z_new).astype(z.dtype))

    # With donation an array is updated in place, so it must be written after
    # every loop that reads its old value; XLA copies it unless a data
    # dependence shows that order. The loops below therefore read the new z
    # through a select that is never taken (and costs no memory traffic: its
    # condition does not depend on the element). Never-taken selects also
    # keep XLA from merging the loops' d_t computations into one, which it
    # would materialize (an expensive operation used by several loops).
    never = count_inc < 0
    def unmerged(x, other):
      return jax.lax.select(never, other, x)

    # The weights' loop computes d_t from scalars of its own.
    apart = {real: c._replace(inv_bias2=unmerged(c.inv_bias2, jnp.zeros_like(
        c.inv_bias2))) for real, c in now_by_dtype.items()}
    steps, d_outs = [], []
    for i, (w, v, z_out, compute, c) in enumerate(
        zip(weights, vs, z_outs, computes, now, strict=True)):
      after_z = jnp.real(z_out).astype(c.real)
      if recompute_d_prev:
        # The z loop read the old v (for d_{t-1}): write the new v after it.
        v_outs[i] = c.second_moment(unmerged(v.astype(c.real), after_z),
                                    grads[i]).astype(v.dtype)
      v_t = v_outs[i].astype(c.real)
      if not recompute_d_prev:
        d_outs.append(c.diagonal(unmerged(v_t, after_z)).astype(v.dtype))
      d_t = apart[c.real].diagonal(v_t)
      steps.append(_zero_where(
          d_t == 0,
          -z_out.astype(compute) / d_t.astype(compute) - w.astype(compute)
      ).astype(w.dtype))

    step, v, z = (treedef.unflatten(x) for x in (steps, v_outs, z_outs))
    if recompute_d_prev:
      return step, FTMLLeanState(
          count=count_inc, v=v, z=z, prev_learning_rate=jnp.asarray(
              lr, state.prev_learning_rate.dtype))
    d_prev = treedef.unflatten(d_outs)
    return step, FTMLState(count=count_inc, v=v, z=z, d_prev=d_prev)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
