"""Property-based tests: ``ftml`` against the independent NumPy references.

Hypothesis draws shapes, dtypes, hyperparameters, gradient sequences and
chains (clipping, weight decay, rescaling, schedules). Hyperparameters reach
the optimizer as traced arrays, so examples of the same shapes share one
compilation.
"""

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import strategies as st

import optax_ftml
from helpers import steps
from mxnet_reference import FTMLSlots
from mxnet_reference import collapsed_trajectory
from mxnet_reference import ftml_update
from mxnet_reference import ftml_update_low_precision
from mxnet_reference import trajectory

SETTINGS = hypothesis.settings(max_examples=50, deadline=None, derandomize=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])
SHAPES = [(), (5,), (3, 4), (2, 1, 3)]
STEPS = [1, 6, 40]


def log_uniform(low, high):
  return st.floats(np.log10(low), np.log10(high)).map(lambda x: 10.0**x)


@st.composite
def problems(draw, steps=None, min_gradient=1e-3, max_gradient=1e3,
             min_learning_rate=1e-4, max_learning_rate=1.0, max_weight=1e2):
  """Initial weights, gradients fixed in advance, and FTML hyperparameters."""
  shape = draw(st.sampled_from(SHAPES))
  steps = draw(st.sampled_from(STEPS if steps is None else steps))
  rng = np.random.RandomState(draw(st.integers(0, 2**32 - 1)))
  # Gradients of a per-element magnitude, random signs and some spread.
  scale = draw(log_uniform(min_gradient, max_gradient))
  size = (steps, *shape)
  grads = scale * rng.uniform(0.5, 2, size) * rng.choice([-1, 1], size)
  return {
      "w0": draw(log_uniform(1e-2, max_weight)) * rng.randn(*shape),
      "grads": grads,
      "lr": draw(log_uniform(min_learning_rate, max_learning_rate)),
      "b1": draw(st.floats(0.0, 0.95)),
      "b2": draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 0.999, 0.9999])),
      "eps": draw(st.sampled_from([0.0, 1e-8, 1e-6, 1e-3])),
  }


@functools.partial(jax.jit, static_argnames=("state_dtype", "pre"))
def optax_trajectory(w0, grads, lr, b1, b2, eps, pre=(), state_dtype=None,
                     clip=None, wd=None, rescale=None):
  """Weights after each step of ``chain(*pre, ftml)``; ``lr`` is a scalar or,
  as a schedule, a table indexed by the update count."""
  rate = (lambda count: lr[count]) if lr.ndim else lr
  transforms = {"rescale": lambda: optax.scale(rescale),
                "clip": lambda: optax.clip(clip),
                "decay": lambda: optax.add_decayed_weights(wd)}
  opt = optax.chain(*(transforms[name]() for name in pre),
                    optax_ftml.ftml(rate, b1, b2, eps, state_dtype=state_dtype))

  ws, state = steps(opt, w0, grads)
  return ws, state[-1]


def as_arrays(p, dtype, names=("w0", "grads", "lr", "b1", "b2", "eps")):
  return {k: jnp.asarray(np.asarray(p[k], dtype)) for k in names}


def reference(p, dtype, lrs=None, update=ftml_update, state_dtype=None, **kwargs):
  """The NumPy kernel's trajectory in ``dtype`` (slots in ``state_dtype``),
  given the hyperparameters unrounded (as ``ftml`` takes them)."""
  w0 = np.asarray(p["w0"], dtype)
  slots = FTMLSlots(*(np.zeros(w0.shape, state_dtype or dtype),) * 3)
  lrs = np.full(len(p["grads"]), p["lr"]) if lrs is None else lrs
  return trajectory(w0, np.asarray(p["grads"], dtype), lrs, update=update,
                    slots=slots, beta1=p["b1"], beta2=p["b2"], epsilon=p["eps"],
                    param_dtype=np.float64, **kwargs)[0]


def assert_close_to_scale(actual, expected, rtol, w0, b2=0.0):
  """Errors relative to each element's magnitude along the trajectory (FTML
  recomputes the weight as -z/d: rounding is relative to it, not the step).

  Each step also carries the rounding of 1 - b2**t, amplified by 1 / (1 - b2)
  for b2 near 1 (MXNet's powf and XLA's pow may differ by an ulp): allowed
  in proportion to the path length.
  """
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  w0 = np.asarray(w0, np.float64)
  scale = np.maximum(np.abs(expected).max(axis=0), np.abs(w0))  # per element
  path = np.abs(np.diff(expected, axis=0, prepend=w0[None])).sum(axis=0)
  ulp = 2.0**-23 if rtol > 1e-9 else 2.0**-52
  atol = rtol * scale + 2 * ulp / (1 - b2) * path
  assert np.all(np.abs(actual - expected) <= atol), np.abs(actual - expected).max()


@SETTINGS
@hypothesis.given(problems())
def test_float32_matches_the_mxnet_kernel(p):
  ws, _ = optax_trajectory(**as_arrays(p, np.float32))
  assert_close_to_scale(ws, reference(p, np.float32), 2e-5, p["w0"], p["b2"])


