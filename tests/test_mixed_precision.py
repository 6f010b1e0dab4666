"""Half-precision parameters: float32 state, and MXNet's ``multi_precision``.

Two set-ups, both compared with the NumPy transcription of MXNet:

* bfloat16/float16 parameters with ``ftml(..., state_dtype=jnp.float32)``:
  the kernel runs in float32 and the parameters are rounded at every step.
* MXNet's ``multi_precision=True`` as a recipe: the float32 master copy of
  the weights is the Optax parameter tree, the model runs on its float16
  cast, and the gradients (float16) reach the optimizer as float32 because
  ``jax.grad`` differentiates through the cast.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ftml
from mxnet_reference import FTMLSlots
from mxnet_reference import ftml_update
from mxnet_reference import ftml_update_low_precision
from mxnet_reference import ftml_update_multi_precision
from scan_training import run

HALF = [jnp.bfloat16, jnp.float16]


def ulp(dtype):
  return float(jnp.finfo(dtype).eps)


def scan_steps(opt, params, xs, gradient_fn=None):
  """:func:`scan_training.run`, with the parameters widened to float32 for NumPy."""
  ps, state = run(opt, params, xs, gradient_fn)
  return np.asarray(ps, np.float32), state


@pytest.mark.parametrize("dtype", HALF)
def test_half_parameters_with_float32_state_match_the_float32_kernel(dtype):
  """300 steps: the parameters are the float32 kernel's, rounded at every
  step (to at most an ulp at a rounding tie); the state stays float32."""
  rng = np.random.RandomState(0)
  grads = rng.randn(300, 64).astype(dtype)
  w0 = rng.randn(64).astype(dtype)
  opt = optax_ftml.ftml(0.01, state_dtype=jnp.float32)
  ps, state = scan_steps(opt, jnp.asarray(w0), jnp.asarray(grads))
  assert all(x.dtype == jnp.float32 for x in (state.v, state.z, state.d_prev))

  w, slots, expected = w0, FTMLSlots(*(np.zeros(64, np.float32),) * 3), []
  for t in range(300):
    w = ftml_update_low_precision(w, grads[t], slots, lr=0.01, t=t + 1)
    expected.append(w)
  expected = np.stack(expected).astype(np.float32)
  assert np.abs(expected[-1] - w0.astype(np.float32)).max() > 0.1
  np.testing.assert_allclose(ps, expected, rtol=1.01 * ulp(dtype), atol=1e-6)
  # z = ... - d w: an ulp of difference in w at a tie moves z by d * ulp.
  np.testing.assert_allclose(state.z, slots.z, rtol=0,
                             atol=ulp(dtype) * np.abs(slots.z).max())


# --- MXNet's multi_precision=True as a recipe ---------------------------------


def multi_precision_problem(steps, n, seed=0):
  """A quadratic ``0.5 * sum(a * (w - c_t)**2)`` evaluated in float16 with a
  moving target: its float16 gradient a * (w - c_t) has a single rounding
  (the curvatures a are powers of two), so NumPy computes the same one."""
  rng = np.random.RandomState(seed)
  a = rng.choice([0.5, 1.0, 2.0, 4.0], n).astype(np.float16)
  targets = rng.randn(steps, n).astype(np.float16)
  master = rng.randn(n).astype(np.float32)
  return a, targets, master


def half_loss(a, dtype):
  def loss(weights, target):
    return 0.5 * jnp.sum(jnp.asarray(a, dtype) * (weights - target) ** 2)
  return loss


def recipe_gradient(loss, dtype):
  """The recipe's training-step gradient: the model sees the cast weights."""
  return lambda master, target: jax.grad(
      lambda m: loss(m.astype(dtype), target))(master)


MXNET_ARGS = {"lr": 0.01, "wd": 1e-3, "clip_gradient": 2.0}


def mxnet_chain():
  return optax_ftml.mxnet_ftml(0.01, wd=1e-3, clip_gradient=2.0)


def assert_float16_weights_agree(masters, expected, at_most):
  """The float16 weights (the masters' casts) equal MXNet's except where the
  two float32 masters, equal to float32 rounding, straddle a float16
  rounding boundary: in at most the fraction ``at_most`` of the values, and
  there by one float16 ulp."""
  ours, theirs = masters.astype(np.float16), expected.astype(np.float16)
  assert np.mean(ours != theirs) < at_most
  assert np.all(np.abs(ours.astype(np.float32) - theirs.astype(np.float32))
                <= np.spacing(np.abs(theirs)).astype(np.float32))


