"""``ftml(..., recompute_d_prev=True)``: Adam's memory, the default's trajectory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import noisy_pull
from helpers import pull_problem
from helpers import relative_error
from helpers import run
from mxnet_reference import trajectory
from optax_ftml import FTMLLeanState
from optax_ftml import FTMLState
from optax_ftml import ftml

SHAPES = {"a": (6, 5), "b": (7,)}


def test_state_has_adams_memory_and_distinct_buffers():
  params = {"w": jnp.zeros((100, 10)), "b": jnp.zeros(10, jnp.bfloat16)}
  state = ftml(recompute_d_prev=True).init(params)
  assert isinstance(state, FTMLLeanState)
  assert state._fields == ("count", "v", "z", "prev_learning_rate")
  assert state.prev_learning_rate.shape == () and state.prev_learning_rate == 0
  per_parameter = sum(x.nbytes for x in jax.tree.leaves((state.v, state.z)))
  adam = optax.adam(1e-3).init(params)[0]
  assert per_parameter == sum(
      x.nbytes for x in jax.tree.leaves((adam.mu, adam.nu)))
  default = ftml().init(params)
  assert isinstance(default, FTMLState)
  assert sum(x.nbytes for x in jax.tree.leaves(default)) > sum(
      x.nbytes for x in jax.tree.leaves(state))
  buffers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(
      (state.v, state.z))]
  assert len(set(buffers)) == len(buffers)


def test_recompute_d_prev_is_a_keyword_only_bool():
  with pytest.raises(TypeError):
    ftml(0.1, 0.6, 0.999, 1e-8, None, True)  # pylint: disable=too-many-function-args
  with pytest.raises(TypeError, match="recompute_d_prev must be a bool"):
    ftml(recompute_d_prev=1)


def schedule(steps, dtype, zeros=()):
  """A warm-up and cosine decay (as a lookup table, so both sides see the same
  values), with the learning rate set to exactly 0 at the steps ``zeros``."""
  values = (0.05 * np.minimum(1, (np.arange(steps) + 1) / 20)
            * (0.55 + 0.45 * np.cos(np.pi * np.arange(steps) / steps)))
  values[list(zeros)] = 0
  values = values.astype(dtype)
  table = jnp.asarray(values)
  return (lambda count: table[count]), values


@pytest.mark.parametrize("dtype, tolerance", [(np.float32, 2e-5),
                                              (np.float64, 1e-12)])
@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("beta1, beta2, eps", [(0.6, 0.999, 1e-8),
                                               (0.9, 0.9, 1e-6)])
def test_matches_the_numpy_kernel(dtype, tolerance, scheduled, beta1, beta2,
                                  eps):
  steps = 300
  with jax.enable_x64(dtype == np.float64):
    weights, target, noise = pull_problem(SHAPES, steps, dtype)
    if scheduled:
      learning_rate, lrs = schedule(steps, dtype)
    else:
      learning_rate, lrs = 0.01, np.full(steps, 0.01, dtype)
    ours, _ = run(
        ftml(learning_rate, beta1, beta2, eps, recompute_d_prev=True),
        weights, noise, noisy_pull(target))
  expected, _ = trajectory(weights, noise, lrs, noisy_pull(target), beta1=beta1,
                           beta2=beta2, epsilon=eps, param_dtype=np.float64)
  assert relative_error(ours, expected) < tolerance
  # The weights travelled: this is not a comparison of two constants.
  assert all(np.abs(expected[k][-1] - weights[k]).max() > 0.1 for k in weights)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_trajectory_as_the_default_state(dtype):
  """Over 500 scheduled steps with learning-rate zeros (the first step, and
  two in a row later), the lean and the default state agree: in float64 to
  ~1e-13, in float32 to the rounding that MXNet's recursion amplifies."""
  steps = 500
  with jax.enable_x64(dtype == np.float64):
    weights, target, noise = pull_problem(SHAPES, steps, dtype, seed=3)
    learning_rate, lrs = schedule(steps, dtype, zeros=(0, 200, 201))
    default, default_state = run(ftml(learning_rate), weights, noise,
                                 noisy_pull(target))
    lean, lean_state = run(ftml(learning_rate, recompute_d_prev=True),
                           weights, noise, noisy_pull(target))
  assert lean_state.count == default_state.count == steps
  assert float(lean_state.prev_learning_rate) == float(lrs[-1])
  tolerance = {np.float32: 2e-5, np.float64: 1e-12}[dtype]
  assert relative_error(lean, default) < tolerance
  for ours, theirs in ((lean_state.v, default_state.v),
                       (lean_state.z, default_state.z)):
    assert relative_error(jax.tree.map(np.asarray, ours),
                          jax.tree.map(np.asarray, theirs),
                          floor=1e-3) < 10 * tolerance
  # Zero learning rates are no-ops in both.
  for k in weights:
    np.testing.assert_array_equal(lean[k][0], weights[k])
    np.testing.assert_array_equal(lean[k][201], lean[k][199])


