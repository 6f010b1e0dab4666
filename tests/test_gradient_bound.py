"""Huge finite gradients: MXNet's numbers wherever MXNet's kernel is finite,
finite numbers beyond.

MXNet's kernel squares the gradient: beyond the largest ``|g|`` whose square
is finite (the float below 2**64 = 1.8e19 in float32, below 2**512 in
float64) ``v`` overflows and the weights become NaN. With ``v_0 = 0``,
``v_t`` is an average of the squares seen, so ``v_t / (1 - b2**t)`` does not
exceed the largest of them but for rounding. ``ftml`` limits finite
gradients to that bound; expected values come from the NumPy transcription
of MXNet's kernel, run on the same gradients or on the limited ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ftml
from helpers import jitted_step
from helpers import run
from mxnet_reference import FTMLSlots
from mxnet_reference import ftml_update

LR = 0.01


def largest_finite_square_root(dtype):
  """The largest ``x`` of ``dtype`` whose square is finite: the float below
  2**64 (float32) or 2**512 (float64), as the exponent range says."""
  return np.nextafter(dtype(2.0 ** (np.finfo(dtype).maxexp // 2)), dtype(0))


def test_the_bound_is_where_the_square_overflows():
  for dtype in (np.float32, np.float64):
    bound = largest_finite_square_root(dtype)
    with np.errstate(over="ignore"):
      assert np.isfinite(bound * bound)
      assert np.isinf(np.nextafter(bound, dtype(np.inf)) ** 2)


def ftml_steps(grads, w0, b2, dtype):
  """``ftml``'s weights and state (v, z, d_prev) after each gradient."""
  opt = optax_ftml.ftml(LR, b2=b2)
  step = jitted_step(opt)
  w, out = jnp.asarray(w0, dtype), []
  state = opt.init(w)
  for g in grads:
    w, state = step(w, state, jnp.asarray(g, dtype))
    out.append(tuple(np.asarray(x) for x in (w, state.v, state.z,
                                             state.d_prev)))
  return out


def reference_steps(grads, w0, b2):
  """The NumPy MXNet kernel's weights and slots (v, z, d) after each gradient.
  """
  w, slots, out = np.array(w0), FTMLSlots.zeros_like(np.array(w0)), []
  for t, g in enumerate(grads, start=1):
    with np.errstate(over="ignore", invalid="ignore"):
      # ftml keeps the hyperparameters as given (mxnet.ftml rounds them).
      w = ftml_update(w, g, slots, lr=LR, t=t, beta2=b2,
                      param_dtype=np.float64)
    out.append((w, slots.v.copy(), slots.z.copy(), slots.d.copy()))
  return out


def gradients_with(huge, dtype, steps=12, n=4):
  """Ordinary gradients, with ``huge`` at the first step of element 0, the
  fourth of element 1 and the last of element 2 (``-huge``)."""
  grads = np.random.RandomState(0).randn(steps, n).astype(dtype)
  grads[0, 0], grads[3, 1], grads[-1, 2] = huge, huge, -huge
  return grads


def assert_same_steps(actual, expected, dtype):
  rtol = 1e-5 if dtype == np.float32 else 1e-12
  for t, (a, e) in enumerate(zip(actual, expected, strict=True), start=1):
    for name, x, y in zip(("weights", "v", "z", "d"), a, e, strict=True):
      assert np.all(np.isfinite(y)), (t, name)
      np.testing.assert_allclose(x, y, rtol=rtol, err_msg=f"{name}, t={t}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b2", [0.999, 0.9, 0.8])
@pytest.mark.parametrize("below", [0, 1, 1000])
def test_just_below_the_bound_gives_mxnets_numbers(dtype, b2, below):
  """Gradients at the bound (or ``below`` floats under it), where MXNet's
  kernel is still finite: the weights and every slot are MXNet's."""
  huge = largest_finite_square_root(dtype)
  for _ in range(below):
    huge = np.nextafter(huge, dtype(0))
  grads = gradients_with(huge, dtype)
  w0 = np.array([1.0, -2.0, 0.5, 3.0], dtype)
  with jax.enable_x64(dtype == np.float64):
    actual = ftml_steps(grads, w0, b2, dtype)
  assert_same_steps(actual, reference_steps(grads, w0, b2), dtype)


def limited(grads, dtype):
  bound = largest_finite_square_root(dtype)
  return np.clip(grads, -bound, bound)


