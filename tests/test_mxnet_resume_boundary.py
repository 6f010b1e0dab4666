"""mxnet.resume's one error: whatever is wrong with a file's content, in
reading, checking or building the optimizer from it, is an ``mxnet.FileError``
naming the file and what is wrong; a caller's own wrong argument stays a
``ValueError`` or ``TypeError`` naming the argument. The files are written
here from the example's contents with one thing changed
(tests/file_grammar.py writes the pickle)."""

import pathlib
import random
import re
import warnings

import file_grammar
import jax.numpy as jnp
import numpy as np
import pytest

from optax_ftml import mxnet

EXAMPLE = pathlib.Path(mxnet.__file__).parent / "example"
SAVED = mxnet.read_trainer_states(EXAMPLE / "trainer.states")
INDICES = {"0.bias": 0, "0.weight": 1, "3.bias": 2, "3.weight": 3}
FLAGS = {np.dtype(v): k for k, v in file_grammar.DTYPE_FLAGS.items()}


def params():
  return {name: jnp.asarray(w)
          for name, w in mxnet.read_params(EXAMPLE / "model.params").items()}


def as_written(value):
  """``value`` as the grammar writes it: records and arrays as MXNet's."""
  if isinstance(value, mxnet.PickledObject):
    module, _, name = value.mxnet_class.rpartition(".")
    return file_grammar.Record(module, name, as_written(value.attributes))
  if isinstance(value, np.ndarray):
    return file_grammar.Array(value, FLAGS[value.dtype], file_grammar.MAGIC_V3)
  if isinstance(value, dict):
    return {k: as_written(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(as_written(v) for v in value)
  return value


def write(tmp_path, states=None, **attributes) -> pathlib.Path:
  """The example's trainer states with ``attributes`` of the optimizer
  replaced, and ``states`` for the states if given."""
  optimizer = mxnet.PickledObject(SAVED.optimizer.mxnet_class,
                                  {**SAVED.optimizer.attributes, **attributes})
  value = as_written((SAVED.states if states is None else states, optimizer))
  path = tmp_path / "trainer.states"
  path.write_bytes(file_grammar.PickleWriter(random.Random(0), 4).dumps(value))
  return path


def refused(path, *what):
  """Resuming from ``path`` raises a FileError naming it and ``what``, also
  with warnings as errors."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(mxnet.FileError) as error:
      mxnet.resume(path, params(), indices=INDICES)
  message = str(error.value)
  assert message.startswith("mxnet.resume: ") and str(path) in message, message
  for part in what:
    assert re.search(part, message), (part, message)


def test_the_written_example_resumes_like_the_example(tmp_path):
  optimizer, state = mxnet.resume(write(tmp_path), params(), indices=INDICES)
  _, expected = mxnet.resume(EXAMPLE / "trainer.states", params(),
                             indices=INDICES)
  for ours, theirs in zip(np.asarray(state[-1].d_prev["3.weight"]).ravel()[:5],
                          np.asarray(expected[-1].d_prev["3.weight"]).ravel()[:5],
                          strict=True):
    assert ours == theirs
  assert int(state[-1].count) == 100 and optimizer is not None


@pytest.mark.parametrize("scheduler, what", [
    (5, r"lr_scheduler.*5"),
    ("cosine", r"lr_scheduler"),
    (mxnet.PickledObject("mxnet.lr_scheduler.LRScheduler", {}),
     r"unsupported MXNet scheduler mxnet\.lr_scheduler\.LRScheduler"),
    (mxnet.PickledObject("mxnet.lr_scheduler.FactorScheduler", {}),
     r"lacks the attribute"),
])
def test_a_scheduler_the_file_holds_that_cannot_be_used(tmp_path, scheduler,
                                                        what):
  refused(write(tmp_path, lr_scheduler=scheduler), what)


def test_states_that_are_not_ftmls(tmp_path):
  d, v, z = SAVED.states[3]
  two = {**SAVED.states, 3: (d, v)}
  refused(write(tmp_path, states=two), r"index 3", r"\(d, v, z\)")
  master_and_two = {**SAVED.states, 3: (d, (d, v))}
  refused(write(tmp_path, states=master_and_two), r"index 3",
          "with a master weight")
  listed = {**SAVED.states, 3: [d, v, z]}
  refused(write(tmp_path, states=listed), r"index 3")


def test_hyperparameters_ftml_refuses(tmp_path):
  refused(write(tmp_path, beta1=1.5), "beta1")
  refused(write(tmp_path, epsilon=-1.0), "epsilon")


@pytest.mark.parametrize("value", [1e300, -1e300, np.inf, np.nan])
def test_state_values_must_be_finite_in_float32(tmp_path, value):
  d, v, z = SAVED.states[3]
  big = np.array(v, np.float64)
  big.flat[7] = value
  refused(write(tmp_path, states={**SAVED.states, 3: (d, big, z)}),
          r"index 3", r"float32")


def test_master_weights_must_be_finite_in_float32(tmp_path):
  d, v, z = SAVED.states[3]
  master = np.array(d, np.float64)
  master.flat[0] = 1e300
  path = write(tmp_path, states={**SAVED.states, 3: (master, (d, v, z))})
  with pytest.raises(mxnet.FileError) as error:
    mxnet.master_weights(path, params(), indices=INDICES)
  message = str(error.value)
  assert message.startswith(f"mxnet.master_weights: {path}: ") and (
      "master weight of index 3" in message and "float32" in message), message


def test_float64_states_within_float32_are_cast(tmp_path):
  d, v, z = SAVED.states[3]
  wide = {**SAVED.states, 3: tuple(np.asarray(x, np.float64) for x in (d, v, z))}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _, state = mxnet.resume(write(tmp_path, states=wide), params(),
                            indices=INDICES)
  np.testing.assert_array_equal(state[-1].v["3.weight"], v)


@pytest.mark.parametrize("key", ["wd", "rescale_grad", "clip_gradient"])
def test_hyperparameters_must_be_finite_in_float32(tmp_path, key):
  refused(write(tmp_path, **{key: 1e300}), key)


def test_a_callers_wrong_arguments_stay_value_and_type_errors(tmp_path):
  path = write(tmp_path)
  for arguments in ({"indices": {"nope": 0}},
                    {"indices": INDICES, "hyperparameters": {"lr": 0.1}},
                    {"indices": INDICES, "hyperparameters": {"beta1": 2.0}},
                    {"indices": INDICES, "num_update": 3}):
    with pytest.raises(ValueError) as error:
      mxnet.resume(path, params(), **arguments)
    assert not isinstance(error.value, mxnet.FileError), arguments
  with pytest.raises(TypeError) as type_error:
    mxnet.resume(12, params())  # pyright: ignore[reportArgumentType]
  assert "file" in str(type_error.value)
