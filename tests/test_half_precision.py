"""Half-precision (bfloat16, float16) parameters, every check in one place.

The default state's dtypes and the float32 arithmetic that keeps the bias
correction and ``eps``; why float16 gets a float32 state and what a bfloat16
state loses; half-precision hyperparameters injected as arrays. And two
set-ups compared with the NumPy transcription of MXNet:

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
from helpers import run
from mxnet_reference import FTMLSlots
from mxnet_reference import ftml_update
from mxnet_reference import ftml_update_low_precision
from mxnet_reference import ftml_update_multi_precision

HALF = [jnp.bfloat16, jnp.float16]


def machine_epsilon(dtype):
  return float(jnp.finfo(dtype).eps)


def scan_steps(opt, params, xs, gradient_fn=None):
  """:func:`helpers.run`, with the parameters widened to float32 for NumPy."""
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
  np.testing.assert_allclose(ps, expected, rtol=1.01 * machine_epsilon(dtype),
                             atol=1e-6)
  # z = ... - d w: an ulp of difference in w at a tie moves z by d * ulp.
  np.testing.assert_allclose(state.z, slots.z, rtol=0,
                             atol=machine_epsilon(dtype) * np.abs(slots.z).max())


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
  return optax_ftml.mxnet.ftml(0.01, wd=1e-3, clip_gradient=2.0,
                               mxnet_version=2)


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
                               theirs.astype(np.float32),
                               rtol=machine_epsilon(ours.dtype))
  if state_dtype is not None:
    # In a float16 state z = -d w is subnormal there (d = 1.6e-6) and
    # (1 - b2) g**2 underflows for g = 1e-4: the stored values lose the step
    # (see test_float16_state_is_unsafe_hence_float32_by_default).
    assert new[0] != weight[0]
    return
  assert new[0] == weight[0]  # zero gradient: no step
  # The first step is -lr * sign(g) for every non-zero gradient, up to the
  # rounding of the new weight to float16.
  moved = np.asarray(new, np.float32) - weight.astype(np.float32)
  error = np.abs(moved[1:] + 0.0025 * np.sign(grad[1:]))
  assert np.all(error <= machine_epsilon(jnp.float16) * np.abs(weight[1:])), error


# --- The default state's dtypes and the float32 arithmetic ------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_keeps_the_bias_correction(dtype):
  """In bf16, 1 - 0.999 rounds to 0 and eps = 1e-8 to 0 in fp16; the kernel
  computes in float32, so the first step is -lr * sign(g) as the math says:
  to 1% with the float32 state that float16 parameters get by default, and
  to the rounding of z = -d w (half an ulp of the weight) in bfloat16."""
  opt = optax_ftml.ftml(0.01)
  params = jnp.array([1.0, -1.0, 0.5, 0.0], dtype)
  grads = jnp.array([0.25, -3.0, 0.0, 1e-3], dtype)
  updates, state = opt.update(grads, opt.init(params), params)
  assert updates.dtype == dtype
  state_dtype = jnp.float32 if dtype == jnp.float16 else dtype
  assert all(x.dtype == state_dtype for x in (state.v, state.z, state.d_prev))
  expected = np.array([-0.01, 0.01, 0.0, -0.01])
  error = np.abs(np.asarray(updates, np.float32) - expected)
  if dtype == jnp.float16:
    np.testing.assert_array_less(error, 1e-2 * np.abs(expected) + 1e-9)
  else:
    ulp = float(jnp.finfo(dtype).eps) * np.abs(np.asarray(params, np.float32))
    np.testing.assert_array_less(error, 0.5 * ulp + 1e-2 * np.abs(expected)
                                 + 1e-9)


@pytest.mark.parametrize("gradient", [0.0, 1e-3, 300.0])
def test_float16_state_is_unsafe_hence_float32_by_default(gradient):
  """Why float16 parameters get a float32 state unless told otherwise: d
  scales as (|g| + eps) / lr and z as d * w, which float16 cannot hold. With
  zero gradients d = eps (1 - b1**t) / lr is subnormal and z = -d w keeps a
  few bits: the leader -z/d jitters until large weights overflow; with
  |g| = 1e-3, (1 - b2) g**2 underflows to 0, d falls to eps / lr and the
  steps explode; with |g| = 300 (lr = 0.0025) d overflows."""
  w0 = jnp.array([-3.0, 1.0, 2.5, -6e4], jnp.float16)

  def run(state_dtype):
    opt = optax_ftml.ftml(0.0025, state_dtype=state_dtype)

    def step(carry, _):
      p, state = carry
      updates, state = opt.update(jnp.full_like(p, gradient), state, p)
      return (optax.apply_updates(p, updates), state), None

    (w, state), _ = jax.jit(lambda p: jax.lax.scan(
        step, (p, opt.init(p)), length=1000))(w0)
    return np.asarray(w), state.v.dtype

  float16_state, dtype = run(jnp.float16)
  assert dtype == jnp.float16
  assert not np.all(np.isfinite(float16_state))
  default, dtype = run(None)
  assert dtype == jnp.float32
  with_float32_state, _ = run(jnp.float32)
  np.testing.assert_array_equal(default, with_float32_state)
  assert np.all(np.isfinite(default))
  if gradient == 0:
    np.testing.assert_array_equal(default, np.asarray(w0))


def test_bfloat16_state_freezes_the_second_moment():
  """bfloat16 keeps 8 bits: once v's decay by b2 = 0.999 per step is below
  half an ulp, b2 * v rounds back to v. After the gradients shrink 100-fold
  v stays ~8x too large (steps ~3x too small); a float32 state decays."""
  grads = jnp.concatenate([jnp.ones((1000, 4)), jnp.full((3000, 4), 0.01)])

  def final_v(state_dtype):
    opt = optax_ftml.ftml(0.0025, state_dtype=state_dtype)
    _, state = run(opt, jnp.zeros(4, jnp.bfloat16),
                          grads.astype(jnp.bfloat16))
    return np.asarray(state.v, np.float32)

  # v after the 3000 small gradients: 0.999**3000 * v_1000 + ~1e-4.
  v_1000 = 1 - 0.999**1000
  exact = 0.999**3000 * v_1000 + 1e-4 * (1 - 0.999**3000)
  np.testing.assert_allclose(final_v(jnp.float32), exact, rtol=1e-3)
  assert np.all(final_v(jnp.bfloat16) > 5 * exact)


# --- Hyperparameters injected as arrays ------------------------------------
#
# optax.inject_hyperparams stores hyperparameters in the parameters' dtype
# unless told otherwise, and 0.999 is 1.0 in bfloat16: the bias correction
# 1 - b2**t would then be 0 and the step 0/0.


def test_bfloat16_turns_the_default_b2_into_one():
  assert float(jnp.asarray(0.999, jnp.bfloat16)) == 1.0


@pytest.mark.parametrize("dtype", HALF)
def test_injected_half_precision_betas_are_refused_with_the_fix(dtype):
  params = jnp.ones(3, dtype)
  opt = optax.inject_hyperparams(optax_ftml.ftml)(learning_rate=0.01)
  with pytest.raises(TypeError, match=r"b1 arrives as a .*16 array.*"
                     r"hyperparam_dtype=jnp\.float32"):
    opt.init(params)


@pytest.mark.parametrize("name", ["b1", "b2"])
@pytest.mark.parametrize("dtype", HALF)
def test_each_half_precision_beta_is_named(name, dtype):
  with pytest.raises(TypeError, match=rf"ftml: {name} arrives as a"):
    optax_ftml.ftml(0.01, **{name: jnp.asarray(0.5, dtype)})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_float32_and_wider_betas_pass(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    optax_ftml.ftml(0.01, b1=jnp.asarray(0.6, dtype),
                    b2=jnp.asarray(0.999, dtype))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("recompute_d_prev", [False, True])
def test_hyperparam_dtype_float32_matches_plain_floats(dtype,
                                                       recompute_d_prev):
  """The recipe: 200 steps on half-precision parameters, bit for bit those
  of ``ftml`` built with Python floats, and finite."""
  rng = np.random.RandomState(0)
  params = jnp.asarray(rng.randn(7), dtype)
  grads = jnp.asarray(rng.randn(200, 7), dtype)
  kwargs = dict(learning_rate=0.01, b1=0.6, b2=0.999,
                recompute_d_prev=recompute_d_prev)
  injected = optax.inject_hyperparams(
      optax_ftml.ftml, static_args=("recompute_d_prev",),
      hyperparam_dtype=jnp.float32)(**kwargs)
  plain = optax_ftml.ftml(**kwargs)
  ps, state = run(injected, params, grads)
  expected, expected_state = run(plain, params, grads)
  assert np.all(np.isfinite(ps.astype(np.float32)))
  np.testing.assert_array_equal(ps, expected)
  for x, y in zip(jax.tree.leaves(state.inner_state),
                  jax.tree.leaves(expected_state), strict=True):
    np.testing.assert_array_equal(x, y)
  # The learning rate can be changed between steps, as the recipe is for.
  state.hyperparams["learning_rate"] = jnp.asarray(0.001, jnp.float32)
  updates, _ = injected.update(grads[0], state, jnp.asarray(ps[-1]))
  assert np.all(np.isfinite(np.asarray(updates, np.float32)))
