"""FTML in Flax training loops: NNX's ``nnx.Optimizer``, linen's ``TrainState``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen
from flax import nnx
from flax.training import train_state

from optax_ftml import FTMLState
from optax_ftml import demo
from optax_ftml import ftml

STEPS = 150
BATCH_SIZE = 64
TARGET_ACCURACY = 0.9


@pytest.fixture(scope="module")
def digits():
  return demo.load_digits()


def batches(data, seed=0):
  indices = demo.batch_indices(len(data.train_labels), BATCH_SIZE, STEPS, seed)
  return data.train_images[indices], data.train_labels[indices]


def test_nnx_optimizer_passes_parameters_to_ftml(digits):
  """One ``nnx.Optimizer`` step equals the plain Optax update on the same arrays."""
  model = demo.CNN(nnx.Rngs(0))
  tx = ftml(learning_rate=0.01)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  opt_state = tx.init(params)
  images, labels = (x[:BATCH_SIZE] for x in (digits.train_images,
                                              digits.train_labels))

  graphdef = nnx.graphdef(model)

  @jax.jit
  def optax_step(params, opt_state):
    grads = jax.grad(lambda p: demo.loss_fn(
        nnx.merge(graphdef, p), images, labels))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(3):
    params, opt_state = optax_step(params, opt_state)
    demo.train_step(model, optimizer, images, labels)

  assert isinstance(optimizer.opt_state, FTMLState)
  assert int(optimizer.opt_state.count) == int(optimizer.step[...]) == 3
  # Equal up to float32 rounding (the two programs may fuse differently).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               nnx.to_pure_dict(nnx.state(model, nnx.Param)), params)


def test_nnx_optimizer_trains_the_digits_cnn(digits):
  model = demo.CNN(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ftml(learning_rate=0.0025), wrt=nnx.Param)
  images, labels = batches(digits)
  losses = [demo.train_step(model, optimizer, x, y)
            for x, y in zip(images, labels, strict=True)]

  _, accuracy = demo.evaluate(model, digits.test_images, digits.test_labels)
  assert float(accuracy) >= TARGET_ACCURACY
  assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10])


class LinenMLP(linen.Module):
  """A small linen classifier for the flattened 8x8 digits."""

  @linen.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = linen.relu(linen.Dense(64)(x))
    return linen.Dense(10)(x)


def test_linen_train_state_trains_with_ftml(digits):
  model = LinenMLP()
  params = model.init(jax.random.key(0), digits.train_images[:1])["params"]
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=optax.chain(optax.clip_by_global_norm(5.0), ftml(learning_rate=0.01)))

  def loss_fn(params, images, labels):
    logits = state.apply_fn({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def train(state, images, labels):
    def step(state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(state.params, *batch)
      return state.apply_gradients(grads=grads), loss
    return jax.lax.scan(step, state, (images, labels))

  state, losses = train(state, *batches(digits))

  assert isinstance(state.opt_state[1], FTMLState)
  assert int(state.step) == int(state.opt_state[1].count) == STEPS
  logits = model.apply({"params": state.params}, digits.test_images)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == digits.test_labels)
  assert float(accuracy) >= TARGET_ACCURACY
  assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10])
