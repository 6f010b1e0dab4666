"""``ftml`` in an Optax chain against the NumPy transcription of MXNet's kernel.

The whole of MXNet's own test grid (324 settings) runs at once: the chain is
built inside ``jax.vmap`` from traced hyperparameters, and the reference
broadcasts them, so each setting gets its own trajectory of many steps. Each
entry point is also built as users build it, from Python floats, and
followed for hundreds of steps in float32 and float64.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ftml
from helpers import noisy_pull
from helpers import pull_problem
from helpers import relative_error
from helpers import run
from helpers import steps
from mxnet_reference import FTMLSlots
from mxnet_reference import collapsed_trajectory
from mxnet_reference import ftml_update
from mxnet_reference import trajectory

# MXNet's tests/python/unittest/test_optimizer.py::test_ftml grid.
GRID = list(itertools.product(
    [0.6, 0.5, 0.7],  # beta1
    [0.999, 0.8, 0.9],  # beta2
    [None, 0.4, 0.5],  # clip_gradient
    [1.0, 0.14, 0.8],  # rescale_grad
    [0.0, 0.03, 0.05, 0.07],  # wd
))
NAMES = ("beta1", "beta2", "clip_gradient", "rescale_grad", "wd")
SHAPES = {"a": (3, 4, 5), "b": (10, 4), "c": (7,)}  # MXNet 2.x's test shapes.


def grid_hyperparameters(dtype):
  """Each grid axis as an array over the cases; NaN stands for no clipping."""
  return {name: np.array([np.nan if case[i] is None else case[i] for case in GRID],
                         dtype) for i, name in enumerate(NAMES)}


def optax_chain(h, learning_rate, mxnet_version, dtype):
  """MXNet's pre-processing and FTML as the Optax chain the README documents."""
  rescale = optax.scale(h["rescale_grad"])
  clip = optax.clip(jnp.where(jnp.isnan(h["clip_gradient"]), jnp.inf,
                              h["clip_gradient"]).astype(dtype))
  decay = optax.add_decayed_weights(h["wd"])
  pre = [rescale, clip, decay] if mxnet_version == 2 else [rescale, decay, clip]
  return optax.chain(*pre, optax_ftml.ftml(learning_rate, h["beta1"], h["beta2"]))


class Problem:
  """Weights U[0, 1), and gradients noise + (w - target) computed from each
  implementation's own weights, so errors feed back as in training."""

  def __init__(self, steps, dtype, seed=0):
    rng = np.random.RandomState(seed)
    n = len(GRID)
    self.dtype = dtype
    self.weights = {k: rng.rand(n, *s).astype(dtype) for k, s in SHAPES.items()}
    self.target = {k: (2 * rng.rand(*s) - 1).astype(dtype) for k, s in SHAPES.items()}
    self.noise = {k: (rng.rand(steps, n, *s) - 0.5).astype(dtype)
                  for k, s in SHAPES.items()}
    self.steps = steps

  def astype(self, dtype):
    """The same problem with every array cast (exactly, when widening)."""
    other = Problem.__new__(Problem)
    other.dtype, other.steps = dtype, self.steps
    for name in ("weights", "target", "noise"):
      setattr(other, name, {k: x.astype(dtype) for k, x in getattr(self, name).items()})
    return other

  def reference(self, lrs, mxnet_version):
    """Trajectories (case, step, ...) and final slots from the NumPy kernel,
    given the hyperparameters unrounded (as ``ftml`` takes them)."""
    hp = grid_hyperparameters(np.float64)
    per_leaf = {k: {n: x.reshape((-1,) + (1,) * len(s)) for n, x in hp.items()}
                for k, s in SHAPES.items()}
    ws, slots = trajectory(self.weights, self.noise, lrs, noisy_pull(self.target),
                           per_leaf=per_leaf, mxnet_version=mxnet_version,
                           param_dtype=np.float64)
    return {k: np.swapaxes(x, 0, 1) for k, x in ws.items()}, slots

  def optax(self, learning_rate, mxnet_version):
    """Trajectories (case, step, ...) and final state from the Optax chain."""
    dtype = self.dtype

    def one_case(h, w, noise):
      opt = optax_chain(h, learning_rate, mxnet_version, dtype)
      trajectory, state = steps(opt, w, noise, noisy_pull(self.target))
      return trajectory, state[-1]

    run = jax.jit(jax.vmap(one_case, in_axes=(0, 0, 1)))
    trajectory, state = run(grid_hyperparameters(dtype), self.weights, self.noise)
    return jax.tree.map(np.asarray, trajectory), state


