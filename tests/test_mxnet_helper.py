"""``mxnet.ftml``: MXNet's argument names in, the equivalent Optax chain out."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import noisy_pull
from helpers import run
from mxnet_reference import ftml_step
from mxnet_reference import trajectory
from optax_ftml import mxnet
from optax_ftml.mxnet import _schedules

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
  opt = mxnet.ftml(lambda num_update: table_jax[num_update], mxnet_version=2)
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
                     else 0.01, wd=0.05, lr_mult=lr_mult, wd_mult=wd_mult,
                     mxnet_version=2)
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
  trajectory = run(mxnet.ftml(0.01, lr_mult={"w": 1.0, "b": 0.0}, mxnet_version=2),
                   params, noise,
                   noisy_pull(target))[0]
  np.testing.assert_array_equal(trajectory["b"][-1], params["b"])
  assert np.abs(trajectory["w"][-1] - params["w"]).max() > 0.1


@pytest.mark.parametrize("disabled", [None, 0, 0.0, -1.0])
def test_falsy_or_negative_clip_disables_clipping(problem, disabled):
  params, noise, target = problem
  noise = jax.tree.map(lambda n: 10 * n, noise)  # well beyond any clip value
  unclipped = run(mxnet.ftml(0.01, mxnet_version=2), params, noise,
                  noisy_pull(target))[0]
  chex.assert_trees_all_equal(
      run(mxnet.ftml(0.01, clip_gradient=disabled, mxnet_version=2), params,
          noise, noisy_pull(target))[0], unclipped)


def test_tuples_in_the_multiplier_tree_are_subtrees():
  """Multipliers are matched to leaves by position in the tree: a tuple of
  two floats is two leaves, however much it looks like an (lr, wd) pair."""
  params = {"layer": (jnp.ones(3), jnp.ones(3)), "pair": (0.5, 2.0)}
  params = jax.tree.map(jnp.asarray, params)
  lr_mult = {"layer": (0.5, 2.0), "pair": (1.0, 0.0)}
  wd_mult = {"layer": (1.0, 0.0), "pair": (0.0, 1.0)}
  opt = mxnet.ftml(0.01, wd=0.1, lr_mult=lr_mult, wd_mult=wd_mult,
                   mxnet_version=2)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
    lr = lr_mult[path[0].key][path[1].idx]
    wd = wd_mult[path[0].key][path[1].idx]
    param = params[path[0].key][path[1].idx]
    # The first step: -lr (1 - b1) / (1 - b1) * g / (|g| + eps), g = 1 + wd w.
    g = 1 + np.float32(0.1 * wd) * np.asarray(param, np.float32)
    np.testing.assert_allclose(update, -lr * 0.01 * g / (np.abs(g) + 1e-8)
                               if lr else 0, rtol=1e-4)


# --- MXNet 2's FTML.step (use_fused_step=False) ------------------------------

@pytest.mark.parametrize("beta1, beta2, clip_gradient, rescale_grad, wd",
                         list(itertools.product(
                             [0.6, 0.7], [0.999, 0.9], [None, 0.4, 0, -0.3],
                             [1.0, 0.14], [0.0, 0.05]))[::3])
def test_unfused_step_matches_mxnet2_step(problem, beta1, beta2,
                                          clip_gradient, rescale_grad, wd):
  """100 steps of use_fused_step=False against the transcription of MXNet
  2's FTML.step, clipping as nd.clip does (0 zeroes the gradient, a
  negative bound flips it)."""
  params, noise, target = problem
  opt = mxnet.ftml(0.01, beta1, beta2, wd=wd, rescale_grad=rescale_grad,
                   clip_gradient=clip_gradient, mxnet_version=2,
                   use_fused_step=False)
  expected, _ = trajectory(
      params, noise, np.full(STEPS, 0.01), noisy_pull(target),
      update=ftml_step, beta1=beta1, beta2=beta2, wd=wd,
      rescale_grad=rescale_grad, clip_gradient=clip_gradient)
  assert_close(run(opt, params, noise, noisy_pull(target))[0], expected)


def ulps_from(actual, expected):
  """The largest difference in ulps of the expected array's largest value."""
  expected = np.asarray(expected)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected))
               / np.spacing(np.max(np.abs(expected))))


