"""Faults and bad input: non-finite and extreme gradients, extreme but valid
hyperparameters, and mistakes in what is passed to ``update``.

Expected values come from the NumPy transcription of MXNet's kernel, from the
spec's collapsed identity, or from the mathematics of the step, never from
the implementation itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ftml
from helpers import run
from mxnet_reference import collapsed_trajectory
from mxnet_reference import trajectory


def all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# --- Non-finite gradients ----------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_propagates_like_optax(bad):
  """Alone, a NaN/Inf gradient element gives a NaN update there, as in
  ``optax.adam``; the other elements are unaffected."""
  params = jnp.array([1.0, -2.0, 0.5, 3.0])
  grad = jnp.array([0.3, bad, -1.0, 2.0], jnp.float32)
  clean = grad.at[1].set(0.7)
  opt = optax_ftml.ftml(0.01)
  updates, state = opt.update(grad, opt.init(params), params)
  clean_updates, _ = opt.update(clean, opt.init(params), params)
  with jax.numpy_dtype_promotion("standard"):  # Optax's own bias correction.
    adam_updates, _ = optax.adam(0.01).update(grad, optax.adam(0.01).init(params))
  np.testing.assert_array_equal(np.isfinite(updates), np.isfinite(adam_updates))
  assert np.isnan(updates[1])
  keep = np.array([True, False, True, True])
  np.testing.assert_array_equal(np.asarray(updates)[keep],
                                np.asarray(clean_updates)[keep])
  assert not np.isfinite(state.z[1])
  assert all_finite(jax.tree.map(lambda x: x[keep], (state.v, state.z,
                                                     state.d_prev)))


def test_apply_if_finite_skips_bad_steps_and_training_resumes():
  """Wrapped in ``optax.apply_if_finite``, a step with a NaN/Inf gradient
  leaves parameters and state untouched; the trajectory is the one without
  the bad steps (the step count included)."""
  rng = np.random.RandomState(0)
  steps, bad_steps = 60, {10: np.nan, 11: np.inf, 30: -np.inf}
  grads = rng.randn(steps, 5).astype(np.float32)
  poisoned = grads.copy()
  for t, value in bad_steps.items():
    poisoned[t, t % 5] = value
  w0 = rng.randn(5).astype(np.float32)
  opt = optax.apply_if_finite(optax_ftml.ftml(0.01, b1=0.7), max_consecutive_errors=5)
  ps, state = run(opt, jnp.asarray(w0), jnp.asarray(poisoned))
  ps = np.asarray(ps)

  good = [t for t in range(steps) if t not in bad_steps]
  expected, slots = trajectory(
      w0, grads[good], np.full(len(good), 0.01, np.float32), beta1=0.7)
  np.testing.assert_allclose(ps[good], expected, rtol=2e-6, atol=1e-7)
  for t in bad_steps:
    np.testing.assert_array_equal(ps[t], ps[t - 1] if t else w0)
  assert int(state.total_notfinite) == len(bad_steps)
  assert int(state.inner_state.count) == len(good)
  assert all_finite(state.inner_state)
  np.testing.assert_allclose(state.inner_state.z, slots.z, rtol=2e-6)
  # A bad step changes nothing: a zero update, the inner state bit for bit.
  last = jnp.asarray(ps[-1])
  updates, after = opt.update(jnp.full(5, jnp.nan), state, last)
  np.testing.assert_array_equal(updates, np.zeros(5))
  for ours, before in zip(jax.tree.leaves(after.inner_state),
                          jax.tree.leaves(state.inner_state), strict=True):
    np.testing.assert_array_equal(ours, before)


# --- Overflowing, tiny and zero gradients -----------------------------------

@pytest.mark.parametrize("dtype,state_dtype", [
    (jnp.float32, None),
    (jnp.bfloat16, jnp.float32),
    (jnp.float16, jnp.float32),
])
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_zero_gradients_for_100k_steps(dtype, state_dtype, eps):
  """Zero gradients leave the parameters where they are: exactly with
  ``eps = 0`` (every step is 0/0, taken as 0), and otherwise to within the
  rounding of z while the bias correction settles (a few ulps, not a drift)."""
  opt = optax_ftml.ftml(0.0025, eps=eps, state_dtype=state_dtype)
  biggest = 6e4 if dtype == jnp.float16 else 3e38
  w0 = jnp.concatenate([jnp.linspace(-3, 3, 61),
                        jnp.array([0.0, 1e-30, -1e-4, biggest])]).astype(dtype)

  def step(carry, _):
    p, state = carry
    updates, state = opt.update(jnp.zeros_like(p), state, p)
    new = optax.apply_updates(p, updates)
    return (new, state), (jnp.all(jnp.isfinite(new)), jnp.any(new != p))

  run = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), length=100_000))
  (w, state), (finite, moved) = run(w0)
  assert bool(jnp.all(finite)) and all_finite(state)
  # Only while 1 - b1**t still changes (b1**t < 2**-24 after ~33 steps).
  assert not bool(jnp.any(moved[100:]))
  w0, w = np.asarray(w0, np.float64), np.asarray(w, np.float64)
  if eps == 0:
    np.testing.assert_array_equal(w, w0)
  else:
    ulp = float(jnp.finfo(dtype).eps)
    np.testing.assert_array_less(np.abs(w - w0), 4 * ulp * np.abs(w0) + 1e-37)



@pytest.mark.parametrize("tiny", [1e-30, -1e-38, 1e-45])
def test_tiny_gradients_stay_finite_and_match_mxnet(tiny):
  """|g| <= 1e-30: g * g underflows to 0 in float32, so d = eps-limited and
  the steps are ~ g / eps * lr: finite, tiny, and what MXNet computes."""
  rng = np.random.RandomState(2)
  grads = (tiny * rng.choice([-1.0, 1.0], size=(200, 4))).astype(np.float32)
  w0 = np.array([1.0, -1.0, 1e-3, 0.0], np.float32)
  ps, state = run(optax_ftml.ftml(0.01), jnp.asarray(w0), jnp.asarray(grads))
  assert all_finite((ps, state))
  expected, _ = trajectory(w0, grads, np.full(200, 0.01, np.float32))
  np.testing.assert_allclose(ps, expected, rtol=1e-6, atol=1e-30)


def test_scale_invariance_with_eps_zero():
  """With eps = 0 the step is invariant to the gradients' scale, down to
  gradients whose square still is a normal float32 (|g| ~ 1e-15); below
  that g * g underflows, v = 0 and the step is taken as 0 (0/0)."""
  rng = np.random.RandomState(3)
  grads = rng.randn(50, 6).astype(np.float32)
  w0 = jnp.asarray(rng.randn(6).astype(np.float32))
  opt = optax_ftml.ftml(0.01, eps=0.0)
  unit, _ = run(opt, w0, jnp.asarray(grads))
  small, _ = run(opt, w0, jnp.asarray(grads * np.float32(1e-15)))
  np.testing.assert_allclose(small, unit, rtol=1e-5)
  vanishing, state = run(opt, w0, jnp.asarray(grads * np.float32(1e-30)))
  np.testing.assert_array_equal(vanishing[-1], w0)
  assert all_finite(state)


# --- Extreme but valid hyperparameters ---------------------------------------


def test_largest_float32_beta2_below_one():
  """b2 = 1 - 2**-24 is accepted; 1 - b2**t stays positive and the run
  agrees with MXNet's float32 kernel."""
  b2 = 1 - 2**-24
  rng = np.random.RandomState(4)
  grads = rng.randn(300, 8).astype(np.float32)
  w0 = rng.randn(8).astype(np.float32)
  ps, state = run(optax_ftml.ftml(0.01, b2=b2), jnp.asarray(w0),
                         jnp.asarray(grads))
  assert all_finite((ps, state))
  expected, _ = trajectory(w0, grads, np.full(300, 0.01, np.float32),
                                     beta2=b2)
  np.testing.assert_allclose(ps, expected, rtol=1e-5, atol=1e-5)


