"""``mxnet.ftml``: MXNet's argument names in, the equivalent Optax chain out."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import noisy_pull
from helpers import run
from mxnet_reference import trajectory
from optax_ftml import mxnet

STEPS = 100


@pytest.fixture(scope="module")
def problem():
  rng = np.random.RandomState(7)
  shapes = {"w": (4, 3), "b": (3,)}
  params = {k: rng.rand(*s).astype(np.float32) for k, s in shapes.items()}
  target = {k: (2 * rng.rand(*s) - 1).astype(np.float32) for k, s in shapes.items()}
  noise = {k: (rng.rand(STEPS, *s) - 0.5).astype(np.float32) for k, s in shapes.items()}
  return params, noise, target


# Relative to weights of size ~1 after 100 steps.
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}


def assert_close(actual, expected, dtype=np.float32):
  for k in expected:
    np.testing.assert_allclose(actual[k], expected[k], rtol=0,
                               atol=TOLERANCE[dtype])


@pytest.mark.parametrize("mxnet_version", [2, 1])
@pytest.mark.parametrize("beta1, beta2, clip_gradient, rescale_grad, wd",
                         list(itertools.product([0.6, 0.7], [0.999, 0.9], [None, 0.4],
                                                [1.0, 0.14], [0.0, 0.05]))[::3])
def test_matches_mxnet_kernel(problem, mxnet_version, beta1, beta2, clip_gradient,
                              rescale_grad, wd):
  params, noise, target = problem
  opt = mxnet.ftml(0.01, beta1, beta2, wd=wd, rescale_grad=rescale_grad,
                   clip_gradient=clip_gradient, mxnet_version=mxnet_version)
  expected, _ = trajectory(
      params, noise, np.full(STEPS, 0.01), noisy_pull(target), beta1=beta1,
      beta2=beta2, wd=wd, rescale_grad=rescale_grad, clip_gradient=clip_gradient,
      mxnet_version=mxnet_version)
  assert_close(run(opt, params, noise, noisy_pull(target))[0], expected)


def test_clip_and_decay_orders_differ(problem):
  """Large decay plus clipping: MXNet 1.x and 2.x give different weights, and
  each helper version matches its own MXNet version only."""
  params, noise, target = problem
  kwargs = dict(wd=5.0, clip_gradient=0.3)
  trajectories = {v: run(mxnet.ftml(0.01, mxnet_version=v, **kwargs), params,
                         noise, noisy_pull(target))[0] for v in (1, 2)}
  for version in (1, 2):
    expected, _ = trajectory(params, noise, np.full(STEPS, 0.01),
                             noisy_pull(target), mxnet_version=version, **kwargs)
    assert_close(trajectories[version], expected)
  assert np.abs(trajectories[1]["w"] - trajectories[2]["w"]).max() > 1e-2


def test_schedule_follows_mxnet_convention(problem):
  """A schedule given to mxnet.ftml is called with MXNet's 1-based count."""
  params, noise, target = problem
  table = (0.02 * 0.97 ** np.arange(STEPS + 1)).astype(np.float32)
  table_jax = jnp.asarray(table)
  opt = mxnet.ftml(lambda num_update: table_jax[num_update])
  expected, _ = trajectory(params, noise, table[1:], noisy_pull(target))
  assert_close(run(opt, params, noise, noisy_pull(target))[0], expected)


@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lr_mult_and_wd_mult(problem, dtype, scheduled):
  """Per-parameter multipliers, with a constant rate or a schedule whose
  values (float64 ones for float64 parameters) MXNet multiplies by lr_mult
  in double and then rounds to float32, as it rounds wd * wd_mult: float64
  parameters follow MXNet's float64 kernel, not the unrounded values."""
  params, noise, target = jax.tree.map(lambda x: x.astype(dtype), problem)
  lr_mult, wd_mult = {"w": 1.0, "b": 0.3}, {"w": 0.7, "b": 0.0}
  rates = 0.02 * 0.97 ** np.arange(STEPS + 1) if scheduled else np.full(
      STEPS + 1, 0.01)
  with jax.enable_x64(dtype == np.float64):
    table = jnp.asarray(rates.astype(dtype))
    opt = mxnet.ftml((lambda num_update: table[num_update]) if scheduled
                     else 0.01, wd=0.05, lr_mult=lr_mult, wd_mult=wd_mult)
    ours = run(opt, params, noise, noisy_pull(target))[0]
  per_leaf = {k: dict(lr_mult=lr_mult[k], wd=0.05 * wd_mult[k]) for k in params}
  expected, _ = trajectory(params, noise, rates.astype(dtype)[1:],
                           noisy_pull(target), per_leaf=per_leaf)
  assert_close(ours, expected, dtype)
  if dtype == np.float64:
    unrounded, _ = trajectory(params, noise, rates[1:], noisy_pull(target),
                              per_leaf=per_leaf, param_dtype=np.float64)
    assert max(np.abs(ours[k] - unrounded[k]).max() for k in params) > 1e-9


def test_zero_lr_mult_freezes_a_parameter(problem):
  params, noise, target = problem
  trajectory = run(mxnet.ftml(0.01, lr_mult={"w": 1.0, "b": 0.0}), params, noise,
                   noisy_pull(target))[0]
  np.testing.assert_array_equal(trajectory["b"][-1], params["b"])
  assert np.abs(trajectory["w"][-1] - params["w"]).max() > 0.1


@pytest.mark.parametrize("disabled", [None, 0, 0.0, -1.0])
def test_falsy_or_negative_clip_disables_clipping(problem, disabled):
  params, noise, target = problem
  noise = jax.tree.map(lambda n: 10 * n, noise)  # well beyond any clip value
  unclipped = run(mxnet.ftml(0.01), params, noise, noisy_pull(target))[0]
  chex.assert_trees_all_equal(
      run(mxnet.ftml(0.01, clip_gradient=disabled), params, noise,
          noisy_pull(target))[0], unclipped)
