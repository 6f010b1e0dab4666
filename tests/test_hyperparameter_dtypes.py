"""Hyperparameters injected as arrays: half-precision betas are refused with
the fix in the message; the recipe (``hyperparam_dtype=jnp.float32``) gives
the numbers of plain Python floats.

``optax.inject_hyperparams`` stores hyperparameters in the parameters' dtype
unless told otherwise, and 0.999 is 1.0 in bfloat16: the bias correction
``1 - b2**t`` would then be 0 and the step 0/0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ftml
from scan_training import run

HALF = [jnp.bfloat16, jnp.float16]


def test_bfloat16_turns_the_default_b2_into_one():
  assert float(jnp.asarray(0.999, jnp.bfloat16)) == 1.0


@pytest.mark.parametrize("dtype", HALF)
def test_injected_half_precision_betas_are_refused_with_the_fix(dtype):
  params = jnp.ones(3, dtype)
  opt = optax.inject_hyperparams(optax_ftml.ftml)(learning_rate=0.01)
  with pytest.raises(TypeError, match=r"b1 arrives as a .*16 array.*"
                     r"hyperparam_dtype=jnp\.float32"):
    opt.init(params)


@pytest.mark.parametrize("name", ["b1", "b2"])
@pytest.mark.parametrize("dtype", HALF)
def test_each_half_precision_beta_is_named(name, dtype):
  with pytest.raises(TypeError, match=rf"ftml: {name} arrives as a"):
    optax_ftml.ftml(0.01, **{name: jnp.asarray(0.5, dtype)})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_float32_and_wider_betas_pass(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    optax_ftml.ftml(0.01, b1=jnp.asarray(0.6, dtype),
                    b2=jnp.asarray(0.999, dtype))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("recompute_d_prev", [False, True])
def test_hyperparam_dtype_float32_matches_plain_floats(dtype,
                                                       recompute_d_prev):
  """The recipe: 200 steps on half-precision parameters, bit for bit those
  of ``ftml`` built with Python floats, and finite."""
  rng = np.random.RandomState(0)
  params = jnp.asarray(rng.randn(7), dtype)
  grads = jnp.asarray(rng.randn(200, 7), dtype)
  kwargs = dict(learning_rate=0.01, b1=0.6, b2=0.999,
                recompute_d_prev=recompute_d_prev)
  injected = optax.inject_hyperparams(
      optax_ftml.ftml, static_args=("recompute_d_prev",),
      hyperparam_dtype=jnp.float32)(**kwargs)
  plain = optax_ftml.ftml(**kwargs)
  ps, state = run(injected, params, grads)
  expected, expected_state = run(plain, params, grads)
  assert np.all(np.isfinite(ps.astype(np.float32)))
  np.testing.assert_array_equal(ps, expected)
  for x, y in zip(jax.tree.leaves(state.inner_state),
                  jax.tree.leaves(expected_state), strict=True):
    np.testing.assert_array_equal(x, y)
  # The learning rate can be changed between steps, as the recipe is for.
  state.hyperparams["learning_rate"] = jnp.asarray(0.001, jnp.float32)
  updates, _ = injected.update(grads[0], state, jnp.asarray(ps[-1]))
  assert np.all(np.isfinite(np.asarray(updates, np.float32)))
