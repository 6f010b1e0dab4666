"""The generic checks Optax runs on every optimizer it ships, applied to ``ftml``.

They mirror ``optax/_src/alias_test.py`` and ``optax/contrib/_optax_common_test.py``
(both ship in Optax's wheel) using only public APIs.
"""

import inspect
import unittest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import _common_test as optax_common_test

import helpers
from optax_ftml import ftml

LEARNING_RATE = 1e-2  # converges on every target below, real and complex


def parabola(dtype):
  initial = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)
  final = jnp.array([1.0, -1.0, 1.0], dtype=dtype)
  if jnp.iscomplexobj(initial):
    final = final * jnp.asarray(1 + 1j, dtype)
  return initial, final, lambda p: jnp.sum(jnp.abs(p - final) ** 2)


def rosenbrock(dtype):
  a = jnp.asarray(1 + 1j if jnp.issubdtype(dtype, jnp.complexfloating) else 1.0,
                  dtype)
  initial = jnp.zeros(2, dtype)
  final = jnp.stack([a, a**2])
  hundred = jnp.asarray(100.0, jnp.finfo(dtype).dtype)
  return initial, final, lambda p: (jnp.abs(a - p[0]) ** 2
                                    + hundred * jnp.abs(p[1] - p[0] ** 2) ** 2)


def matrix_parabola(dtype):
  initial = jnp.zeros((2, 2), dtype)
  final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
  return initial, final, lambda p: jnp.sum(jnp.abs(p - final) ** 2)


def mixed_tensors(dtype):
  final = (jnp.array([1.0, -1.0, 2.0], dtype),
           jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))
  initial = jax.tree.map(jnp.zeros_like, final)
  return initial, final, lambda p: sum(
      jnp.sum(jnp.abs(x - y) ** 2) for x, y in zip(p, final, strict=True))


def run(opt, params, objective, steps):
  """The parameters after ``steps`` jitted steps on ``objective``, and the
  state."""
  ps, state = helpers.run(opt, params, jnp.arange(steps), lambda p, _: (
      optax.tree.conj(jax.grad(objective)(p))))
  return jax.tree.map(lambda p: p[-1], ps), state


@pytest.mark.parametrize("target", [parabola, rosenbrock, matrix_parabola,
                                    mixed_tensors])
def test_optimization_converges(target):
  opt = ftml(LEARNING_RATE)
  initial, final, objective = target(jnp.float32)
  params, _ = run(opt, initial, objective, 30_000)
  chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("target", [parabola, rosenbrock])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64])
def test_optimization_converges_real_and_complex(target, dtype):
  opt = ftml(LEARNING_RATE)
  initial, final, objective = target(dtype)
  params, state = run(opt, initial, objective, 10_000)
  chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)
  assert state.v.dtype == state.d_prev.dtype == jnp.finfo(dtype).dtype
  assert state.z.dtype == dtype


def test_tree_map_params():
  opt = ftml(LEARNING_RATE)
  params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
  state = opt.init(params)
  doubled = optax.tree.map_params(opt, lambda p: 2 * p, state)
  # Every per-parameter buffer is mapped, the count is not.
  assert doubled.count is state.count
  for field in ("v", "z", "d_prev"):
    chex.assert_trees_all_equal_structs(getattr(doubled, field), params)


def test_extra_args_and_no_recompilation():
  opt = ftml(LEARNING_RATE)  # deliberately not wrapped in with_extra_args_support
  initial, _, objective = rosenbrock(jnp.float32)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)
    grads = jax.grad(objective)(params)
    updates, state = opt.update(grads, state, params,
                                unexpected_extra_args_your_optimizer_doesnt_expect=1)
    return optax.apply_updates(params, updates), state

  params, state = initial, opt.init(initial)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1


@pytest.mark.parametrize("learning_rate", [
    1e-2, optax.exponential_decay(0.02, transition_steps=1, decay_rate=0.9)])