def test_eps_zero_matches_mxnet_where_mxnet_is_defined():
  """eps = 0: the kernel where gradients are non-zero; 0 instead of MXNet's
  0/0 = NaN for an element whose gradients have all been zero."""
  rng = np.random.RandomState(5)
  grads = rng.randn(100, 4).astype(np.float32)
  grads[:, 3] = 0
  grads[:20, 2] = 0  # zero at first, then not
  w0 = rng.randn(4).astype(np.float32)
  ps, state = run(optax_ftml.ftml(0.01, eps=0.0), jnp.asarray(w0),
                  jnp.asarray(grads))
  assert all_finite((ps, state))
  with np.errstate(invalid="ignore", divide="ignore"):
    expected, _ = trajectory(w0, grads, np.full(100, 0.01, np.float32),
                                       epsilon=0.0)
  assert np.all(np.isnan(expected[:, 3])) and np.all(np.isnan(expected[:20, 2]))
  np.testing.assert_allclose(ps[:, :2], expected[:, :2], rtol=1e-5)
  np.testing.assert_array_equal(ps[:, 3], np.full(100, w0[3]))
  np.testing.assert_array_equal(ps[:20, 2], np.full(20, w0[2]))
  # Everywhere, the exact trajectory in the limit eps -> 0 (a tiny eps in
  # float64 turns 0/0 into 0 and changes nothing else).
  exact = collapsed_trajectory(w0, grads, np.full(100, 0.01), 0.6, 0.999, 1e-300)
  np.testing.assert_allclose(ps, exact, rtol=1e-5, atol=1e-6)