@pytest.mark.parametrize("dtype, huge", [
    *((np.float32, huge) for huge in ["next", 2e19, -1e25, 1e30, 3e38, "max"]),
    *((np.float64, huge) for huge in ["next", 2e154, 1e200, "max"]),
])
def test_beyond_the_bound_gives_mxnets_numbers_for_the_limited_gradient(
    dtype, huge):
  """Where MXNet's ``g * g`` overflows (its weights become NaN), ``ftml``
  continues as MXNet does on the gradient limited to the bound."""
  bound = largest_finite_square_root(dtype)
  huge = {"next": np.nextafter(bound, dtype(np.inf)),
          "max": np.finfo(dtype).max}.get(huge, huge)
  grads = gradients_with(dtype(huge), dtype)
  w0 = np.array([1.0, -2.0, 0.5, 3.0], dtype)
  plain = reference_steps(grads, w0, 0.999)
  assert not np.all(np.isfinite(plain[0][0]))
  with jax.enable_x64(dtype == np.float64):
    actual = ftml_steps(grads, w0, 0.999, dtype)
  assert_same_steps(actual, reference_steps(limited(grads, dtype), w0, 0.999),
                    dtype)


def test_where_the_bias_correction_rounds_over_the_largest_float():
  """The bound twice in a row: v_2 / (1 - b2**2), with float32's rounding
  of 1 - 0.999**2, exceeds the largest float32 (MXNet's weights become
  NaN); it is taken as the largest float, so the step stays finite."""
  bound = largest_finite_square_root(np.float32)
  grads = np.array([[bound, 1.0], [bound, 1.0]], np.float32)
  w0 = np.array([1.0, -2.0], np.float32)
  assert np.isnan(reference_steps(grads, w0, 0.999)[1][0][0])
  actual = ftml_steps(grads, w0, 0.999, np.float32)
  assert all(np.all(np.isfinite(x)) for x in actual[1])
  # Collapsed identity, since d_2 rounds: the step is -(1 - b1) g / d_2.
  d_2 = (1 - 0.6**2) / LR * np.sqrt(np.float64(np.finfo(np.float32).max))
  np.testing.assert_allclose(actual[1][0][0] - actual[0][0][0],
                             -0.4 * np.float64(bound) / d_2, rtol=1e-5)
  # The other element is MXNet's.
  assert_same_steps([tuple(x[1:] for x in a) for a in actual],
                    reference_steps(grads[:, 1:], w0[1:], 0.999), np.float32)


@pytest.mark.parametrize("huge", [1e20, -1e25, 3e38])
def test_complex_gradient_components_are_limited(huge):
  """For complex gradients ``|g|**2 = re**2 + im**2``: each component is
  limited to sqrt(max / 2), the state stays finite, the first step has
  length lr, and training goes on."""
  params = jnp.array([1.0, -2.0, 0.5], jnp.complex64)
  grads = jnp.asarray(np.random.RandomState(2).randn(60, 3), jnp.complex64)
  grads = grads.at[10, 0].set(huge + 1j * huge)
  opt = optax_ftml.ftml(LR)
  ps, state = run(opt, params, grads)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(
      (ps, state)))
  first, _ = opt.update(grads[10], opt.init(params), params)
  np.testing.assert_allclose(np.abs(np.asarray(first[0])), LR, rtol=1e-4)
  assert np.all(np.asarray(ps[-1])[1:] != np.asarray(ps[11])[1:])


@pytest.mark.parametrize("pre", ["clip", "clip_by_global_norm"])
@pytest.mark.parametrize("huge", [1e20, -1e25, 3e38])
def test_clipping_before_ftml_survives_overflowing_gradients(pre, huge):
  """The recommended guard: clip before ``ftml``, and wrap the chain in
  ``apply_if_finite`` for NaN/Inf gradients. Training continues finite."""
  clip = {"clip": optax.clip(1.0), "clip_by_global_norm":
          optax.clip_by_global_norm(1.0)}[pre]
  opt = optax.apply_if_finite(optax.chain(clip, optax_ftml.ftml(LR)),
                              max_consecutive_errors=3)
  rng = np.random.RandomState(1)
  grads = rng.randn(40, 3).astype(np.float32)
  grads[5, 0] = huge
  grads[6, 1] = np.nan
  ps, state = run(opt, jnp.array([1.0, -2.0, 0.5]), jnp.asarray(grads))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(
      (ps, state)))
  # Training went on after the bad steps.
  assert np.all(np.asarray(ps[-1]) != np.asarray(ps[7]))
