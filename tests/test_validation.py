"""What ``ftml`` and ``mxnet.ftml`` refuse, and the messages that say why.

Hyperparameters are checked when the optimizer is built, whether given as
Python numbers, NumPy scalars or arrays, or concrete JAX arrays; traced ones
pass unchanged and give the same numbers. Trees, dtypes, shapes and the
count are checked when ``init`` and ``update`` are traced. A rate that is
not a non-negative number when a step runs makes the step NaN.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import noisy_pull
from helpers import pull_problem
from helpers import run
from helpers import steps
from mxnet_reference import FTMLSlots
from mxnet_reference import ftml_update
from optax_ftml import FTMLLeanState
from optax_ftml import FTMLState
from optax_ftml import ftml
from optax_ftml import mxnet


def refused(error, message):
  """``pytest.raises`` for the whole message, given literally."""
  return pytest.raises(error, match="^" + re.escape(message))


# --- Hyperparameters, at construction --------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    # Concrete arrays are checked like Python numbers.
    (dict(learning_rate=jnp.array(-0.1)), ValueError,
     "ftml: learning_rate must be a positive number, got Array(-0.1"),
    (dict(learning_rate=np.array(-1.0)), ValueError,
     "ftml: learning_rate must be a positive number, got array(-1.)."),
    (dict(learning_rate=-0.1), ValueError,
     "ftml: learning_rate must be a positive number, got -0.1."),
    (dict(learning_rate=float("nan")), ValueError,
     "ftml: learning_rate must be a positive number, got nan."),
    (dict(learning_rate=0.0), ValueError,
     "ftml: a constant learning_rate must be > 0 (FTML's step divides by it)"),
    (dict(learning_rate=np.float32(0)), ValueError,
     "ftml: a constant learning_rate must be > 0"),
    (dict(learning_rate=1e39), ValueError,
     "ftml: learning_rate must be from 1.175e-38 to 3.403e+37 (with b1 = 0.6),"
     " got 1e+39: outside, (1 - b1**t) / learning_rate rounds to 0 or"
     " overflows in float32, and the steps do nothing or turn NaN."),
    (dict(learning_rate=1e38), ValueError,
     "ftml: learning_rate must be from 1.175e-38 to 3.403e+37 (with b1 = 0.6),"
     " got 1e+38"),
    (dict(learning_rate=1e37, b1=0.99), ValueError,
     "ftml: learning_rate must be from 1.175e-38 to 8.507e+35 (with b1 = 0.99)"),
    (dict(learning_rate=float("inf")), ValueError,
     "ftml: learning_rate must be from"),
    (dict(learning_rate=1e-21), ValueError,
     "ftml: learning_rate must be at least 5.421e-20, got 1e-21: below it d_t"
     " = (|g| + eps) / learning_rate overflows float32 for the largest"
     " gradients the kernel accepts (|g| up to 1.845e+19)."),
    (dict(learning_rate="0.1"), TypeError,
     "ftml: learning_rate must be a real number or a 0-d array, got '0.1'"
     " (str)."),
    (dict(learning_rate=None), TypeError,
     "ftml: learning_rate must be a real number or a 0-d array, got None"),
    (dict(learning_rate=True), TypeError,
     "ftml: learning_rate must be a real number, got True."),
    (dict(learning_rate=jnp.array([0.1, 0.2])), TypeError,
     "ftml: learning_rate must be a scalar (one value for every element), got"
     " an array of shape (2,)."),
    (dict(b2=jnp.full(3, 0.999)), TypeError,
     "ftml: b2 must be a scalar (one value for every element), got an array"
     " of shape (3,)."),
    (dict(eps=np.ones((1, 1))), TypeError, "ftml: eps must be a scalar"),
    (dict(b1=-0.1), ValueError, "ftml: b1 must be in [0, 1), got -0.1."),
    (dict(b1=1.0), ValueError, "ftml: b1 must be in [0, 1), got 1.0."),
    (dict(b1=float("nan")), ValueError, "ftml: b1 must be in [0, 1), got nan."),
    (dict(b1=1 - 1e-8), ValueError,
     "ftml: b1=0.99999999 rounds to 1.0 in float32, which makes the bias"
     " correction 1 - b1**t zero; use b1 <= 0.9999999403953552."),
    (dict(b1=[0.9]), TypeError,
     "ftml: b1 must be a real number or a 0-d array, got [0.9] (list)."),
    (dict(b1=0.5 + 0j), TypeError,
     "ftml: b1 must be a real number or a 0-d array, got (0.5+0j) (complex)."),
    (dict(b1=np.complex64(0.5)), TypeError,
     "ftml: b1 must be a real number, got an array of dtype complex64."),
    (dict(b2=np.array(1.0)), ValueError, "ftml: b2 must be in [0, 1), got 1.0."),
    (dict(b2=jnp.array(1.5)), ValueError, "ftml: b2 must be in [0, 1), got 1.5."),
    (dict(b2="0.999"), TypeError, "ftml: b2 must be a real number or a 0-d"),
    (dict(eps=-1e-8), ValueError, "ftml: eps must be in [0, inf), got -1e-08."),
    (dict(eps=float("inf")), ValueError, "ftml: eps must be in [0, inf), got inf."),
    (dict(eps=1e39), ValueError,
     "ftml: eps must be finite in float32 (|eps| <= 3.403e+38), got 1e+39."),
    (dict(eps=1e37), ValueError,
     "ftml: eps must be at most 8.507e+35 with learning_rate = 0.0025, got"
     " 1e+37: above it d_t = (|g| + eps) / learning_rate overflows float32."),
    (dict(eps=None), TypeError, "ftml: eps must be a real number or a 0-d"),
    (dict(state_dtype="nope"), TypeError,
     "ftml: state_dtype must be None or one of float32, float64, bfloat16 and"
     " float16, got 'nope'."),
    (dict(state_dtype=jnp.int32), TypeError, "ftml: state_dtype must be None or"),
    (dict(state_dtype=jnp.complex64), TypeError, "ftml: state_dtype must be"),
    (dict(state_dtype=jnp.float8_e4m3fn), TypeError,
     "ftml: state_dtype must be None or one of float32, float64, bfloat16 and"
     " float16, got float8_e4m3fn."),
    (dict(recompute_d_prev=1), TypeError,
     "ftml: recompute_d_prev must be a bool, got 1."),
])
def test_ftml_refuses(kwargs, error, message):
  with refused(error, message):
    ftml(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(b1=0.0, b2=0.0, eps=0.0), dict(b1=np.float32(0.9), b2=0.999999),
    dict(learning_rate=jnp.asarray(0.1)), dict(learning_rate=np.float64(1e3)),
    dict(learning_rate=np.int64(1)), dict(state_dtype="bfloat16"),
    # A NumPy half-precision scalar is a number, checked by its value.
    dict(b1=np.float16(0.999)), dict(learning_rate=6e-20, eps=0.0),
    dict(learning_rate=3.4e37, b1=0.6),
    # An array of zeros is how inject_hyperparams passes a warm-up's first
    # rate: that step is a no-op.
    dict(learning_rate=jnp.zeros([])),
])
def test_valid_edge_hyperparameters_are_accepted(kwargs):
  ftml(**kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(mxnet_version=3), ValueError,
     "mxnet.ftml: mxnet_version must be 1 or 2, got 3."),
    (dict(mxnet_version=True), ValueError,
     "mxnet.ftml: mxnet_version must be 1 or 2, got True."),
    (dict(wd=-0.1), ValueError, "mxnet.ftml: wd must be in [0, inf), got -0.1."),
    (dict(wd=float("inf")), ValueError,
     "mxnet.ftml: wd must be in [0, inf), got inf."),
    (dict(wd=1e300), ValueError,
     "mxnet.ftml: wd must be finite in float32 (|wd| <= 3.403e+38), got 1e+300."),
    (dict(wd="0.1"), TypeError, "mxnet.ftml: wd must be a real number or a 0-d"),
    (dict(rescale_grad=None), TypeError,
     "mxnet.ftml: rescale_grad must be a real number or a 0-d array, got None"),
    (dict(rescale_grad=1e39), ValueError,
     "mxnet.ftml: rescale_grad must be finite in float32 (|rescale_grad| <="
     " 3.403e+38), got 1e+39."),
    (dict(rescale_grad=float("inf")), ValueError,
     "mxnet.ftml: rescale_grad must be finite in float32"),
    (dict(rescale_grad=-float("inf")), ValueError,
     "mxnet.ftml: rescale_grad must be finite in float32"),
    (dict(clip_gradient="5"), TypeError, "mxnet.ftml: clip_gradient must be a"),
    (dict(clip_gradient=1e39), ValueError,
     "mxnet.ftml: clip_gradient must be finite in float32"),
    (dict(epsilon=1e39), ValueError,
     "mxnet.ftml: epsilon must be finite in float32 (|epsilon| <= 3.403e+38),"
     " got 1e+39."),
    (dict(lr_mult={"w": -1.0}), ValueError,
     "mxnet.ftml: lr_mult['w'] must be in [0, inf), got -1.0."),
    (dict(lr_mult=float("inf")), ValueError,
     "mxnet.ftml: lr_mult must be in [0, inf), got inf."),
    (dict(learning_rate=1e30, lr_mult={"w": 1e10}), ValueError,
     "mxnet.ftml: learning_rate * lr_mult['w'] must be from 1.175e-38 to"
     " 3.403e+37 (with b1 = 0.6), got 1e+40: outside, (1 - b1**t) /"
     " (learning_rate * lr_mult['w']) rounds to 0 or overflows in float32"),
    (dict(learning_rate=0.01, lr_mult={"w": 1e-30}), ValueError,
     "mxnet.ftml: learning_rate * lr_mult['w'] must be at least 5.421e-20"),
    (dict(wd_mult={"w": "x"}), TypeError,
     "mxnet.ftml: wd_mult['w'] must be a real number or a 0-d array, got 'x'"),
    (dict(wd_mult={"w": float("inf")}), ValueError,
     "mxnet.ftml: wd_mult['w'] must be in [0, inf), got inf."),
    (dict(wd=1e30, wd_mult={"w": 1e10}), ValueError,
     "mxnet.ftml: wd * wd_mult['w'] must be finite in float32"),
    (dict(beta1=1.2), ValueError, "mxnet.ftml: beta1 must be in [0, 1), got 1.2."),
    (dict(beta2=1 - 1e-9), ValueError,
     "mxnet.ftml: beta2=0.999999999 rounds to 1.0"),
    (dict(epsilon=-1e-8), ValueError,
     "mxnet.ftml: epsilon must be in [0, inf), got -1e-08."),
    (dict(epsilon="1e-8"), TypeError, "mxnet.ftml: epsilon must be a real"),
    (dict(learning_rate=0.0), ValueError,
     "mxnet.ftml: a constant learning_rate must be > 0"),
    (dict(learning_rate=-1.0), ValueError,
     "mxnet.ftml: learning_rate must be a positive number, got -1.0."),
    (dict(learning_rate=jnp.array(-1.0)), ValueError,
     "mxnet.ftml: learning_rate must be a positive number"),
])
def test_mxnet_ftml_refuses(kwargs, error, message):
  with refused(error, message):
    mxnet.ftml(**{"mxnet_version": 2, **kwargs})


# --- Traced hyperparameters give the numbers of Python floats ---------------

def test_traced_and_injected_hyperparameters_are_bit_identical_to_floats():
  weights, target, noise = pull_problem({"w": (4, 3), "b": (3,)}, 30,
                                        np.float32)
  hyper = dict(learning_rate=0.01, b1=0.7, b2=0.99, eps=1e-6)
  expected, state = run(ftml(**hyper), weights, noise, noisy_pull(target))
  injected, _ = run(optax.inject_hyperparams(ftml)(**hyper), weights, noise,
                    noisy_pull(target))
  chex.assert_trees_all_equal(injected, expected)

  @jax.jit
  def traced(values, weights, noise):  # ftml built with traced values
    return steps(ftml(**values), weights, noise, noisy_pull(target))
  chex.assert_trees_all_equal(
      traced(jax.tree.map(jnp.float32, hyper), weights, noise),
      (expected, state))
  arguments = dict(learning_rate=0.01, beta1=0.7, beta2=0.99, epsilon=1e-6,
                   mxnet_version=2)
  chex.assert_trees_all_equal(
      run(optax.inject_hyperparams(mxnet.ftml, static_args=(
          "wd", "rescale_grad", "mxnet_version"))(**arguments), weights, noise,
          noisy_pull(target))[0],
      run(mxnet.ftml(**arguments), weights, noise, noisy_pull(target))[0])


# --- What init and update are given -----------------------------------------

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}


@pytest.mark.parametrize("params, message", [
    (1.0, "ftml: params is a float, not an array; pass parameters as arrays"),
    ({"w": 2}, "ftml: params['w'] is a int, not an array"),
    ({"w": jnp.ones(2, jnp.float8_e4m3fn)},
     "ftml: params['w'] has dtype float8_e4m3fn, which FTML's arithmetic does"
     " not support; use float32, float64, bfloat16, float16, complex64 or"
     " complex128"),
    ({"w": jnp.ones(2, jnp.int32)},
     "ftml: params['w'] has dtype int32; FTML needs floating or complex"
     " parameters (exclude integer leaves with optax.masked"),
    ([jnp.ones(2, bool)], "ftml: params[0] has dtype bool; FTML needs"),
])
@pytest.mark.parametrize("recompute_d_prev", [False, True])
def test_init_refuses_parameters_it_cannot_compute(params, message,
                                                   recompute_d_prev):
  with refused(TypeError, message):
    ftml(recompute_d_prev=recompute_d_prev).init(params)


def test_update_refuses_integer_parameters():
  opt = ftml()
  state = opt.init(PARAMS)
  bad = dict(PARAMS, b=jnp.zeros(3, jnp.int32))
  with refused(TypeError, "ftml: params['b'] has dtype int32"):
    opt.update(PARAMS, state, bad)


@pytest.mark.parametrize("grads, message", [
    (dict(PARAMS, b=jnp.zeros(3, jnp.complex64)),
     "ftml: gradients['b'] has dtype complex64 for parameters of dtype float32;"
     " gradients must be floating (complex only for complex parameters)."),
    (dict(PARAMS, b=jnp.zeros(3, jnp.int32)),
     "ftml: gradients['b'] has dtype int32 for parameters of dtype float32"),
    (dict(PARAMS, b=jnp.zeros(3, jnp.float8_e5m2)),
     "ftml: gradients['b'] has dtype float8_e5m2"),
])
def test_update_refuses_gradients_of_another_kind(grads, message):
  opt = ftml()
  with refused(TypeError, message):
    opt.update(grads, opt.init(PARAMS), PARAMS)


def test_real_gradients_of_complex_parameters_are_accepted():
  params = {"w": jnp.ones(3, jnp.complex64)}
  opt = ftml(0.1)
  updates, _ = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
  assert updates["w"].dtype == jnp.complex64
  np.testing.assert_allclose(np.asarray(updates["w"]), -0.1, rtol=1e-6)


def _with(state, **replaced):
  return state._replace(**replaced)


@pytest.mark.parametrize("change, error, message", [
    (lambda s: tuple(s), TypeError,
     "ftml: state must be the FTMLState that init returns (with"
     " recompute_d_prev=False), got tuple."),
    (lambda s: FTMLLeanState(s.count, s.v, s.z, jnp.zeros([])), TypeError,
     "ftml: state must be the FTMLState that init returns"),
    (lambda s: _with(s, v=dict(s.v, w=jnp.zeros((2, 3), jnp.int32))), TypeError,
     "ftml: state.v['w'] has dtype int32 where init makes float32 for float32"
     " parameters: a state for other parameters or another state_dtype?"),
    (lambda s: _with(s, z=dict(s.z, b=jnp.zeros(3, bool))), TypeError,
     "ftml: state.z['b'] has dtype bool where init makes float32"),
    (lambda s: _with(s, d_prev=dict(s.d_prev, b=jnp.zeros(3, jnp.bfloat16))),
     TypeError, "ftml: state.d_prev['b'] has dtype bfloat16 where init makes"),
    (lambda s: _with(s, v=dict(s.v, b=jnp.zeros(3, jnp.float8_e4m3fn))),
     TypeError, "ftml: state.v['b'] has dtype float8_e4m3fn"),
    (lambda s: _with(s, count=jnp.zeros(3, jnp.int32)), TypeError,
     "ftml: state.count must be an int32 scalar, got int32 of shape (3,)."),
    (lambda s: _with(s, count=jnp.zeros([], jnp.float32)), TypeError,
     "ftml: state.count must be an int32 scalar, got float32 of shape ()."),
    (lambda s: _with(s, count=jnp.asarray(-5, jnp.int32)), ValueError,
     "ftml: state.count must be >= 0, got -5."),
])
def test_update_refuses_a_state_init_does_not_make(change, error, message):
  opt = ftml()
  state = change(opt.init(PARAMS))
  with refused(error, message):
    opt.update(PARAMS, state, PARAMS)


def test_lean_update_refuses_a_state_init_does_not_make():
  opt = ftml(recompute_d_prev=True)
  state = opt.init(PARAMS)
  with refused(TypeError, "ftml: state must be the FTMLLeanState that init"
               " returns (with recompute_d_prev=True), got FTMLState."):
    opt.update(PARAMS, FTMLState(state.count, state.v, state.z, state.v),
               PARAMS)
  with refused(TypeError, "ftml: state.prev_learning_rate must be a scalar of"
               " dtype float32, got float32 of shape (2,)."):
    opt.update(PARAMS, state._replace(prev_learning_rate=jnp.zeros(2)), PARAMS)


def test_a_negative_count_is_refused_only_when_concrete():
  """Under jit the count is traced: its dtype and shape are checked, its
  value cannot be (and costs nothing)."""
  opt = ftml()
  state = opt.init(PARAMS)._replace(count=jnp.asarray(7, jnp.int32))
  jax.jit(opt.update)(PARAMS, state, PARAMS)


@pytest.mark.parametrize("state_dtype", [None, jnp.float32])
def test_a_state_of_other_dtypes_is_refused(state_dtype):
  """A state restored for bfloat16 parameters given float32 ones (or made
  with another state_dtype)."""
  half = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  state = ftml().init(half)
  if state_dtype is None:
    with refused(TypeError, "ftml: state.v['b'] has dtype bfloat16 where init"
                 " makes float32 for float32 parameters"):
      ftml().update(PARAMS, state, PARAMS)
  else:
    ftml(state_dtype=state_dtype).update(half, ftml(
        state_dtype=state_dtype).init(half), half)
    with refused(TypeError, "ftml: state.v['b'] has dtype bfloat16 where init"
                 " makes float32 for bfloat16 parameters"):
      ftml(state_dtype=state_dtype).update(half, state, half)


# --- A schedule's values when the step runs ---------------------------------

@pytest.mark.parametrize("recompute_d_prev", [False, True])
@pytest.mark.parametrize("bad", [-0.01, float("nan"), float("inf"),
                                 -float("inf")])
def test_a_schedule_value_that_is_not_a_rate_gives_a_nan_step(bad,
                                                               recompute_d_prev):
  """Never a silent ascent (a negative rate would climb) nor a silent no-op:
  the step's update is NaN, as the loss will show at once."""
  rates = jnp.array([0.01, bad, 0.01])
  opt = ftml(lambda count: rates[count], recompute_d_prev=recompute_d_prev)
  params = {"w": jnp.array([1.0, -2.0, 0.0])}
  step = jax.jit(opt.update)
  state = opt.init(params)
  first, state = step({"w": jnp.array([0.5, -0.5, 0.1])}, state, params)
  assert np.all(np.isfinite(first["w"]))
  second, _ = step({"w": jnp.array([0.5, -0.5, 0.1])}, state, params)
  assert np.all(np.isnan(second["w"]))