# Relative to the largest displacement: steps of 1e-12 on weights of size 1
# keep ~4 of float64's digits, steps of 1e3 all of them.
@pytest.mark.parametrize("learning_rate,tolerance", [(1e-12, 1e-3), (1e3, 1e-12)])
def test_extreme_learning_rates_follow_the_math_in_float64(learning_rate, tolerance):
  """In float64 the trajectory is the collapsed identity's, even for steps of
  1e-12 on weights of size 1 or steps of ~1e3."""
  rng = np.random.RandomState(6)
  grads = rng.randn(100, 5)
  w0 = rng.randn(5)
  with jax.enable_x64(True):
    ps, state = run(optax_ftml.ftml(learning_rate), jnp.asarray(w0),
                           jnp.asarray(grads))
    ps = np.asarray(ps)
  assert ps.dtype == np.float64 and all_finite(state)
  exact = collapsed_trajectory(w0, grads, np.full(100, learning_rate), 0.6,
                               0.999, 1e-8)
  moved = exact - w0
  assert np.all(np.abs(moved[-1]) > 0.5 * learning_rate)
  np.testing.assert_allclose(ps - w0, moved, rtol=0,
                             atol=tolerance * np.abs(moved).max())


@pytest.mark.parametrize("learning_rate", [1e-12, 1e3])
def test_extreme_learning_rates_in_float32_are_as_accurate_as_mxnet(learning_rate):
  """In float32 a 1e-12 step is below the weights' resolution: the weights
  move by a few ulps at most, as in MXNet's kernel. With 1e3 the weights
  reach ~1e4; against the exact trajectory both are off by float32 rounding,
  this implementation no more than MXNet's kernel."""
  rng = np.random.RandomState(7)
  grads = rng.randn(100, 5).astype(np.float32)
  w0 = rng.randn(5).astype(np.float32)
  ps, state = run(optax_ftml.ftml(learning_rate), jnp.asarray(w0),
                         jnp.asarray(grads))
  assert all_finite((ps, state))
  ps = np.asarray(ps)
  mxnet32, _ = trajectory(
      w0, grads, np.full(100, learning_rate, np.float32))
  exact = collapsed_trajectory(w0, grads, np.full(100, learning_rate), 0.6,
                               0.999, 1e-8)
  ours_error = np.abs(ps - exact).max()
  mxnet_error = np.abs(mxnet32 - exact).max()
  assert ours_error <= 1.5 * mxnet_error
  assert ours_error < 1e-6 * np.abs(exact).max()
  if learning_rate < 1:
    assert np.all(np.abs(ps - w0) < 2e-6 * np.abs(w0))


# --- Mistakes in what is passed to update -------------------------------------

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}


