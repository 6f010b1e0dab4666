"""``mxnet_ftml``: MXNet's argument names in, the equivalent Optax chain out."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mxnet_reference import FTMLSlots
from mxnet_reference import ftml_update
from optax_ftml import mxnet_ftml
from scan_training import noisy_pull
from scan_training import run

STEPS = 100


def reference_trajectory(params, noise, target, lrs, per_leaf):
  """The MXNet kernel per leaf; ``per_leaf[k]`` holds that leaf's keywords."""
  w = {k: np.asarray(x) for k, x in params.items()}
  slots = {k: FTMLSlots.zeros_like(x) for k, x in w.items()}
  out = {k: [] for k in w}
  for t in range(STEPS):
    for k in w:
      grad = noise[k][t] + (w[k] - target[k])
      kwargs = dict(per_leaf[k])
      lr = lrs[t] * kwargs.pop("lr_mult", 1.0)
      w[k] = ftml_update(w[k], grad, slots[k], lr=lr, t=t + 1, **kwargs)
      out[k].append(w[k])
  return {k: np.stack(x) for k, x in out.items()}


@pytest.fixture(scope="module")
def problem():
  rng = np.random.RandomState(7)
  shapes = {"w": (4, 3), "b": (3,)}
  params = {k: rng.rand(*s).astype(np.float32) for k, s in shapes.items()}
  target = {k: (2 * rng.rand(*s) - 1).astype(np.float32) for k, s in shapes.items()}
  noise = {k: (rng.rand(STEPS, *s) - 0.5).astype(np.float32) for k, s in shapes.items()}
  return params, noise, target


def assert_close(actual, expected):
  for k in expected:
    np.testing.assert_allclose(actual[k], expected[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mxnet_version", [2, 1])
@pytest.mark.parametrize("beta1, beta2, clip_gradient, rescale_grad, wd",
                         list(itertools.product([0.6, 0.7], [0.999, 0.9], [None, 0.4],
                                                [1.0, 0.14], [0.0, 0.05]))[::3])
def test_matches_mxnet_kernel(problem, mxnet_version, beta1, beta2, clip_gradient,
                              rescale_grad, wd):
  params, noise, target = problem
  opt = mxnet_ftml(0.01, beta1, beta2, wd=wd, rescale_grad=rescale_grad,
                   clip_gradient=clip_gradient, mxnet_version=mxnet_version)
  kwargs = dict(beta1=beta1, beta2=beta2, wd=wd, rescale_grad=rescale_grad,
                clip_gradient=clip_gradient, mxnet_version=mxnet_version)
  expected = reference_trajectory(params, noise, target, np.full(STEPS, 0.01),
                                  {k: kwargs for k in params})
  assert_close(run(opt, params, noise, noisy_pull(target))[0], expected)


def test_clip_and_decay_orders_differ(problem):
  """Large decay plus clipping: MXNet 1.x and 2.x give different weights, and
  each helper version matches its own MXNet version only."""
  params, noise, target = problem
  kwargs = dict(wd=5.0, clip_gradient=0.3)
  trajectories = {v: run(mxnet_ftml(0.01, mxnet_version=v, **kwargs), params,
                         noise, noisy_pull(target))[0] for v in (1, 2)}
  for version in (1, 2):
    expected = reference_trajectory(
        params, noise, target, np.full(STEPS, 0.01),
        {k: dict(mxnet_version=version, **kwargs) for k in params})
    assert_close(trajectories[version], expected)
  assert np.abs(trajectories[1]["w"] - trajectories[2]["w"]).max() > 1e-2


def test_schedule_follows_mxnet_convention(problem):
  """A schedule given to mxnet_ftml is called with MXNet's 1-based count."""
  params, noise, target = problem
  table = (0.02 * 0.97 ** np.arange(STEPS + 1)).astype(np.float32)
  table_jax = jnp.asarray(table)
  opt = mxnet_ftml(lambda num_update: table_jax[num_update])
  expected = reference_trajectory(params, noise, target, table[1:],
                                  {k: {} for k in params})
  assert_close(run(opt, params, noise, noisy_pull(target))[0], expected)


def test_lr_mult_and_wd_mult(problem):
  params, noise, target = problem
  lr_mult, wd_mult = {"w": 1.0, "b": 2.0}, {"w": 1.0, "b": 0.0}
  opt = mxnet_ftml(0.01, wd=0.05, lr_mult=lr_mult, wd_mult=wd_mult)
  expected = reference_trajectory(
      params, noise, target, np.full(STEPS, 0.01),
      {k: dict(lr_mult=lr_mult[k], wd=0.05 * wd_mult[k]) for k in params})
  assert_close(run(opt, params, noise, noisy_pull(target))[0], expected)


def test_zero_lr_mult_freezes_a_parameter(problem):
  params, noise, target = problem
  trajectory = run(mxnet_ftml(0.01, lr_mult={"w": 1.0, "b": 0.0}), params, noise,
                   noisy_pull(target))[0]
  np.testing.assert_array_equal(trajectory["b"][-1], params["b"])
  assert np.abs(trajectory["w"][-1] - params["w"]).max() > 0.1


@pytest.mark.parametrize("disabled", [None, 0, 0.0, -1.0])
def test_falsy_or_negative_clip_disables_clipping(problem, disabled):
  params, noise, target = problem
  noise = jax.tree.map(lambda n: 10 * n, noise)  # well beyond any clip value
  unclipped = run(mxnet_ftml(0.01), params, noise, noisy_pull(target))[0]
  chex.assert_trees_all_equal(
      run(mxnet_ftml(0.01, clip_gradient=disabled), params, noise,
          noisy_pull(target))[0], unclipped)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mxnet_version=3), ValueError, "mxnet_version must be 1 or 2"),
    (dict(wd=-0.1), ValueError, "wd must be >= 0"),
    (dict(wd="0.1"), TypeError, "wd must be a real number"),
    (dict(rescale_grad=None), TypeError, "rescale_grad"),
    (dict(clip_gradient="5"), TypeError, "clip_gradient"),
    (dict(lr_mult={"w": -1.0}), ValueError, "lr_mult must be >= 0"),
    (dict(wd_mult={"w": "x"}), TypeError, "wd_mult"),
    (dict(beta1=1.2), ValueError, "b1 must be in"),
    (dict(learning_rate=0.0), ValueError, "learning_rate"),
])
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    mxnet_ftml(**kwargs)
