"""The compiled step: one loop per output array, no temporaries, no copies.

With the parameters and the state donated, XLA:CPU updates each array in
place. A temporary array or a copy costs whole passes over memory, which is
what FTML's step time is made of; these structural checks keep them out
(timings are in ``benchmarks/speed.py``).
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import hlo  # benchmarks/hlo.py
from helpers import jitted_step
from optax_ftml import ftml

PARAMS = {"kernel": (3, 3, 8, 16), "bias": (16,), "dense": (256, 10)}


def compiled_entry(optimizer, dtype):
  params = {k: jnp.ones(s, dtype) for k, s in PARAMS.items()}
  text = jitted_step(optimizer, donate=True).lower(
      params, optimizer.init(params), params).compile().as_text()
  return hlo.entry_computation(text)


def naive_ftml_step(params, state, grads):
  """The update written as the formulas read, for contrast."""
  v, z, d_prev, t = state
  t = t + 1
  v = 0.999 * v + 0.001 * grads**2
  d = (1 - 0.6**t) / 1e-3 * (jnp.sqrt(v / (1 - 0.999**t)) + 1e-8)
  z = 0.6 * z + 0.4 * grads - (d - 0.6 * d_prev) * params
  return -z / d, (v, z, d, t)


def test_the_counting_sees_a_straightforward_implementations_copies():
  x = jnp.ones((1000,))
  state = (x, x + 1, x + 2, jnp.float32(0))
  entry = hlo.entry_computation(jax.jit(naive_ftml_step, donate_argnums=(
      0, 1)).lower(x, state, x).compile().as_text())
  assert hlo.array_ops(entry, "copy") or len(hlo.array_ops(entry, "fusion")) > 4


# bfloat16 keeps a bfloat16 state, float16 a float32 one: every loop reads the
# stored (rounded) arrays, never a float32 intermediate of another loop.
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64, jnp.bfloat16,
                                   jnp.float16])
@pytest.mark.parametrize("recompute_d_prev, outputs_per_leaf", [
    (False, 4),  # parameters, v, z, d_prev
    (True, 3),  # parameters, v, z: as many as Adam
])
def test_donated_step_has_one_loop_per_output_and_no_copies(
    dtype, recompute_d_prev, outputs_per_leaf):
  entry = compiled_entry(ftml(1e-3, recompute_d_prev=recompute_d_prev), dtype)
  assert not hlo.array_ops(entry, "copy")
  # Every array-valued loop writes an output: no temporaries.
  assert len(hlo.array_ops(entry, "fusion")) == outputs_per_leaf * len(PARAMS)


def test_adam_reference_structure():
  """Adam, for comparison: three loops per leaf (mu, nu, parameters)."""
  with jax.numpy_dtype_promotion("standard"):  # Optax's bias correction
    entry = compiled_entry(optax.adam(1e-3), jnp.float32)
  assert not hlo.array_ops(entry, "copy")
  assert len(hlo.array_ops(entry, "fusion")) == 3 * len(PARAMS)