def schedule_and_values(steps, dtype):
  """A cosine decay from 0.02 to 0.002, and the values the reference uses.

  Optax's convention: the update with count n (0 for the first) uses
  schedule(n). A lookup table keeps the values identical on both sides.
  """
  values = (0.002 + 0.009 * (1 + np.cos(np.pi * np.arange(steps) / steps))
            ).astype(dtype)
  table = jnp.asarray(values)
  return (lambda count: table[count]), values


# Measured on this grid over 300 steps: float32 weights differ by up to 1.2e-5
# (on weights of size ~1); MXNet's float32 kernel is itself ~5e-6 away from
# the exact (float64) trajectory, and this implementation is equally close
# from the other side: XLA contracts multiply-adds that MXNet's CPU build does
# not, and its powf differs by an ulp now and then. float64 agrees to ~1e-14.
TOLERANCE = {np.float32: 2e-5, np.float64: 1e-12}


@pytest.mark.parametrize("mxnet_version", [2, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scheduled", [False, True])
def test_grid_many_steps(mxnet_version, dtype, scheduled):
  steps = 300
  with jax.enable_x64(dtype == np.float64):
    problem = Problem(steps, dtype)
    if scheduled:
      learning_rate, lrs = schedule_and_values(steps, dtype)
    else:
      learning_rate, lrs = 0.01, np.full(steps, 0.01, dtype)
    expected, slots = problem.reference(lrs, mxnet_version)
    actual, state = problem.optax(learning_rate, mxnet_version)
  tol = TOLERANCE[dtype]
  assert relative_error(actual, expected, floor=1.0) < tol
  # The states, relative to each buffer's scale (the gradients, hence v and
  # d, follow the weights' tiny drift).
  for ours, field in ((state.v, "v"), (state.d_prev, "d"), (state.z, "z")):
    theirs = {k: getattr(s, field) for k, s in slots.items()}
    scale = max(float(np.abs(x).max()) for x in theirs.values())
    assert relative_error(ours, theirs, floor=scale) < tol
  # The trajectories moved: the comparison is not between two constants.
  assert all(np.abs(expected[k][:, -1] - problem.weights[k]).max() > 0.1
             for k in expected)


@pytest.mark.parametrize("mxnet_version", [2, 1])
def test_float32_is_as_accurate_as_mxnet(mxnet_version):
  """Against the exact (float64) trajectory, the float32 Optax chain is no
  further than MXNet's own float32 kernel."""
  steps, lr = 300, 0.01
  problem = Problem(steps, np.float32)
  ours, _ = problem.optax(lr, mxnet_version)
  mxnet32, _ = problem.reference(np.full(steps, lr, np.float32), mxnet_version)
  exact, _ = problem.astype(np.float64).reference(np.full(steps, lr), mxnet_version)
  ours_error = relative_error(ours, exact, floor=1.0)
  mxnet_error = relative_error(mxnet32, exact, floor=1.0)
  assert 1e-7 < mxnet_error < 1e-4
  assert ours_error < 1.5 * mxnet_error


@pytest.mark.parametrize("mxnet_version", [2, 1])
def test_grid_first_step_like_mxnet_test(mxnet_version):
  """MXNet's own test (one update, weights and gradients U[0, 1)) made tight."""
  rng = np.random.RandomState(1)
  n = len(GRID)
  weights = {k: rng.rand(n, *s).astype(np.float32) for k, s in SHAPES.items()}
  grads = {k: rng.rand(n, *s).astype(np.float32) for k, s in SHAPES.items()}
  hp = grid_hyperparameters(np.float32)

  def one_case(h, w, g):
    opt = optax_chain(h, 0.0025, mxnet_version, np.float32)
    updates, state = opt.update(g, opt.init(w), w)
    return optax.apply_updates(w, updates), state[-1]

  new_w, state = jax.jit(jax.vmap(one_case))(hp, weights, grads)
  for k, s in SHAPES.items():
    h = {name: x.reshape((-1,) + (1,) * len(s)) for name, x in hp.items()}
    slots = FTMLSlots.zeros_like(weights[k])
    expected = ftml_update(
        weights[k], grads[k], slots, lr=0.0025, t=1, beta1=h["beta1"],
        beta2=h["beta2"], rescale_grad=h["rescale_grad"],
        clip_gradient=h["clip_gradient"], wd=h["wd"], mxnet_version=mxnet_version)
    # Without weight decay (whose g + wd * w XLA may fuse into a multiply-add)
    # v_1 = (1 - b2) * g**2 is bit-exact, which pins the float32 constant
    # 1 - b2 (1 - float32(0.999) = 0.000999987125, not float32(0.001)).
    no_decay = hp["wd"] == 0
    np.testing.assert_array_equal(np.asarray(state.v[k])[no_decay], slots.v[no_decay])
    np.testing.assert_allclose(np.asarray(state.v[k]), slots.v, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.d_prev[k]), slots.d, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_w[k]), expected, rtol=1e-6, atol=1e-7)


