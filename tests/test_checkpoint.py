"""Saving and restoring FTML's state with Orbax, and resuming training exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from optax_ftml import FTMLState
from optax_ftml import demo
from optax_ftml import ftml

STEPS = 12
CHECKPOINT_STEP = 5
BATCH_SIZE = 32


# A schedule makes the result depend on the restored step count too.
TX = optax.chain(
    optax.clip_by_global_norm(1.0),
    ftml(lambda count: 0.01 / (1 + 0.2 * count.astype(jnp.float32))))


def make_model_and_optimizer(seed):
  model = demo.CNN(nnx.Rngs(seed))
  return model, nnx.Optimizer(model, TX, wrt=nnx.Param)


def training_state(model, optimizer):
  return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}


@pytest.fixture(scope="module")
def batches():
  data = demo.load_digits()
  indices = demo.batch_indices(len(data.train_labels), BATCH_SIZE, STEPS, 0)
  return data.train_images[indices], data.train_labels[indices]


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected),
                  strict=True):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(a, e)


def test_restore_into_abstract_target_keeps_state_types(tmp_path, batches):
  # A training loop without Flax's optimizer: plain parameters and Optax state.
  model = demo.CNN(nnx.Rngs(0))
  graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))

  @jax.jit
  def train_step(params, opt_state, images, labels):
    grads = jax.grad(lambda p: demo.loss_fn(
        nnx.merge(graphdef, p), images, labels))(params)
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = TX.init(params)
  for images, labels in zip(*(b[:3] for b in batches), strict=True):
    params, opt_state = train_step(params, opt_state, images, labels)
  saved = {"params": params, "opt_state": opt_state}

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", saved)
  checkpointer.wait_until_finished()
  target = jax.eval_shape(
      lambda: {"params": params, "opt_state": TX.init(params)})
  restored = checkpointer.restore(tmp_path / "state", target)

  assert type(restored["opt_state"]) is tuple
  assert isinstance(restored["opt_state"][0], optax.EmptyState)
  ftml_state = restored["opt_state"][1]
  assert type(ftml_state) is FTMLState
  assert int(ftml_state.count) == 3
  assert ftml_state.v["head"]["kernel"].dtype == np.float32
  assert_trees_equal(restored, saved)


def test_resumed_training_is_bit_identical(tmp_path, batches):
  model, optimizer = make_model_and_optimizer(seed=0)
  with ocp.CheckpointManager(tmp_path) as manager:
    for step, (images, labels) in enumerate(zip(*batches, strict=True)):
      if step == CHECKPOINT_STEP:
        manager.save(step, args=ocp.args.StandardSave(
            training_state(model, optimizer)))
      demo.train_step(model, optimizer, images, labels)
  uninterrupted = training_state(model, optimizer)

  # A fresh process would only know how to build the model: restore into the
  # abstract state of a differently initialised one.
  model, optimizer = make_model_and_optimizer(seed=1)
  with ocp.CheckpointManager(tmp_path) as manager:
    step = manager.latest_step()
    abstract = training_state(*nnx.eval_shape(
        lambda: make_model_and_optimizer(seed=1)))
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  nnx.update(model, restored["model"])
  nnx.update(optimizer, restored["optimizer"])

  assert step == CHECKPOINT_STEP
  assert isinstance(optimizer.opt_state[1], FTMLState)
  assert int(optimizer.opt_state[1].count) == int(optimizer.step[...]) == step
  for images, labels in zip(*(b[step:] for b in batches), strict=True):
    demo.train_step(model, optimizer, images, labels)
  assert_trees_equal(training_state(model, optimizer), uninterrupted)
