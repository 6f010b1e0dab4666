"""One process of an FSDP training run, started by mpirun or srun.

Every process runs this script. The parameters and FTML's state are split over
one global mesh of all processes' devices, each process feeds its own rows of
the global batch, and Orbax saves and restores the state from every process.
Process 0 writes what the test compares (gathered to the host) as .npz files
into --out:

* ``losses.npz``, ``final.npz``: the losses of every step run and the final
  parameters and state, for each optimizer;
* ``saved.npz``: the parameters and state saved at --save-at;
* ``restored.npz``: with --resume DIR, what was read from the checkpoint in
  DIR (saved at --save-at by an earlier run), from which training continues;
* ``shares.npz``: the fraction of every parameter and FTML buffer that
  process 0's devices hold (each process checks its own: 1/N of every split
  leaf, all of a replicated one);
* ``update_alone.npz``: parameters and state after FTML's update alone (no
  reduction), from a fresh start;
* ``mxnet_resumed.npz``: with --mxnet DIR (and nothing else run), the
  parameters and FTML's state after every process resumed MXNet's Gluon
  checkpoint in DIR onto the mesh and continued it with MXNet's gradients.
"""

import argparse
import json
import os
import pathlib
import sys

import jax

# Before JAX starts: JAX finds the other processes in mpirun's or srun's
# variables, and every process must have joined.
jax.distributed.initialize()
STARTED = max(int(os.environ.get(name, "1")) for name in
              ("OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "PMI_SIZE"))
if STARTED > 1 and STARTED != jax.process_count():
  sys.exit(f"{STARTED} processes started, {jax.process_count()} joined")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from optax_ftml import FTMLLeanState  # noqa: E402
from optax_ftml import FTMLState  # noqa: E402
from optax_ftml import ftml  # noqa: E402
from optax_ftml import mxnet  # noqa: E402

STEPS = 12
BATCH_SIZE = 32  # global: the same batches on any number of devices
FEATURES, HIDDEN = 8, 32
OPTIMIZERS = {
    "default": ftml(0.02),
    "recompute_d_prev": ftml(0.02, recompute_d_prev=True),
}


def mesh_and_shardings():
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(AxisType.Auto,))
  params = {"w1": NamedSharding(mesh, P(None, "data")),  # FSDP: every weight
            "b1": NamedSharding(mesh, P("data")),  # split over the axis
            "w2": NamedSharding(mesh, P("data", None)),  # the batch is split
            "b2": NamedSharding(mesh, P())}  # over; too small to split
  return params, NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def initial_params():
  rng = np.random.default_rng(0)
  return {"w1": rng.normal(size=(FEATURES, HIDDEN)).astype(np.float32) / 3,
          "b1": np.zeros(HIDDEN, np.float32),
          "w2": rng.normal(size=(HIDDEN, 1)).astype(np.float32) / HIDDEN**0.5,
          "b2": np.zeros(1, np.float32)}


def global_batch(step):
  """The whole batch of a step: every process can compute it, none stores it."""
  rng = np.random.default_rng(1000 + step)
  x = rng.normal(size=(BATCH_SIZE, FEATURES)).astype(np.float32)
  return x, np.sin(x.sum(axis=1, keepdims=True))


def local_rows(sharding, batch_size):
  """The rows of the global batch that this process's devices hold."""
  indices = sharding.addressable_devices_indices_map((batch_size, FEATURES))
  starts = [index[0].start or 0 for index in indices.values()]
  stops = [index[0].stop or batch_size for index in indices.values()]
  return slice(min(starts), max(stops))


def loss_fn(params, x, y):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def gather(tree):
  """The whole arrays on the host of every process (a collective)."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def flat(tree, prefix):
  return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def state_shardings_of(tx, abstract_params, param_shardings, replicated):
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, abstract_params),
      param_shardings, transform_non_params=lambda _: replicated)


def abstract_target(tx, param_shardings, replicated):
  abstract_params = jax.tree.map(
      lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
      initial_params(), param_shardings)
  state_shardings = state_shardings_of(tx, abstract_params, param_shardings,
                                       replicated)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(tx.init, abstract_params), state_shardings)
  return {"params": abstract_params, "opt_state": abstract_state}


def assert_state_sharded_like_params(tx, params, opt_state):
  """Every parameter-shaped buffer of the state has its parameter's sharding."""
  buffers = []
  optax.tree_map_params(
      tx, lambda leaf, param: buffers.append((leaf.sharding, param.sharding)),
      opt_state, params)
  assert len(buffers) >= 2 * len(jax.tree.leaves(params))  # v, z (, d_prev)
  for buffer, param in buffers:
    assert buffer == param, (buffer, param)


def held(leaf):
  """The elements of ``leaf`` that this process stores, each shard once."""
  return sum({str(shard.index): shard.data.size
              for shard in leaf.addressable_shards}.values())


def assert_each_process_holds_its_share(params, opt_state, name, out):
  """This process stores 1/N of every split parameter and FTML buffer (of N
  processes), and all of a replicated one."""
  ftml_state = opt_state[1]
  assert isinstance(ftml_state, FTMLState | FTMLLeanState)
  trees = {"params": params, "v": ftml_state.v, "z": ftml_state.z}
  if isinstance(ftml_state, FTMLState):  # the lean state recomputes d_prev
    trees["d_prev"] = ftml_state.d_prev
  for field, tree in trees.items():
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      split = leaf.sharding.spec != P()
      expected = leaf.size // jax.process_count() if split else leaf.size
      key = f"{name}/{field}{jax.tree_util.keystr(path)}"
      assert held(leaf) == expected, (key, held(leaf), leaf.size)
      out["shares"][key] = np.float64(held(leaf) / leaf.size)


def assert_eager_init_is_not_saved(tx, params, opt_state, checkpoints, name):
  """The guide's caveat: an eager init leaves the count on this process's
  devices only, and Orbax refuses to save it; the jitted one spans all."""
  eager = tx.init(params)
  assert eager[1].count.is_fully_addressable
  assert not opt_state[1].count.is_fully_addressable
  try:
    ocp.StandardCheckpointer().save(
        pathlib.Path(checkpoints).absolute() / f"{name}_eager", eager)
  except ValueError as error:
    assert "host local" in str(error), error
  else:
    raise AssertionError("Orbax saved a count that one process holds")


def train(name, base, arguments, out, checkpoints):
  tx = optax.chain(optax.clip_by_global_norm(1.0), base)
  param_shardings, replicated, batch_sharding = mesh_and_shardings()
  state_shardings = state_shardings_of(tx, initial_params(), param_shardings,
                                       replicated)
  target = abstract_target(tx, param_shardings, replicated)
  checkpointer = ocp.StandardCheckpointer()

  if arguments.resume:
    restored = checkpointer.restore(
        pathlib.Path(arguments.resume).absolute() / name, target)
    assert_state_sharded_like_params(tx, restored["params"],
                                     restored["opt_state"])
    out["restored"].update(flat(gather(restored), name))
    params, opt_state, first = (restored["params"], restored["opt_state"],
                                arguments.save_at)
  else:
    params = jax.device_put(initial_params(), param_shardings)
    opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    first = 0
    if jax.process_count() > 1:
      assert_eager_init_is_not_saved(tx, params, opt_state, checkpoints, name)

  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  train_step = jax.jit(
      train_step, donate_argnums=(0, 1),
      out_shardings=(param_shardings, state_shardings, replicated))

  rows = local_rows(batch_sharding, BATCH_SIZE)
  losses = []
  for step in range(first, STEPS):
    if step == arguments.save_at and not arguments.resume:
      state = {"params": params, "opt_state": opt_state}
      checkpointer.save(pathlib.Path(checkpoints).absolute() / name, state)
      checkpointer.wait_until_finished()
      out["saved"].update(flat(gather(state), name))
    x, y = (jax.make_array_from_process_local_data(batch_sharding, part[rows])
            for part in global_batch(step))
    params, opt_state, loss = train_step(params, opt_state, x, y)
    # Simulated CPU devices: queued steps can deadlock XLA:CPU's collectives
    # when the devices outnumber the cores; wait for each step.
    losses.append(jax.block_until_ready(loss))
  assert_state_sharded_like_params(tx, params, opt_state)
  assert_each_process_holds_its_share(params, opt_state, name, out)
  out["losses"][name] = np.asarray(losses)
  out["final"].update(flat(gather({"params": params, "opt_state": opt_state}),
                           name))


def update_alone(out):
  """Thirty FTML updates of sharded parameters, without any reduction."""
  param_shardings, replicated, _ = mesh_and_shardings()
  tx = ftml(0.02)
  state_shardings = state_shardings_of(tx, initial_params(), param_shardings,
                                       replicated)

  @jax.jit
  def updates(params, opt_state):
    def step(carry, i):
      params, opt_state = carry
      grads = jax.tree.map(lambda p: jnp.cos(p * (i + 1.0)), params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    return jax.lax.scan(step, (params, opt_state), jnp.arange(30.0))[0]

  params = jax.device_put(initial_params(), param_shardings)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  out["update_alone"].update(flat(gather(updates(params, opt_state)), ""))


def mxnet_resumed(directory, out):
  """Every process reads MXNet's files, resumes FTML with each parameter split
  over the mesh (its first dimension the devices divide) and continues with
  the gradients MXNet used."""
  directory = pathlib.Path(directory)
  network = json.loads((directory / "network.json").read_text())
  record = np.load(directory / "continued.npz")
  weights = mxnet.read_params(directory / "model.params")
  assert isinstance(weights, dict)
  trained = [n for n, req in network["grad_req"].items() if req != "null"]
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(AxisType.Auto,))

  def split(shape):
    for axis, size in enumerate(shape):
      if size % jax.device_count() == 0:
        return NamedSharding(mesh, P(*[None] * axis, "data"))
    return NamedSharding(mesh, P())

  shardings = {n: split(weights[n].shape) for n in trained}
  assert any(s.spec != P() for s in shardings.values())
  params = {n: jax.device_put(weights[n], shardings[n]) for n in trained}
  tx, opt_state = mxnet.resume(
      directory / "trainer.states", params,
      indices={n: network["trainer_indices"][n] for n in trained},
      hyperparameters={key: {n: network[key][n] for n in trained}
                       for key in ("lr_mult", "wd_mult")})
  # Each FTML buffer (within multi_transform's groups: the leaves of its
  # group, MaskedNode elsewhere) has its parameter's sharding.
  buffers = 0
  for ftml_state in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, FTMLState)):
    if not isinstance(ftml_state, FTMLState):
      continue
    for tree in (ftml_state.d_prev, ftml_state.v, ftml_state.z):
      for path, leaf in jax.tree_util.tree_leaves_with_path(
          tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode)):
        if not isinstance(leaf, optax.MaskedNode):
          name = path[0].key  # pyright: ignore[reportAttributeAccessIssue]
          assert leaf.sharding == params[name].sharding, (name, leaf.sharding)
          buffers += 1
  assert buffers == 3 * len(params), buffers
  update = jax.jit(tx.update)
  for t in range(network["steps_after"]):
    grads = {n: jax.device_put(record[f"{t}/grad/{n}"], shardings[n])
             for n in trained}
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  out["mxnet_resumed"].update(flat(gather(params), "params"))
  out["mxnet_resumed"].update(flat(gather(opt_state), "opt_state"))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--checkpoints")
  parser.add_argument("--save-at", type=int, default=STEPS // 2)
  parser.add_argument("--resume")
  parser.add_argument("--mxnet")
  arguments = parser.parse_args()
  out = {name: {} for name in ("losses", "final", "saved", "restored",
                               "shares", "update_alone", "mxnet_resumed")}
  if arguments.mxnet:
    mxnet_resumed(arguments.mxnet, out)
  else:
    for name, base in OPTIMIZERS.items():
      train(name, base, arguments, out, arguments.checkpoints)
    if not arguments.resume:
      update_alone(out)
  if jax.process_index() == 0:
    for name, arrays in out.items():
      if arrays:
        np.savez(pathlib.Path(arguments.out) / f"{name}.npz", **arrays)
  # Every process finishes its collectives before any leaves.
  multihost_utils.sync_global_devices("done")


if __name__ == "__main__":
  main()