def test_reference_satisfies_the_collapsed_identity():
  """The NumPy kernel and the spec's collapsed identity agree in float64."""
  rng = np.random.RandomState(2)
  grads = rng.randn(200, 50)
  lrs = np.linspace(0.05, 0.001, 200)
  w0 = rng.randn(50)
  kernel, _ = trajectory(w0, grads, lrs, beta1=0.7, beta2=0.9, epsilon=1e-6,
                         param_dtype=np.float64)
  np.testing.assert_allclose(
      kernel, collapsed_trajectory(w0, grads, lrs, 0.7, 0.9, 1e-6), rtol=1e-10)


# --- The path users take: each entry point built from Python floats ----------
#
# The tests above pass hyperparameters as traced arrays; here they are Python
# floats, as in ``ftml(0.01, b2=0.999)``, so the per-step scalars (1 - b2 in
# float32, the float32 rounding of mxnet.ftml's arguments for float64
# weights) come from the code path users take.

USER_SHAPES = {"w": (6, 5), "b": (7,)}
MXNET_PREPROCESSING = dict(rescale_grad=0.14, clip_gradient=0.4)


def entry_points(wd):
  """name -> (build(learning_rate), the NumPy kernel's keywords, whether a
  schedule is called with MXNet's 1-based count)."""
  ftml_kernel = dict(beta1=0.7, beta2=0.999, param_dtype=np.float64)
  preprocessing = dict(MXNET_PREPROCESSING, wd=wd)
  points = {
      "ftml": (lambda lr: optax_ftml.ftml(lr, 0.7, 0.999), ftml_kernel, False),
      "ftml lean": (lambda lr: optax_ftml.ftml(lr, b1=0.7, b2=0.999,
                                               recompute_d_prev=True),
                    ftml_kernel, False)}
  for version in (2, 1):
    points[f"mxnet.ftml {version}"] = (
        lambda lr, version=version: optax_ftml.mxnet.ftml(
            lr, 0.7, 0.999, mxnet_version=version, **preprocessing),
        dict(beta1=0.7, beta2=0.999, mxnet_version=version, **preprocessing),
        True)
  return points