def test_multi_precision_recipe_matches_mxnet_with_fixed_gradients():
  """float16 gradients fixed in advance: the master is MXNet's to float32
  rounding, and the float16 weights are its cast."""
  rng = np.random.RandomState(1)
  grads = (rng.randn(300, 64) * rng.choice([1e-4, 1.0, 300.0], 64)).astype(
      np.float16)
  master0 = rng.randn(64).astype(np.float32)
  masters, state = scan_steps(mxnet_chain(), jnp.asarray(master0),
                              jnp.asarray(grads).astype(jnp.float32))
  assert state[-1].z.dtype == jnp.float32

  weight = master0.astype(np.float16)
  master, slots, expected = master0, FTMLSlots.zeros_like(master0), []
  for t in range(300):
    weight, master = ftml_update_multi_precision(
        weight, grads[t], master, slots, t=t + 1, **MXNET_ARGS)
    expected.append(master)
  expected = np.stack(expected)
  np.testing.assert_allclose(masters, expected, rtol=0,
                             atol=2e-5 * np.abs(expected).max())
  # Measured: 10 of the 19,200 float16 values differ (0.05%).
  assert_float16_weights_agree(masters, expected, at_most=0.005)


def test_multi_precision_training_step_matches_mxnet():
  """The whole recipe, gradients computed in float16 from the cast weights
  (feedback included), against MXNet's multi-precision path."""
  steps, n = 300, 64
  a, targets, master0 = multi_precision_problem(steps, n)
  gradient = recipe_gradient(half_loss(a, jnp.float16), jnp.float16)
  g = gradient(jnp.asarray(master0), jnp.asarray(targets[0]))
  assert g.dtype == jnp.float32  # the cast's transpose widens the gradient
  masters, _ = scan_steps(mxnet_chain(), jnp.asarray(master0),
                          jnp.asarray(targets), gradient)

  master, slots, expected = master0, FTMLSlots.zeros_like(master0), []
  weight = master0.astype(np.float16)
  for t in range(steps):
    grad = a * (weight - targets[t])  # the float16 gradient of the loss
    weight, master = ftml_update_multi_precision(
        weight, grad, master, slots, t=t + 1, **MXNET_ARGS)
    expected.append(master)
  expected = np.stack(expected)
  assert np.abs(expected[-1] - master0).max() > 0.5
  # A float16 rounding tie now and then changes a gradient by one float16
  # ulp; the masters stay within float32 rounding of each other otherwise.
  np.testing.assert_allclose(masters, expected, rtol=0,
                             atol=2e-5 * np.abs(expected).max())
  # Measured: 41 of the 19,200 float16 values differ (0.2%).
  assert_float16_weights_agree(masters, expected, at_most=0.005)


def test_master_copy_is_what_small_steps_need():
  """Why multi_precision: steps below half a float16 ulp (here lr = 1e-4 on
  weights in [1, 2), ulp 2**-10) never move float16 parameters, even with a
  float32 state; the float32 master accumulates them, as MXNet's does."""
  steps, n, lr = 2000, 16, 1e-4
  rng = np.random.RandomState(2)
  master0 = (1 + rng.rand(n)).astype(np.float32)
  targets = np.zeros((steps, n), np.float16)
  loss = half_loss(np.ones(n, np.float16), jnp.float16)

  half, _ = scan_steps(optax_ftml.ftml(lr, state_dtype=jnp.float32),
                       jnp.asarray(master0, jnp.float16), jnp.asarray(targets),
                       lambda w, c: jax.grad(loss)(w, c))
  np.testing.assert_array_equal(half[-1], master0.astype(np.float16))

  masters, _ = scan_steps(optax_ftml.ftml(lr), jnp.asarray(master0),
                          jnp.asarray(targets),
                          recipe_gradient(loss, jnp.float16))
  master, slots, weight = master0, FTMLSlots.zeros_like(master0), None
  weight = master0.astype(np.float16)
  for t in range(steps):
    weight, master = ftml_update_multi_precision(
        weight, weight - targets[t], master, slots, lr=lr, t=t + 1)
  assert np.all(master0 - master > 0.05)
  np.testing.assert_allclose(masters[-1], master, rtol=2e-5)


# --- Long runs and float16's range -------------------------------------------