def test_missing_params_is_a_clear_error():
  opt = optax_ftml.ftml()
  with pytest.raises(ValueError, match=r"update needs the current parameters"):
    opt.update(PARAMS, opt.init(PARAMS))


@pytest.mark.parametrize("grads", [
    {"w": jnp.ones((2, 3)), "bias": jnp.zeros(3)},  # another name
    {"w": jnp.ones((2, 3))},  # a leaf missing
])
def test_mismatched_gradient_tree_is_a_clear_error(grads):
  opt = optax_ftml.ftml()
  with pytest.raises(ValueError, match=r"the gradients tree does not match the"
                     r" parameters tree"):
    opt.update(grads, opt.init(PARAMS), PARAMS)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_integer_parameters_are_a_clear_error(dtype):
  params = {"w": jnp.ones(3), "steps": jnp.zeros(2, dtype)}
  with pytest.raises(TypeError, match=rf"params\['steps'\] has dtype"
                     rf" {jnp.dtype(dtype).name}; FTML needs floating"):
    optax_ftml.ftml().init(params)


@pytest.mark.parametrize("other", [
    {"w": jnp.ones((2, 3))},
    {"w": jnp.ones((2, 3)), "c": jnp.zeros(3)},
    {"w": jnp.ones((2, 3)), "b": jnp.zeros(3), "extra": jnp.zeros(1)},
    [jnp.ones((2, 3)), jnp.zeros(3)],
    {"w": {"kernel": jnp.ones((2, 3))}, "b": jnp.zeros(3)},
])
def test_state_for_another_tree_fails_loudly(other):
  """A state (e.g. a restored checkpoint) built for other parameters."""
  opt = optax_ftml.ftml()
  with pytest.raises(ValueError, match=r"the state.v tree does not match the"
                     r" parameters tree"):
    opt.update(PARAMS, opt.init(other), PARAMS)
  with pytest.raises(ValueError, match=r"the state.v tree does not match"):
    jax.jit(opt.update)(PARAMS, opt.init(other), PARAMS)


def test_state_with_incompatible_leaf_shapes_fails():
  opt = optax_ftml.ftml()
  other = {"w": jnp.ones((3, 2)), "b": jnp.zeros(3)}
  with pytest.raises((TypeError, ValueError)):
    opt.update(PARAMS, opt.init(other), PARAMS)


@pytest.mark.parametrize("other", [
    {"w": jnp.ones((1, 3)), "b": jnp.zeros(3)},
    {"w": jnp.ones(()), "b": jnp.zeros(())},
])
def test_state_with_broadcastable_leaf_shapes_fails_loudly(other):
  """Leaves that would broadcast against the parameters (and silently train
  a wrong state) are refused too."""
  opt = optax_ftml.ftml()
  with pytest.raises(ValueError, match=r"shapes do not match"):
    opt.update(PARAMS, opt.init(other), PARAMS)
  with pytest.raises(ValueError, match=r"shapes do not match"):
    opt.update({"w": jnp.ones((1, 3)), "b": jnp.zeros(3)}, opt.init(PARAMS),
               PARAMS)


def test_orbax_checkpoint_of_other_parameters_fails_loudly(tmp_path):
  """Restoring FTML state saved for other parameters: into a target built
  from the current parameters Orbax refuses; restored as it was saved,
  ``update`` refuses it. (Orbax also refuses other leaf shapes, but leaves
  its aborted reads to be collected later, which would fail another test.)"""
  ocp = pytest.importorskip("orbax.checkpoint")
  opt = optax_ftml.ftml()
  new_params = {**PARAMS, "extra": jnp.zeros(2)}
  path = tmp_path / "state"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, opt.init(PARAMS))
  with ocp.StandardCheckpointer() as checkpointer:
    with pytest.raises(ValueError, match=r"Structure mismatch"):
      checkpointer.restore(path, jax.eval_shape(opt.init, new_params))
    as_saved = checkpointer.restore(path, jax.eval_shape(opt.init, PARAMS))
  with pytest.raises(ValueError, match=r"the state.v tree does not match"):
    opt.update(new_params, as_saved, new_params)