ENTRY_POINTS = list(entry_points(0.0))


def ftml_state(state):
  """FTML's own state, inside an ``mxnet.ftml`` chain or not."""
  return state if hasattr(state, "v") else state[-1]


def cosine(dtype, steps):
  """A decay from 0.02 to 0.002 over ``steps``, computed in ``dtype``."""
  return lambda count: 0.002 + 0.009 * (
      1 + jnp.cos(jnp.pi * count.astype(dtype) / steps))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_python_floats_first_step_v_is_bit_exact(name, dtype):
  """v_1 = (1 - b2) g**2 (g after rescaling and clipping) is exact: it pins
  1 - b2 as the kernel computes it (float32: 0.000999987125; float64:
  0.001 for ftml, 1 - (double)0.999f for mxnet.ftml)."""
  build, kernel, _ = entry_points(wd=0.0)[name]
  rng = np.random.RandomState(4)
  weights = {k: rng.rand(*s).astype(dtype) for k, s in USER_SHAPES.items()}
  grads = {k: rng.rand(1, *s).astype(dtype) for k, s in USER_SHAPES.items()}
  with jax.enable_x64(dtype == np.float64):
    opt = build(0.01)
    _, state = opt.update(jax.tree.map(lambda g: g[0], grads),
                          opt.init(weights), weights)
  _, slots = trajectory(weights, grads, [0.01], **kernel)
  for k in weights:
    assert ftml_state(state).v[k].dtype == dtype
    np.testing.assert_array_equal(ftml_state(state).v[k], slots[k].v)


def other_rounding(kernel):
  """The kernel's keywords with the other rounding of the hyperparameters:
  float32 for ftml's, none for mxnet.ftml's."""
  other = np.float32 if kernel.get("param_dtype") == np.float64 else np.float64
  return dict(kernel, param_dtype=other)


@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_python_floats_many_steps(name, dtype, scheduled):
  """300 steps of each entry point (weight decay too for mxnet.ftml), with
  a constant learning rate or a schedule computed in the parameters' dtype
  (called with the count before the update by ftml, after it by
  mxnet.ftml). float64: ftml computes with the given hyperparameters,
  mxnet.ftml with their float32 roundings, and each is far from the other."""
  steps = 300
  build, kernel, mxnet_count = entry_points(wd=0.03)[name]
  weights, target, noise = pull_problem(USER_SHAPES, steps, dtype, seed=3,
                                        uniform=True)
  with jax.enable_x64(dtype == np.float64):
    schedule = cosine(dtype, steps)
    ours, state = run(build(schedule if scheduled else 0.01), weights, noise,
                      noisy_pull(target))
    counts = jnp.arange(steps, dtype=jnp.int32) + int(mxnet_count)
    lrs = (np.asarray(jax.vmap(schedule)(counts)) if scheduled
           else np.full(steps, 0.01))
  expected, slots = trajectory(weights, noise, lrs, noisy_pull(target), **kernel)
  tolerance = TOLERANCE[dtype]
  assert relative_error(ours, expected, floor=1.0) < tolerance
  state = ftml_state(state)
  fields = [("v", "v"), ("z", "z")] + (
      [("d_prev", "d")] if hasattr(state, "d_prev") else [])
  for ours_field, field in fields:
    theirs = {k: getattr(s, field) for k, s in slots.items()}
    scale = max(float(np.abs(x).max()) for x in theirs.values())
    assert relative_error(getattr(state, ours_field), theirs,
                                floor=scale) < tolerance
  assert all(np.abs(expected[k][-1] - weights[k]).max() > 0.1 for k in weights)
  if dtype == np.float64:
    other, _ = trajectory(weights, noise, lrs, noisy_pull(target),
                          **other_rounding(kernel))
    assert relative_error(ours, other, floor=1.0) > 1e3 * tolerance