def hostile_gradients(key, p):
  """Gradients of every size float16 can hold, exact zeros included."""
  k1, k2 = jax.random.split(key)
  magnitude = 10.0 ** jax.random.uniform(k1, p.shape, minval=-7, maxval=4.5)
  sign = jax.random.choice(k2, jnp.array([-1.0, 0.0, 1.0]), p.shape)
  return (sign * magnitude).astype(p.dtype) + (p - 0.5).astype(p.dtype)


@pytest.mark.parametrize("setup", ["bfloat16+float32 state",
                                   "float16+float32 state",
                                   "float16 multi-precision"])
def test_ten_thousand_steps_stay_finite(setup):
  """10,000 steps of default FTML with gradients from 0 to 3e4 in magnitude
  (g * g overflows float16: the kernel must run in float32)."""
  n, steps = 256, 10_000
  if setup == "float16 multi-precision":
    opt, params = optax_ftml.ftml(), jnp.zeros(n, jnp.float32)
    cast = lambda p: p.astype(jnp.float16)
  else:
    dtype = jnp.bfloat16 if setup.startswith("bfloat16") else jnp.float16
    opt = optax_ftml.ftml(state_dtype=jnp.float32)
    params, cast = jnp.zeros(n, dtype), lambda p: p

  def step(carry, key):
    p, state = carry
    g = hostile_gradients(key, cast(p)).astype(p.dtype)
    updates, state = opt.update(g, state, p)
    p = optax.apply_updates(p, updates)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in
                                jax.tree.leaves((p, state))]))
    return (p, state), finite

  keys = jax.random.split(jax.random.key(0), steps)
  (p, state), finite = jax.jit(
      lambda p, ks: jax.lax.scan(step, (p, opt.init(p)), ks))(params, keys)
  assert bool(jnp.all(finite))
  assert int(state.count) == steps
  assert float(jnp.max(jnp.abs(p.astype(jnp.float32)))) > 0


@pytest.mark.parametrize("state_dtype", [None, jnp.float16])
def test_float16_default_eps_does_not_hit_mxnet_zero_over_zero(state_dtype):
  """MXNet's float16 kernel (without multi_precision) rounds eps = 1e-8 to 0
  and squares in float16: a zero gradient gives 0/0, 1e-4 underflows v to 0,
  300 overflows it. Here the kernel runs in float32: every element is the
  float32 kernel's, rounded to float16 (and the state to its dtype)."""
  grad = np.array([0.0, 1e-4, -1.0, 300.0], np.float16)
  weight = np.array([0.5, -1.0, 2.0, 0.25], np.float16)

  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    mxnet16 = ftml_update(weight, grad, FTMLSlots.zeros_like(weight), lr=0.0025,
                          t=1)
  assert np.isnan(mxnet16[0]) and not np.isfinite(mxnet16[1])
  assert not np.isfinite(mxnet16[3])

  opt = optax_ftml.ftml(state_dtype=state_dtype)
  updates, state = opt.update(jnp.asarray(grad), opt.init(jnp.asarray(weight)),
                              jnp.asarray(weight))
  new = optax.apply_updates(jnp.asarray(weight), updates)
  slots = FTMLSlots(*(np.zeros(4, state_dtype or np.float32),) * 3)
  expected = ftml_update_low_precision(weight, grad, slots, lr=0.0025, t=1)
  assert new.dtype == jnp.float16 and np.all(np.isfinite(new))
  np.testing.assert_array_equal(new, expected)
  for ours, theirs in ((state.v, slots.v), (state.z, slots.z),
                       (state.d_prev, slots.d)):
    assert ours.dtype == theirs.dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32),
                               theirs.astype(np.float32), rtol=ulp(ours.dtype))
  if state_dtype is not None:
    # In a float16 state z = -d w is subnormal there (d = 1.6e-6) and
    # (1 - b2) g**2 underflows for g = 1e-4: the stored values lose the step
    # (see test_robustness.test_float16_state_is_unsafe_hence_float32_by_default).
    assert new[0] != weight[0]
    return
  assert new[0] == weight[0]  # zero gradient: no step
  # The first step is -lr * sign(g) for every non-zero gradient, up to the
  # rounding of the new weight to float16.
  moved = np.asarray(new, np.float32) - weight.astype(np.float32)
  error = np.abs(moved[1:] + 0.0025 * np.sign(grad[1:]))
  assert np.all(error <= ulp(jnp.float16) * np.abs(weight[1:])), error
