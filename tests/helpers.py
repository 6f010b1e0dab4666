"""What the tests share: training loops, problems, and error measures."""

import jax
import numpy as np
import optax


def jitted_step(opt, donate=False):
  """``(params, state, grads) -> (params, state)``: one jitted step of ``opt``."""
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def steps(opt, params, xs, gradient_fn=None):
  """Parameters after each step and the final state, from a ``lax.scan``
  over ``xs``: the gradients, or ``gradient_fn(params, x)``'s inputs.
  Traceable: usable under ``jit`` and ``vmap``, with traced ``opt``."""

  def step(carry, x):
    p, state = carry
    g = x if gradient_fn is None else gradient_fn(p, x)
    updates, state = opt.update(g, state, p)
    p = optax.apply_updates(p, updates)
    return (p, state), p

  (_, state), ps = jax.lax.scan(step, (params, opt.init(params)), xs)
  return ps, state


def run(opt, params, xs, gradient_fn=None):
  """:func:`steps`, jitted, with the parameters as NumPy arrays."""
  ps, state = jax.jit(lambda p, xs: steps(opt, p, xs, gradient_fn))(params, xs)
  return jax.tree.map(np.asarray, ps), state


def noisy_pull(target):
  """Gradients ``noise + (w - target)``: computed from each run's own weights,
  so that differences between implementations feed back as in training."""
  return lambda w, noise: jax.tree.map(lambda n, x, c: n + (x - c), noise, w,
                                       target)


def pull_problem(shapes, steps, dtype, seed=0, scale=1.0, uniform=False):
  """Weights, a target and ``steps`` of gradient noise (leading axis) per
  shape of ``shapes``, for :func:`noisy_pull`: standard normal (the noise
  times ``scale``), or with ``uniform`` as MXNet's tests draw them (weights
  in [0, 1), target in [-1, 1), noise in [-0.5, 0.5))."""
  rng = np.random.RandomState(seed)
  if uniform:
    draws = (rng.rand, lambda *s: 2 * rng.rand(*s) - 1,
             lambda *s: rng.rand(*s) - 0.5)
  else:
    draws = (rng.randn, rng.randn, lambda *s: scale * rng.randn(*s))
  weights, target, noise = ({k: draw(*lead, *s).astype(dtype)
                             for k, s in shapes.items()}
                            for draw, lead in zip(draws, ((), (), (steps,)),
                                                  strict=True))
  return weights, target, noise


def relative_error(actual, expected, floor=1.0):
  """The largest ``|a - e| / max(|e|, floor)`` over the leaves of two dicts:
  relative error, absolute near zero."""
  return max(float(np.max(np.abs(np.asarray(actual[k]) - expected[k])
                          / np.maximum(np.abs(expected[k]), floor)))
             for k in expected)