@SETTINGS
@hypothesis.given(problems())
def test_float64_matches_the_mxnet_kernel(p):
  with jax.enable_x64(True):
    ws, state = optax_trajectory(**as_arrays(p, np.float64))
    assert ws.dtype == jnp.float64 and state.v.dtype == jnp.float64
  assert_close_to_scale(ws, reference(p, np.float64), 1e-12, p["w0"], p["b2"])


# Half precision: float16's range limits where its state is usable (d ~ |g|
# / lr and z ~ d w must stay within [6e-5, 6e4]); the float32 state has no
# such limit. Weights are compared in ulps of their dtype, relative to the
# trajectory's magnitude: at a rounding tie the two sides may round apart.
HALF_CASES = st.sampled_from([
    (jnp.bfloat16, None, 4), (jnp.bfloat16, np.float32, 2),
    (jnp.float16, np.float16, 16), (jnp.float16, None, 2),
])


@SETTINGS
@hypothesis.given(HALF_CASES, problems(
    steps=[1, 6, 20], min_gradient=1e-1, max_gradient=10, min_learning_rate=1e-2,
    max_learning_rate=1.0, max_weight=3))
def test_half_precision_matches_the_float32_kernel_with_rounded_state(case, p):
  dtype, state_dtype, ulps = case
  arrays = as_arrays(p, np.float32)
  arrays["w0"] = arrays["w0"].astype(dtype)
  arrays["grads"] = arrays["grads"].astype(dtype)
  ws, state = optax_trajectory(**arrays, state_dtype=state_dtype)
  assert ws.dtype == dtype
  state_dtype = state_dtype or (np.float32 if dtype == jnp.float16 else dtype)
  assert state.v.dtype == state_dtype
  rounded = {**p, "w0": np.asarray(arrays["w0"]), "grads": np.asarray(arrays["grads"])}
  expected = reference(rounded, dtype, update=ftml_update_low_precision,
                       state_dtype=state_dtype)
  assert_close_to_scale(ws, expected.astype(np.float32),
                        ulps * float(jnp.finfo(dtype).eps), rounded["w0"])


@st.composite
def chains(draw):
  """MXNet's pre-processing (2.x or 1.x order) and a schedule."""
  p = draw(problems(steps=[6, 40]))
  version = draw(st.sampled_from([2, 1]))
  rescale = draw(st.sampled_from([1.0, 0.125, 0.7]))
  clip = draw(st.sampled_from([None, 0.1, 1.0, 10.0]))
  wd = draw(st.sampled_from([0.0, 1e-4, 0.05]))
  steps = len(p["grads"])
  schedule = draw(st.sampled_from(["constant", "cosine", "warmup"]))
  if schedule == "constant":
    lrs = np.full(steps, p["lr"])
  elif schedule == "cosine":
    lrs = p["lr"] * 0.5 * (1 + np.cos(np.pi * np.arange(steps) / steps))
  else:  # linear warm-up
    lrs = p["lr"] * np.minimum(1, (1 + np.arange(steps)) / (1 + steps // 3))
  return p, version, rescale, clip, wd, lrs.astype(np.float32)


@SETTINGS
@hypothesis.given(chains())
def test_chains_match_the_mxnet_kernel(case):
  """rescale -> clip -> weight decay -> ftml (2.x) or rescale -> weight decay
  -> clip -> ftml (1.x), with the schedule's values as the kernel's rates."""
  p, version, rescale, clip, wd, lrs = case
  pre = ("rescale", "clip", "decay") if version == 2 else ("rescale", "decay", "clip")
  ws, _ = optax_trajectory(
      **as_arrays(p, np.float32, names=("w0", "grads", "b1", "b2", "eps")),
      lr=jnp.asarray(lrs), pre=pre, rescale=jnp.float32(rescale),
      clip=jnp.float32(np.inf if clip is None else clip), wd=jnp.float32(wd))
  expected = reference(p, np.float32, lrs=lrs, rescale_grad=rescale,
                       clip_gradient=clip, wd=wd, mxnet_version=version)
  assert_close_to_scale(ws, expected, 2e-5, p["w0"], p["b2"])


@SETTINGS
@hypothesis.given(problems(steps=[6, 40]),
                  st.sampled_from(["constant", "decreasing", "random"]))
def test_collapsed_identity(p, schedule):
  """The spec's collapsed identity: w_t = w_{t-1} - lr_t (1 - b1) /
  (1 - b1**t) g_t / (sqrt(v_t / (1 - b2**t)) + eps), computed in float64
  from the same gradients and rates, matches the float64 trajectory."""
  steps = len(p["grads"])
  rng = np.random.RandomState(steps)
  lrs = {"constant": np.full(steps, p["lr"]),
         "decreasing": p["lr"] / np.sqrt(1 + np.arange(steps)),
         "random": p["lr"] * rng.uniform(0.1, 1, steps)}[schedule]
  with jax.enable_x64(True):
    arrays = as_arrays(p, np.float64, names=("w0", "grads", "b1", "b2", "eps"))
    ws, _ = optax_trajectory(**arrays, lr=jnp.asarray(lrs))
  expected = collapsed_trajectory(p["w0"], p["grads"], lrs, p["b1"], p["b2"],
                                  p["eps"])
  assert_close_to_scale(ws, expected, 1e-10, p["w0"], p["b2"])