def test_one_step_from_the_same_state_differs_by_rounding_only():
  """Along the default state's trajectory, a lean step from the same v, z and
  count (d_prev recomputed instead of read) gives v within 1 ulp and the
  same weights to float32 rounding."""
  steps = 300
  weights, target, noise = pull_problem(SHAPES, steps, np.float32, seed=5)
  learning_rate, _ = schedule(steps, np.float32, zeros=(0, 100))
  default, lean = ftml(learning_rate), ftml(learning_rate,
                                            recompute_d_prev=True)

  def step(carry, noise_t):
    w, state, prev_lr = carry
    grads = jax.tree.map(lambda n, x, c: n + (x - c), noise_t, w, target)
    updates, new_state = default.update(grads, state, w)
    lean_updates, lean_state = lean.update(
        grads, FTMLLeanState(state.count, state.v, state.z, prev_lr), w)
    w_new = optax.apply_updates(w, updates)
    return ((w_new, new_state, lean_state.prev_learning_rate),
            (w_new, optax.apply_updates(w, lean_updates), new_state.v,
             lean_state.v))

  init = (weights, default.init(weights), jnp.float32(0))
  _, (w, w_lean, v, v_lean) = jax.jit(
      lambda c, n: jax.lax.scan(step, c, n))(init, noise)
  for k in weights:
    np.testing.assert_array_max_ulp(np.asarray(v[k]), np.asarray(v_lean[k]),
                                    maxulp=1)
    w_k = np.asarray(w[k])
    scale = np.abs(w_k).max(axis=tuple(range(1, w_k.ndim)), keepdims=True)
    assert np.all(np.abs(np.asarray(w_lean[k]) - w_k) <= 1e-5 * scale)


def test_zero_eps_and_zero_gradients_give_no_nan():
  """With eps = 0, elements whose gradients have all been zero have d = 0;
  recomputing d_prev there gives 0 again, not 0/0."""
  steps = 50
  grads = np.random.RandomState(7).randn(steps, 6).astype(np.float32)
  grads[:, :2] = 0
  grads[:10, 2] = 0  # zero for a while, then not
  w0 = np.linspace(-1, 1, 6).astype(np.float32)

  lean, default = (np.asarray(run(ftml(0.01, eps=0.0, recompute_d_prev=recompute),
                                  w0, grads)[0]) for recompute in (True, False))
  assert np.all(np.isfinite(lean))
  np.testing.assert_array_equal(lean[:, :2], np.broadcast_to(w0[:2], (steps, 2)))
  np.testing.assert_array_equal(lean[:10, 2], w0[2])
  np.testing.assert_allclose(lean, default, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, state_dtype", [
    (jnp.complex128, None), (jnp.bfloat16, jnp.float32),
    (jnp.bfloat16, None), (jnp.float16, jnp.float16)])
def test_other_dtypes_follow_the_default_state(dtype, state_dtype):
  """Half-precision weights: the same weights (the lean state recomputes
  d_prev and rounds it as the default state stores it)."""
  steps = 100
  rng = np.random.RandomState(11)
  shape = (4, 3)
  grads = rng.randn(steps, *shape) + (
      1j * rng.randn(steps, *shape) if dtype == jnp.complex128 else 0)
  with jax.enable_x64(dtype == jnp.complex128):
    grads = jnp.asarray(grads, dtype)
    w0 = jnp.ones(shape, dtype)
    lean, default = (np.asarray(run(
        ftml(0.05, state_dtype=state_dtype, recompute_d_prev=recompute),
        w0, grads)[0]).astype(np.complex128) for recompute in (True, False))
  assert np.all(np.isfinite(lean))
  if dtype == jnp.complex128:
    np.testing.assert_allclose(lean, default, rtol=1e-12, atol=1e-12)
  else:
    np.testing.assert_array_equal(lean, default)
  assert np.abs(default[-1] - 1).max() > 0.1


def test_with_inject_hyperparams_and_optax_wrappers():
  opt = optax.inject_hyperparams(ftml, static_args=("recompute_d_prev",))(
      learning_rate=0.01, recompute_d_prev=True)
  params = {"w": jnp.ones(3)}
  state = opt.init(params)
  step = jax.jit(lambda p, s: opt.update({"w": jnp.full(3, 0.5)}, s, p))
  for _ in range(3):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert isinstance(state.inner_state, FTMLLeanState)
  assert state.inner_state.prev_learning_rate == np.float32(0.01)
  # A constant gradient: each step is lr (1 - b1) / (1 - b1**t).
  expected = 1 - 0.01 * 0.4 * sum(1 / (1 - 0.6**t) for t in (1, 2, 3))
  np.testing.assert_allclose(params["w"], expected, rtol=1e-5)
