"""Behaviour of ``ftml`` itself: validation, edge cases, memory, Optax wrappers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import run
from mxnet_reference import FTMLSlots
from mxnet_reference import collapsed_trajectory
from mxnet_reference import ftml_update
from mxnet_reference import trajectory
from optax_ftml import FTMLState
from optax_ftml import ftml

# --- Edge cases: lr = 0, eps = 0, t ----------------------------------------

def test_warmup_from_zero_first_step_is_a_no_op():
  schedule = optax.linear_schedule(0.0, 0.05, transition_steps=10)
  opt = ftml(schedule)
  params = {"w": jnp.array([1.0, -2.0, 0.0]), "b": jnp.zeros(())}
  grads = {"w": jnp.array([0.5, -0.1, 2.0]), "b": jnp.asarray(1.0)}
  with jax.numpy_dtype_promotion("standard"):  # optax's schedules promote
    updates, state = opt.update(grads, opt.init(params), params)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    chex.assert_tree_all_finite(state)
    zeros = jax.tree.map(jnp.zeros_like, params)
    chex.assert_trees_all_equal((state.z, state.d_prev), (zeros, zeros))
    updates, state = opt.update(grads, state, params)
  chex.assert_tree_all_finite((updates, state))
  assert float(jnp.abs(updates["w"]).min()) > 0


def test_zero_learning_rate_step_is_the_limit_of_vanishing_rates():
  """A step with lr = 0 continues like the float64 MXNet kernel run with a
  tiny learning rate at that step, and unlike simply skipping the step."""
  rng = np.random.RandomState(0)
  steps, b1, b2, eps = 40, 0.6, 0.9, 1e-8
  grads = rng.randn(steps, 16)
  w0 = rng.randn(16)
  lrs = np.full(steps, 0.05)
  lrs[0] = 0.0

  def reference(first_lr, skip_first=False):
    w, slots, out = w0.copy(), FTMLSlots.zeros_like(w0), []
    for t in range(steps):
      if t == 0 and skip_first:
        out.append(w)
        continue
      lr = first_lr if t == 0 else lrs[t]
      w = ftml_update(w, grads[t], slots, lr=lr, t=t + 1, beta1=b1, beta2=b2,
                      epsilon=eps, param_dtype=np.float64)
      out.append(w)
    return np.stack(out)

  with jax.enable_x64(True):
    table = jnp.asarray(lrs)
    ours, _ = run(ftml(lambda count: table[count], b1, b2, eps),
                        jnp.asarray(w0), jnp.asarray(grads))
  ours = np.asarray(ours)
  np.testing.assert_array_equal(ours[0], w0)
  np.testing.assert_allclose(ours, reference(1e-9), atol=1e-7)
  # The limit is not "skip the step": v and t advance at a zero-rate step.
  assert np.abs(ours - reference(0.0, skip_first=True)).max() > 1e-3


def test_count_is_one_based_in_the_kernel_and_saturates():
  opt = ftml(0.01)
  params, grads = jnp.ones(4), jnp.full(4, 0.5)
  state = opt.init(params)
  assert state.count.dtype == jnp.int32 and int(state.count) == 0
  # t = 1 on the first step: the bias-corrected step is exactly -lr * sign(g).
  updates, state = opt.update(grads, state, params)
  # (to the rounding of w + step near 1, ~6e-8)
  np.testing.assert_allclose(updates, -0.01 * np.ones(4), rtol=0, atol=1e-7)
  assert int(state.count) == 1
  # At the int32 maximum the count stays there (t never wraps to 0 or below).
  top = state._replace(count=jnp.asarray(np.iinfo(np.int32).max, jnp.int32))
  updates, top = opt.update(grads, top, params)
  assert int(top.count) == np.iinfo(np.int32).max
  chex.assert_tree_all_finite((updates, top))


# --- The collapsed identity and FTML's memory --------------------------------

def test_float32_trajectory_matches_collapsed_identity():
  rng = np.random.RandomState(1)
  grads = rng.randn(300, 32).astype(np.float32)
  w0 = rng.randn(32).astype(np.float32)
  lrs = np.geomspace(0.05, 0.005, 300).astype(np.float32)
  table = jnp.asarray(lrs)
  ours, _ = run(ftml(lambda c: table[c], 0.7, 0.99, 1e-8),
                      jnp.asarray(w0), jnp.asarray(grads))
  expected = collapsed_trajectory(w0, grads, lrs.astype(np.float64), 0.7, 0.99, 1e-8)
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=2e-5)


def test_weight_changed_outside_ftml_is_pulled_back_towards_the_leader():
  """The z memory: after a weight is moved by something other than FTML, the
  next step pulls it back by b1 * d_{t-1} / d_t of the displacement."""
  rng = np.random.RandomState(3)
  b1, b2, lr = 0.6, 0.999, 0.01
  opt = ftml(lr, b1, b2)
  params = jnp.asarray(rng.randn(8).astype(np.float32))
  state = opt.init(params)
  for _ in range(20):
    grads = jnp.asarray(rng.randn(8).astype(np.float32))
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  leader = -state.z / state.d_prev
  np.testing.assert_allclose(leader, params, rtol=1e-5)

  displacement = jnp.asarray(rng.randn(8).astype(np.float32))
  moved = params + displacement
  zero = jnp.zeros(8, jnp.float32)
  updates, new_state = opt.update(zero, state, moved)
  pulled = np.asarray(optax.apply_updates(moved, updates))

  # Against the MXNet kernel run on the moved weight ...
  slots = FTMLSlots(d=np.asarray(state.d_prev), v=np.asarray(state.v),
                    z=np.asarray(state.z))
  expected = ftml_update(np.asarray(moved), np.zeros(8, np.float32), slots, lr=lr,
                         t=21, beta1=b1, beta2=b2)
  np.testing.assert_allclose(pulled, expected, rtol=1e-5, atol=1e-6)
  # ... and against the closed form of the pull-back.
  ratio = b1 * np.asarray(state.d_prev) / np.asarray(new_state.d_prev)
  np.testing.assert_allclose(pulled, moved - ratio * displacement, rtol=1e-4, atol=1e-5)
  assert np.all(np.abs(pulled - np.asarray(params)) < np.abs(displacement))


# --- dtypes, sharding, abstract init --------------------------------------


def test_state_dtype_option():
  opt = ftml(0.01, state_dtype=jnp.float32)
  params = {"w": jnp.ones(3, jnp.bfloat16), "c": jnp.ones(2, jnp.complex64)}
  state = opt.init(params)
  assert state.v["w"].dtype == state.z["w"].dtype == jnp.float32
  assert state.z["c"].dtype == jnp.complex64 and state.v["c"].dtype == jnp.float32
  updates, new_state = opt.update(params, state, params)
  assert updates["w"].dtype == jnp.bfloat16 and updates["c"].dtype == jnp.complex64
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)


def test_state_buffers_are_distinct_arrays():
  """Donating the state needs v, z and d_prev to be separate buffers."""
  state = ftml().init({"w": jnp.ones((4, 4))})
  pointers = {x["w"].unsafe_buffer_pointer() for x in (state.v, state.z, state.d_prev)}
  assert len(pointers) == 3


def test_init_on_abstract_parameters_keeps_shapes_dtypes_and_sharding():
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  abstract = {"w": jax.ShapeDtypeStruct((16, 3), jnp.bfloat16, sharding=sharding),
              "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
  # Within the mesh's context: JAX 0.12 drops the shardings of
  # ``jnp.zeros_like`` outside one (0.9 and 0.10 keep them either way).
  with jax.set_mesh(mesh):
    state = jax.eval_shape(ftml().init, abstract)
  assert isinstance(state, FTMLState)
  assert state.z["w"].shape == (16, 3) and state.z["w"].dtype == jnp.bfloat16
  assert state.v["w"].sharding.spec[0] == "data"
  assert state.v["b"].shape == (3,) and state.v["b"].dtype == jnp.float32
  concrete = ftml().init(abstract)
  assert concrete.d_prev["w"].sharding == sharding
  params = jax.device_put(jnp.ones((16, 3)), sharding)
  assert ftml().init(params).z.sharding == sharding


def test_float64_parameters():
  with jax.enable_x64(True):
    rng = np.random.RandomState(4)
    grads, w0 = rng.randn(100, 8), rng.randn(8)
    ours, state = run(ftml(0.02), jnp.asarray(w0), jnp.asarray(grads))
    assert ours.dtype == jnp.float64 and state.v.dtype == jnp.float64
  expected = collapsed_trajectory(w0, grads, np.full(100, 0.02), 0.6, 0.999, 1e-8)
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-12, atol=1e-12)


# --- Optax wrappers -----------------------------------------------------------

def test_masked_and_multi_transform():
  """Over 100 steps the FTML leaf follows FTML's own trajectory; the other
  gets its gradients as updates (masked) or stays (set to zero)."""
  rng = np.random.RandomState(9)
  params = {"w": jnp.asarray(rng.randn(4), jnp.float32),
            "b": jnp.asarray(rng.randn(1), jnp.float32)}
  grads = {"w": jnp.asarray(rng.randn(100, 4), jnp.float32),
           "b": jnp.asarray(rng.randn(100, 1), jnp.float32)}
  plain, _ = run(ftml(0.01), params["w"], grads["w"])

  masked, _ = run(optax.masked(ftml(0.01), {"w": True, "b": False}), params, grads)
  chex.assert_trees_all_close(masked["w"], plain)
  untouched = np.cumsum(np.concatenate([params["b"][None], grads["b"]]), axis=0,
                        dtype=np.float32)[1:]  # the same float32 additions
  chex.assert_trees_all_equal(masked["b"], untouched)

  multi, _ = run(optax.multi_transform(
      {"ftml": ftml(0.01), "frozen": optax.set_to_zero()},
      {"w": "ftml", "b": "frozen"}), params, grads)
  chex.assert_trees_all_close(multi["w"], plain)
  chex.assert_trees_all_equal(multi["b"], np.broadcast_to(params["b"], (100, 1)))


@pytest.mark.parametrize("recompute_d_prev", [False, True])
def test_masked_out_everywhere(recompute_d_prev):
  """A mask that excludes every parameter hands FTML a tree without leaves:
  the updates pass through unchanged, under jit, step after step."""
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  opt = optax.masked(ftml(0.01, recompute_d_prev=recompute_d_prev),
                     {"w": False, "b": False})
  state, update = opt.init(params), jax.jit(opt.update)
  for grads in ({"w": jnp.full(3, 2.0), "b": jnp.ones(2)},
                {"w": -jnp.ones(3), "b": jnp.full(2, 3.0)}):
    updates, state = update(grads, state, params)
    chex.assert_trees_all_equal(updates, grads)


def test_chain_with_clipping_and_weight_decay():
  """clip_by_global_norm -> add_decayed_weights -> ftml over 100 steps: the
  MXNet kernel given the clipped gradients and the weight decay."""
  rng = np.random.RandomState(10)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-2),
                    ftml(0.01))
  params = {"w": jnp.ones((3, 3)), "b": jnp.zeros(3)}
  # Biased, so that the weights travel; large enough to be clipped.
  grads = {"w": (10 * rng.randn(100, 3, 3) + 5).astype(np.float32),
           "b": (rng.randn(100, 3) - 0.5).astype(np.float32)}
  first = {"w": jnp.full((3, 3), 10.0), "b": jnp.ones(3)}
  updates, _ = opt.update(first, opt.init(params), params)
  chex.assert_tree_all_finite(updates)
  # At t = 1 the step is -lr * sign(g) whatever the clipping scale.
  chex.assert_trees_all_close(updates, jax.tree.map(lambda x: -0.01 * jnp.ones_like(x),
                                                    params), rtol=1e-5)

  def clipped(_, g):
    norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
    return {k: x / norm if norm >= 1 else x for k, x in g.items()}

  ours, _ = run(opt, params, grads)
  expected, _ = trajectory(jax.tree.map(np.asarray, params), grads,
                           np.full(100, 0.01), clipped, wd=1e-2)
  assert all(np.abs(expected[k][-1] - params[k]).max() > 0.1 for k in params)
  chex.assert_trees_all_close(ours, expected, rtol=0, atol=2e-5)


def test_construction_inside_traced_functions():
  """Flax builds optimizers under nnx.eval_shape / nnx.jit: validation must
  not concretize Python hyperparameters."""
  params = {"w": jnp.ones((2, 3))}
  state = jax.eval_shape(lambda: ftml(0.01, b1=0.6, b2=0.999).init(params))
  assert isinstance(state, FTMLState)

  @jax.jit
  def step(params):
    opt = ftml(0.01)
    return opt.update(params, opt.init(params), params)[0]

  chex.assert_tree_all_finite(step(params))
