"""The compiled step updates every array in place: no temporary arrays.

With the parameters and the state donated, XLA:CPU can write each output
over its input. A temporary array (a ``d_t`` shared by several loops) or a
copy (of an input overwritten before another loop reads it) costs whole
passes over memory, which is what FTML's step time is made of. These checks
read XLA's own accounting of the compiled step (``memory_analysis``,
``cost_analysis``); timings are in ``benchmarks/speed.py``.
"""

import math

import jax
import jax.numpy as jnp
import optax
import pytest

from helpers import jitted_step
from optax_ftml import ftml

PARAMS = {"kernel": (3, 3, 8, 16), "bias": (16,), "dense": (256, 10)}
# The step's scalars (count, learning rate, bias corrections) take a few
# hundred bytes; the smallest array a temporary could hold, the bias in
# bfloat16, 32 bytes, and every other leaf at least 2 KiB. So the check
# compares against the parameters scaled up: scalars do not grow with them.
LARGER = {k: (2 * s[0], *s[1:]) for k, s in PARAMS.items()}
# The arrays each of the step's loops streams, in the order they run: what
# it reads, then the array it writes over its input. The loop that writes
# d_prev (v's, in the lean state) also takes z, which only orders it after
# z's loop (it is never read, but XLA's cost model counts it).
LOOPS = {
    False: [("v", "g", "v"), ("z", "g", "w", "v", "d_prev", "z"),
            ("v", "z", "d_prev"), ("z", "w", "v", "w")],
    True: [("z", "g", "w", "v", "z"), ("v", "g", "z", "v"),
           ("z", "w", "v", "w")],
}
DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16, jnp.complex64]


def compiled_step(optimizer, dtype, shapes=None):
  """The donated step for parameters of ``shapes``, compiled (not run)."""
  params = {k: jax.ShapeDtypeStruct(s, dtype)
            for k, s in (shapes or PARAMS).items()}
  with jax.enable_x64(dtype == jnp.float64):
    return jitted_step(optimizer, donate=True).lower(
        params, jax.eval_shape(optimizer.init, params), params).compile()


def naive_ftml_step(params, state, grads):
  """The update written as the formulas read, for contrast."""
  v, z, d_prev, t = state
  t = t + 1
  v = 0.999 * v + 0.001 * grads**2
  d = (1 - 0.6**t) / 1e-3 * (jnp.sqrt(v / (1 - 0.999**t)) + 1e-8)
  z = 0.6 * z + 0.4 * grads - (d - 0.6 * d_prev) * params
  return -z / d, (v, z, d, t)


def temporaries(compiled) -> int:
  return compiled.memory_analysis().temp_size_in_bytes


def bytes_accessed(compiled) -> float:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]


def streamed_bytes(optimizer, dtype, recompute_d_prev) -> int:
  """The bytes :data:`LOOPS` stream over the parameters :data:`PARAMS`."""
  params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in PARAMS.items()}
  with jax.enable_x64(dtype == jnp.float64):
    state = jax.eval_shape(optimizer.init, params)
  size = {"w": jnp.dtype(dtype).itemsize, "g": jnp.dtype(dtype).itemsize,
          "v": state.v["bias"].dtype.itemsize,
          "z": state.z["bias"].dtype.itemsize}
  size["d_prev"] = size["v"]
  elements = sum(p.size for p in params.values())
  return elements * sum(size[a] for loop in LOOPS[recompute_d_prev]
                        for a in loop)


def test_the_accounting_sees_a_straightforward_implementations_temporaries():
  x = jnp.ones((1000,))
  state = (x, x + 1, x + 2, jnp.float32(0))
  compiled = jax.jit(naive_ftml_step, donate_argnums=(0, 1)).lower(
      x, state, x).compile()
  assert temporaries(compiled) >= x.nbytes  # d_t at least
  # FTML's loops in float32 would stream 16 arrays (LOOPS).
  assert bytes_accessed(compiled) > 16 * x.nbytes


# bfloat16 keeps a bfloat16 state, float16 a float32 one: every loop reads the
# stored (rounded) arrays, never a float32 intermediate of another loop.
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("recompute_d_prev", [False, True],
                         ids=["default", "lean"])
def test_donated_step_has_no_temporary_arrays(dtype, recompute_d_prev):
  optimizer = ftml(1e-3, recompute_d_prev=recompute_d_prev)
  compiled = compiled_step(optimizer, dtype)
  # Only scalars: the same bytes for parameters twice as large.
  assert temporaries(compiled) == temporaries(
      compiled_step(optimizer, dtype, LARGER))
  assert temporaries(compiled) < 1024
  # Every loop streams only the stored arrays it needs (within the scalars'
  # bytes): a temporary d_t or a copy is an array more to write and read.
  assert bytes_accessed(compiled) < streamed_bytes(
      optimizer, dtype, recompute_d_prev) + 1024


def test_one_large_leaf_has_no_temporary_arrays():
  """16M float32 parameters (64 MiB per array): 0 bytes of temporaries
  beyond the scalars, where a shared d_t would take 61 MiB."""
  compiled = compiled_step(ftml(1e-3), jnp.float32, {"w": (16_000_000,)})
  assert temporaries(compiled) < 1024


def test_adam_reference_structure():
  """Adam, for comparison: no temporaries either, and 10 arrays streamed (mu:
  mu, g -> mu; nu: nu, g -> nu; weights: w, mu, nu -> w)."""
  with jax.numpy_dtype_promotion("standard"):  # Optax's bias correction
    compiled = compiled_step(optax.adam(1e-3), jnp.float32)
  elements = sum(math.prod(s) for s in PARAMS.values())
  assert temporaries(compiled) < 1024
  assert bytes_accessed(compiled) < 10 * 4 * elements + 1024