def test_inject_hyperparams_matches(learning_rate):
  """Injected hyperparameters (arrays in the state) and Python floats give
  the same updates and state step by step, and the same 30-step trajectory
  under ``jit``, a schedule included."""
  kwargs = dict(learning_rate=learning_rate, b1=0.7, b2=0.9, eps=1e-6)
  opt = ftml(**kwargs)
  injected = optax.inject_hyperparams(ftml)(**kwargs)
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
  state, state_injected = jax.jit(opt.init)(params), jax.jit(injected.init)(params)
  with jax.numpy_dtype_promotion("standard"):  # optax's schedules promote
    for _ in range(5):
      updates, state = jax.jit(opt.update)(grads, state, params)
      updates_injected, state_injected = jax.jit(injected.update)(
          grads, state_injected, params)
      chex.assert_trees_all_close(updates_injected, updates, rtol=1e-6)
      chex.assert_trees_all_close(state_injected.inner_state, state, rtol=1e-6)
      params = optax.apply_updates(params, updates)
    assert float(state_injected.hyperparams["b1"]) == pytest.approx(0.7)

    rng = np.random.RandomState(5)
    many = jnp.asarray(rng.randn(30, 5).astype(np.float32))
    w0 = jnp.asarray(rng.randn(5).astype(np.float32))
    trajectory, _ = helpers.run(opt, w0, many)
    trajectory_injected, _ = helpers.run(injected, w0, many)
  chex.assert_trees_all_close(trajectory_injected, trajectory, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_preserve_dtype(dtype):
  opt = ftml(LEARNING_RATE)
  params = jnp.array([1.0, 2.0], dtype=dtype)
  grads = jax.grad(lambda x: jnp.sum(x**2))(params)
  updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
  assert updates.dtype == params.dtype


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gradient_accumulation(dtype):
  """MultiSteps over 20 accumulated steps: zero updates between them, and
  each applied step is FTML's on the mean of the two gradients from the same
  state, to one ulp of the weights (the two are compiled in different
  programs, which may round differently)."""
  k, steps = 2, 20
  # A rate at which bfloat16 weights move by many ulps.
  opt = optax.MultiSteps(ftml(0.05), every_k_schedule=k)
  plain = jax.jit(ftml(0.05).update)
  rng = np.random.RandomState(6)
  # Multiples of 1/8 in [-2, 2]: their means are exact in bfloat16 however
  # MultiSteps accumulates them (its arithmetic differs between Optax
  # releases), so both sides see the same mean gradients.
  grads = np.clip(np.round(rng.randn(steps, k, 3) * 8) / 8, -2, 2)
  grads[0] = [[0.125, -0.25, 0.375], [0.375, 0.0, -0.125]]
  grads = jnp.asarray(grads, dtype)
  params = jnp.asarray([1.0, 2.0, -3.0], dtype)
  state = opt.init(params)
  # MultiSteps itself mixes its float32 counters with bfloat16 gradients.
  with jax.numpy_dtype_promotion("standard"):
    for t in range(steps):
      for micro in range(k - 1):
        updates, state = jax.jit(opt.update)(grads[t, micro], state, params)
        chex.assert_trees_all_equal(updates, jnp.zeros_like(params))
      inner_before = state.inner_opt_state
      updates, state = jax.jit(opt.update)(grads[t, k - 1], state, params)
      mean = jnp.mean(grads[t].astype(jnp.float32), axis=0).astype(dtype)
      expected, expected_state = plain(mean, inner_before, params)
      assert int(state.inner_opt_state.count) == int(expected_state.count) == t + 1
      new, expected_new = (np.asarray(optax.apply_updates(params, u), np.float64)
                           for u in (updates, expected))
      assert np.all(np.abs(new - expected_new) <= np.abs(np.spacing(
          expected_new.astype(dtype)).astype(np.float64))), (t, new - expected_new)
      # Every applied step moves the weights: this compares steps, not no-ops.
      assert np.any(new != np.asarray(params, np.float64)), t
      params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32,
                                   jnp.float64, jnp.complex64, jnp.complex128])
def test_state_shape_dtype_shard_stability(dtype):
  with jax.enable_x64(dtype in (jnp.float64, jnp.complex128)):
    opt = ftml(LEARNING_RATE)
    initial, _, objective = parabola(dtype)

    @jax.jit
    def step(params, state):
      grads = optax.tree.conj(jax.grad(objective)(params))
      # lax.cond checks that both branches agree on shapes and dtypes.
      cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      updates, state = jax.lax.cond(
          cond, lambda: opt.update(grads, state, params), lambda: (params, state))
      return optax.apply_updates(params, updates), state

    params, state = initial, opt.init(initial)
    for _ in range(2):
      params, new_state = step(params, state)
      assert params.dtype == dtype
      chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
      state = new_state


def test_optax_runs_its_schedule_test_on_ftml(monkeypatch):
  """Optax's own test, run on ``ftml``: it inspects ``learning_rate``'s
  annotation and skips optimizers that do not declare a schedule (as it would
  if the annotation were a string), else checks a constant schedule steps as
  the constant does."""
  assert (inspect.signature(ftml).parameters["learning_rate"].annotation
          is optax.ScalarOrSchedule)
  # Optax looks the optimizer up by name in optax.contrib.
  monkeypatch.setattr(optax.contrib, "ftml", ftml, raising=False)
  name = "test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such"
  generated = [n for n in dir(optax_common_test.ContribTest) if n.startswith(name)]
  test = getattr(optax_common_test.ContribTest, generated[0]).__wrapped__
  try:
    test(optax_common_test.ContribTest(generated[0]), opt_name="ftml",
         opt_kwargs={"learning_rate": 1e-3}, wrapper_name=None,
         wrapper_kwargs=None)
  except unittest.SkipTest as skipped:
    pytest.fail(f"Optax skipped its schedule test for ftml: {skipped}")


def test_mixed_float32_float64_inputs_keep_dtypes():
  with jax.enable_x64(True):
    opt = ftml(LEARNING_RATE)
    params = (jnp.array([1.0, 2.0], jnp.float32), jnp.array([3.0, 4.0], jnp.float64))
    grads = jax.tree.map(lambda x: x / 10, params)
    updates, state = opt.update(grads, opt.init(params), params)
    assert [u.dtype for u in updates] == [jnp.float32, jnp.float64]
    for field in ("v", "z", "d_prev"):
      assert [x.dtype for x in getattr(state, field)] == [jnp.float32, jnp.float64]
    assert np.all(np.isfinite(np.concatenate([np.asarray(u, np.float64)
                                              for u in updates])))