@pytest.mark.parametrize("scheduled", [False, True])
def test_unfused_state_is_mxnet2_steps_not_the_kernels(problem, scheduled):
  """FTML.step's 1 - beta2 in double moves v by ~1.3e-5 relative (a hundred
  float32 ulps) from the fused kernel's at beta2 = 0.999: the unfused state
  is within a few ulps of the transcription, the fused one's v far from it.
  A schedule's rate is float32 (MXNet's is double), which d barely sees."""
  params, noise, target = problem
  params, noise, target = ({"w": params["w"]}, {"w": noise["w"][:30]},
                           {"w": target["w"]})
  rates = 0.02 * 0.97 ** np.arange(31)
  table = jnp.asarray(rates, jnp.float32)
  rate = (lambda num_update: table[num_update]) if scheduled else 0.01
  expected_rates = rates[1:] if scheduled else np.full(30, 0.01)
  weights, slots = trajectory(params, noise, expected_rates,
                              noisy_pull(target), update=ftml_step, wd=0.01)
  expected = {"d": slots["w"].d, "v": slots["w"].v, "z": slots["w"].z}

  def differences(fused):
    ours, state = run(mxnet.ftml(rate, wd=0.01, mxnet_version=2,
                                 use_fused_step=fused), params, noise,
                      noisy_pull(target))
    ftml_state = state[-1]
    actual = {"d": ftml_state.d_prev["w"], "v": ftml_state.v["w"],
              "z": ftml_state.z["w"], "weight": ours["w"][-1]}
    return {k: ulps_from(actual[k], {**expected, "weight": weights["w"][-1]}[k])
            for k in actual}

  unfused, fused = differences(False), differences(True)
  # After 30 open-loop steps; the float32 rate of a schedule leaves z and the
  # weight 9 ulps off on JAX 0.9's XLA (8 on later ones), still an order of
  # magnitude inside the fused kernel's distance below.
  assert max(unfused.values()) <= 12, unfused
  assert fused["v"] >= 50, fused


def test_unfused_step_is_mxnet2s():
  with pytest.raises(ValueError, match="use_fused_step=False is MXNet 2's"):
    mxnet.ftml(0.01, mxnet_version=1, use_fused_step=False)


# --- The version is explicit --------------------------------------------------

def test_mxnet_version_is_required():
  with pytest.raises(TypeError, match="mxnet_version"):
    mxnet.ftml(0.01)  # pyright: ignore[reportCallIssue]


@pytest.mark.parametrize("version, rate", [(1, 0.01), (2, 0.0025)])
def test_default_learning_rate_is_the_versions(problem, version, rate):
  """MXNet 1.x's FTML takes the base class's 0.01, MXNet 2's its own 0.0025."""
  params, noise, target = problem
  chex.assert_trees_all_equal(
      run(mxnet.ftml(mxnet_version=version), params, noise,
          noisy_pull(target))[0],
      run(mxnet.ftml(rate, mxnet_version=version), params, noise,
          noisy_pull(target))[0])


# --- Under optax.inject_hyperparams ------------------------------------------

def test_injected_hyperparameters_step_as_floats(problem):
  """learning_rate, beta1, beta2, epsilon, wd and rescale_grad may be
  injected (mxnet_version named static): the same numbers as floats."""
  params, noise, target = problem
  arguments = dict(learning_rate=0.01, beta1=0.7, beta2=0.99, epsilon=1e-6,
                   wd=1e-2, rescale_grad=0.5, clip_gradient=0.3)
  for version in (1, 2):
    expected = run(mxnet.ftml(**arguments, mxnet_version=version), params,
                   noise, noisy_pull(target))[0]
    injected = optax.inject_hyperparams(
        mxnet.ftml, static_args=("mxnet_version", "clip_gradient"))(
            **arguments, mxnet_version=version)
    chex.assert_trees_all_equal(
        run(injected, params, noise, noisy_pull(target))[0], expected)


@pytest.mark.parametrize("arguments, name", [
    (dict(mxnet_version=2), "mxnet_version"),
    (dict(clip_gradient=0.3), "clip_gradient"),
    (dict(use_fused_step=False, beta2=0.99), "beta1"),
])
def test_injected_structural_hyperparameters_name_static_args(
    problem, arguments, name):
  params, noise, target = problem
  static = () if name == "mxnet_version" else ("mxnet_version",)
  injected = optax.inject_hyperparams(mxnet.ftml, static_args=static)
  with pytest.raises(TypeError, match=rf"{name} must be .*static_args=\('{name}',\)"):
    run(injected(0.01, wd=1e-4, **{"mxnet_version": 2, **arguments}), params,
        noise, noisy_pull(target))


def test_unfused_scalars_beyond_their_tables(problem, monkeypatch):
  """The per-step scalars are tabulated in double; beyond the tables' limit
  (here 3 steps) they are computed in float32, and the steps stay MXNet 2's
  to float32 rounding."""
  monkeypatch.setattr(_schedules, "_MAX_TABULATED_UPDATES", 3)
  params, noise, target = problem
  opt = mxnet.ftml(0.01, 0.9, 0.999, wd=0.05, mxnet_version=2,
                   use_fused_step=False)
  expected, _ = trajectory(params, noise, np.full(STEPS, 0.01),
                           noisy_pull(target), update=ftml_step, beta1=0.9,
                           wd=0.05)
  assert_close(run(opt, params, noise, noisy_pull(target))[0], expected)
