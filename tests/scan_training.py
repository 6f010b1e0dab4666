"""Training runs as one jitted ``lax.scan``, shared by the tests."""

import jax
import numpy as np
import optax


def run(opt, params, xs, gradient_fn=None):
  """Parameters after each step (as NumPy arrays), and the final state, from
  a ``lax.scan`` over ``xs``: the gradients, or ``gradient_fn(params, x)``'s
  inputs."""

  def step(carry, x):
    p, state = carry
    g = x if gradient_fn is None else gradient_fn(p, x)
    updates, state = opt.update(g, state, p)
    p = optax.apply_updates(p, updates)
    return (p, state), p

  (_, state), ps = jax.jit(lambda p, xs: jax.lax.scan(
      step, (p, opt.init(p)), xs))(params, xs)
  return jax.tree.map(np.asarray, ps), state


def noisy_pull(target):
  """Gradients ``noise + (w - target)``: computed from each run's own weights,
  so that differences between implementations feed back as in training."""
  return lambda w, noise: jax.tree.map(lambda n, x, c: n + (x - c), noise, w,
                                       target)
