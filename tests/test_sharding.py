"""``ftml`` under SPMD sharding, on 8 simulated CPU devices (see conftest.py).

FTML is per-element: its state is sharded exactly like the parameters, the
update needs no communication, and a sharded (FSDP-style) training step gives
the parameters of the single-device run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ftml

SPECS = {
    "kernel": ((16, 8), jnp.float32, P("data", "model")),
    "bias": ((8,), jnp.float32, P("model")),
    "embedding": ((32, 6), jnp.bfloat16, P("data", None)),
    "scale": ((), jnp.float32, P()),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
               "all-to-all")


def make_mesh(axis_type):
  assert jax.device_count() == 8, "conftest.py sets 8 host devices"
  return jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)


def param_shardings(mesh):
  return {k: NamedSharding(mesh, spec) for k, (_, _, spec) in SPECS.items()}


def sharded_params(mesh, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(SPECS))
  params = {k: jax.random.normal(key, shape, dtype)
            for key, (k, (shape, dtype, _)) in zip(keys, SPECS.items(), strict=True)}
  return jax.device_put(params, param_shardings(mesh))


def same_sharding(actual, expected, ndim):
  return actual.is_equivalent_to(expected, ndim)


def assert_sharded_like(tree, params):
  for leaf, param in zip(jax.tree.leaves(tree), jax.tree.leaves(params), strict=True):
    assert leaf.shape == param.shape
    assert same_sharding(leaf.sharding, param.sharding, param.ndim), (
        leaf.sharding, param.sharding)


def state_shardings(opt, params, shardings, mesh):
  """The state's shardings: the parameters' for parameter-shaped buffers
  (found by ``optax.tree_map_params``), replicated for the rest."""
  return optax.tree_map_params(
      opt, lambda _, sharding: sharding, jax.eval_shape(opt.init, params),
      shardings, transform_non_params=lambda _: NamedSharding(mesh, P()))


OPTIMIZER = optax_ftml.ftml(0.01, state_dtype=jnp.float32)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_init_and_update_keep_the_parameters_sharding(axis_type):
  mesh = make_mesh(axis_type)
  params = sharded_params(mesh)
  grads = sharded_params(mesh, seed=1)
  state = OPTIMIZER.init(params)
  for buffer in (state.v, state.z, state.d_prev):
    assert_sharded_like(buffer, params)
  for _ in range(2):
    updates, state = OPTIMIZER.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert_sharded_like(updates, params)
  for buffer in (state.v, state.z, state.d_prev):
    assert_sharded_like(buffer, params)
  assert state.z["embedding"].dtype == jnp.float32


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_jit_with_explicit_in_and_out_shardings(axis_type):
  mesh = make_mesh(axis_type)
  shardings = param_shardings(mesh)
  params = sharded_params(mesh)
  grads = sharded_params(mesh, seed=1)
  state_sharding = state_shardings(OPTIMIZER, params, shardings, mesh)
  for buffer in (state_sharding.v, state_sharding.z, state_sharding.d_prev):
    assert buffer == shardings

  init = jax.jit(OPTIMIZER.init, in_shardings=(shardings,),
                 out_shardings=state_sharding)
  update = jax.jit(OPTIMIZER.update,
                   in_shardings=(shardings, state_sharding, shardings),
                   out_shardings=(shardings, state_sharding))
  with jax.set_mesh(mesh):
    state = init(params)
    for buffer in (state.v, state.z, state.d_prev):
      assert_sharded_like(buffer, params)
    updates, state = update(grads, state, params)
  assert_sharded_like(updates, params)
  for buffer in (state.v, state.z, state.d_prev):
    assert_sharded_like(buffer, params)

  # The same numbers as the same program on one device, up to an ulp where
  # XLA fuses the partitioned program differently.
  local = jax.device_put(jax.tree.map(np.asarray, (params, grads)),
                         jax.devices()[0])
  local_updates, local_state = jax.jit(OPTIMIZER.update)(
      local[1], OPTIMIZER.init(local[0]), local[0])

  def close(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=0, atol=3e-7 * np.abs(b).max())

  jax.tree.map(close, (updates, state), (local_updates, local_state))


def assert_same_specs(state, abstract, mesh):
  for buffer in (state.v, state.z, state.d_prev):
    for k, leaf in buffer.items():
      assert leaf.shape == abstract[k].shape
      assert leaf.sharding.spec == abstract[k].sharding.spec
      assert leaf.sharding.mesh.shape_tuple == mesh.shape_tuple


def test_eval_shape_on_sharded_abstract_params_keeps_the_shardings():
  """With explicit mesh axes, ``jax.eval_shape(init, ShapeDtypeStructs)``
  within ``jax.set_mesh(mesh)`` gives the state's shardings (e.g. to restore a
  checkpoint into them), on every supported JAX; ``jax.jit(init,
  out_shardings=...)`` does with or without the mesh's context."""
  mesh = make_mesh(AxisType.Explicit)
  shardings = param_shardings(mesh)
  abstract = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
              for k, (shape, dtype, _) in SPECS.items()}
  with jax.set_mesh(mesh):
    assert_same_specs(jax.eval_shape(OPTIMIZER.init, abstract), abstract, mesh)
  init = jax.jit(OPTIMIZER.init, out_shardings=state_shardings(
      OPTIMIZER, abstract, shardings, mesh))
  assert_same_specs(jax.eval_shape(init, abstract), abstract, mesh)