def test_a_schedule_value_of_zero_is_a_no_op_and_training_goes_on():
  rates = jnp.array([0.01, 0.0, 0.01])
  opt = ftml(lambda count: rates[count])
  params = {"w": jnp.array([1.0, -2.0])}
  state = opt.init(params)
  updates = []
  for _ in range(3):
    update, state = jax.jit(opt.update)({"w": jnp.array([0.5, -0.5])}, state,
                                        params)
    updates.append(np.asarray(update["w"]))
    params = optax.apply_updates(params, update)
  np.testing.assert_array_equal(updates[1], 0)
  assert np.all(np.sign(updates[2]) == -np.sign([0.5, -0.5]))


# --- mxnet.ftml's float32 rounding, where it differs -------------------------

def _one_step(weight, grad, **kwargs):
  weight, grad = np.asarray(weight), np.asarray(grad)
  return ftml_update(weight.copy(), grad, FTMLSlots.zeros_like(weight), t=1,
                     **kwargs)


def test_mxnet_rounds_lr_times_lr_mult_once():
  """MXNet multiplies ``lr * lr_mult`` in double, then rounds to float:
  f32(0.01 * 0.7) and f32(f32(0.01) * 0.7) differ by an ulp, and so do
  float64 weights after one step."""
  assert np.float32(0.01 * 0.7) != np.float32(np.float32(0.01) * 0.7)
  with jax.enable_x64(True):
    weight = np.array([0.0, 0.5, -1.5])
    grad = np.array([0.3, -0.2, 0.05])
    opt = mxnet.ftml(0.01, lr_mult={"w": 0.7}, mxnet_version=2)
    params = {"w": jnp.asarray(weight)}
    updates, _ = opt.update({"w": jnp.asarray(grad)}, opt.init(params), params)
    ours = weight + np.asarray(updates["w"])
  once = _one_step(weight, grad, lr=0.01 * 0.7)
  twice = _one_step(weight, grad, lr=float(np.float32(0.01)) * 0.7)
  assert np.abs(once - twice).max() > 1e-10
  np.testing.assert_allclose(ours, once, rtol=1e-15, atol=1e-15)


def test_mxnet_keeps_epsilon_in_double():
  """FTMLParam's epsilon is a double: float64 weights see 0.1, not
  float32(0.1), which moves d_t by ~1e-8 relative where |g| ~ epsilon."""
  with jax.enable_x64(True):
    weight = np.array([0.5, -1.0, 2.0])
    grad = np.array([0.1, -0.05, 0.2])
    opt = mxnet.ftml(0.01, epsilon=0.1, mxnet_version=2)
    params = jnp.asarray(weight)
    updates, _ = opt.update(jnp.asarray(grad), opt.init(params), params)
    ours = weight + np.asarray(updates)
  double = _one_step(weight, grad, lr=0.01, epsilon=0.1)
  single = _one_step(weight, grad, lr=0.01, epsilon=float(np.float32(0.1)))
  assert np.abs(double - single).max() > 1e-11
  np.testing.assert_allclose(ours, double, rtol=1e-15, atol=1e-15)


def test_complex_z_follows_a_float64_state_dtype():
  """complex64 parameters with ``state_dtype=float64`` keep a complex128
  ``z`` and compute in complex128: no buffer is narrowed to complex64."""
  with jax.enable_x64(True):
    rng = np.random.RandomState(3)
    weight = (rng.randn(5) + 1j * rng.randn(5)).astype(np.complex64)
    grads = (rng.randn(20, 5) + 1j * rng.randn(20, 5)).astype(np.complex64)
    opt = ftml(0.01, state_dtype=jnp.float64)
    state = opt.init(jnp.asarray(weight))
    assert state.z.dtype == jnp.complex128 and state.v.dtype == jnp.float64
    ps, state = run(opt, jnp.asarray(weight), jnp.asarray(grads))
    assert state.z.dtype == jnp.complex128
    wide, _ = run(ftml(0.01), jnp.asarray(weight, jnp.complex128),
                  jnp.asarray(grads, jnp.complex128))
  # The complex64 weights are the complex128 run's, rounded at each step.
  np.testing.assert_allclose(ps, wide, rtol=2e-6)