def test_eval_shape_with_auto_axes_and_tree_map_params():
  """With automatic mesh axes JAX carries no shardings through ``eval_shape``;
  ``optax.tree_map_params`` maps the parameters' shardings onto the state."""
  mesh = make_mesh(AxisType.Auto)
  shardings = param_shardings(mesh)
  abstract = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
              for k, (shape, dtype, _) in SPECS.items()}
  state_sharding = state_shardings(OPTIMIZER, abstract, shardings, mesh)
  assert state_sharding.count == NamedSharding(mesh, P())
  for buffer in (state_sharding.v, state_sharding.z, state_sharding.d_prev):
    assert buffer == shardings


def test_sharded_update_needs_no_communication():
  """The compiled sharded update is purely local: no collective at all."""
  mesh = make_mesh(AxisType.Auto)
  shardings = param_shardings(mesh)
  params = sharded_params(mesh)
  state_sharding = state_shardings(OPTIMIZER, params, shardings, mesh)
  update = jax.jit(OPTIMIZER.update,
                   in_shardings=(shardings, state_sharding, shardings),
                   out_shardings=(shardings, state_sharding))
  hlo = update.lower(params, OPTIMIZER.init(params), params).compile().as_text()
  assert "ENTRY" in hlo
  for collective in COLLECTIVES:
    assert collective not in hlo, collective


# --- An FSDP-style training step --------------------------------------------


def mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"][None])
  return jnp.mean((h @ params["w2"] + params["b2"][None] - y) ** 2)


def mlp_problem():
  keys = jax.random.split(jax.random.key(3), 6)
  params = {
      "w1": jax.random.normal(keys[0], (16, 32)) / 4,
      "b1": jnp.zeros(32),
      "w2": jax.random.normal(keys[1], (32, 8)) / 6,
      "b2": jnp.zeros(8),
  }
  x = jax.random.normal(keys[2], (20, 64, 16))  # 20 batches of 64
  teacher = jax.random.normal(keys[3], (16, 8))
  y = jnp.sin(x @ teacher) + 0.1 * jax.random.normal(keys[4], (20, 64, 8))
  return params, x, y


def train(opt, params, x, y):
  """Steps over the batches in a scan; returns final parameters and losses."""

  def step(carry, batch):
    params, state = carry
    loss, grads = jax.value_and_grad(mlp_loss)(params, *batch)
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  (params, state), losses = jax.lax.scan(step, (params, opt.init(params)), (x, y))
  return params, state, losses


def test_fsdp_training_matches_the_single_device_run():
  """Weights sharded over the data axis (FSDP) and the model axis, batches
  over the data axis: the same parameters as one device, to float32
  rounding (the sharded matmuls sum in another order)."""
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax_ftml.ftml(0.01))
  params, x, y = mlp_problem()

  mesh = make_mesh(AxisType.Auto)
  weight_specs = {"w1": P("data", "model"), "b1": P("model"),
                  "w2": P("model", "data"), "b2": P()}
  shardings = {k: NamedSharding(mesh, s) for k, s in weight_specs.items()}
  batch = NamedSharding(mesh, P(None, "data"))
  state_sharding = state_shardings(opt, params, shardings, mesh)
  sharded_train = jax.jit(
      lambda p, x, y: train(opt, p, x, y),
      in_shardings=(shardings, batch, batch),
      out_shardings=(shardings, state_sharding, NamedSharding(mesh, P())))
  with jax.set_mesh(mesh):
    sharded_params, sharded_state, sharded_losses = sharded_train(params, x, y)
  hlo = sharded_train.lower(params, x, y).compile().as_text()
  assert "all-reduce" in hlo or "reduce-scatter" in hlo  # really distributed

  local_params, local_state, local_losses = jax.jit(
      lambda p, x, y: train(opt, p, x, y))(
          *jax.device_put((params, x, y), jax.devices()[0]))

  assert float(local_losses[-1]) < 0.7 * float(local_losses[0])
  np.testing.assert_allclose(sharded_losses, local_losses, rtol=1e-5)
  for k, shape_sharding in shardings.items():
    assert same_sharding(sharded_params[k].sharding, shape_sharding,
                         params[k].ndim)
    assert same_sharding(sharded_state[1].z[k].sharding, shape_sharding,
                         params[k].ndim)
    np.testing.assert_allclose(sharded_params[k], local_params[k], rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(sharded_state[1].v["w1"], local_state[1].v["w1"],
                             rtol=1e-4, atol=1e-12)
