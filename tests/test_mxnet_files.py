"""Reading MXNet's parameter and trainer-state files, written by MXNet 1.9.1
(tests/mxnet_fixtures/record.py), without MXNet."""

import json
import os
import pathlib
import pickle

import numpy as np
import pytest

from optax_ftml import mxnet

FIXTURES = pathlib.Path(__file__).parent / "mxnet_fixtures"
DTYPES = ("float16", "float32", "float64", "uint8", "int8", "int32", "int64")


def array_values(dtype):
  """What record.py saved for each dtype."""
  return ((np.arange(24).reshape(2, 3, 4) - 6) / 4).astype(dtype)


def test_reads_every_dtype():
  arrays = mxnet.read_params(FIXTURES / "arrays" / "dtypes.params")
  assert list(arrays) == list(DTYPES)
  for dtype, array in arrays.items():
    assert array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(array, array_values(dtype))


def test_reads_a_list_without_names():
  arrays = mxnet.read_params(FIXTURES / "arrays" / "list.params")
  assert isinstance(arrays, list) and len(arrays) == 2
  for array, dtype in zip(arrays, ("float32", "float64"), strict=True):
    assert array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(array, array_values(dtype))


def test_reads_numpy_shape_semantics():
  arrays = mxnet.read_params(FIXTURES / "arrays" / "np_shape.params")
  assert arrays["scalar"].shape == () and arrays["scalar"] == np.float32(2.5)
  assert arrays["empty"].shape == (0, 3)
  np.testing.assert_array_equal(arrays["float32"], array_values("float32"))


def test_reads_bytes_and_refuses_other_inputs():
  path = FIXTURES / "arrays" / "dtypes.params"
  from_bytes = mxnet.read_params(path.read_bytes())
  for dtype in DTYPES:
    np.testing.assert_array_equal(from_bytes[dtype], array_values(dtype))
  with pytest.raises(TypeError, match="path or bytes"):
    mxnet.read_params(1234)  # pyright: ignore[reportArgumentType]


def test_refuses_sparse_storage():
  with pytest.raises(mxnet.FileError, match="row_sparse storage"):
    mxnet.read_params(FIXTURES / "arrays" / "row_sparse.params")


def test_reads_pickled_ndarrays():
  saved = mxnet.read_trainer_states(FIXTURES / "arrays" / "dtypes.states")
  assert saved.optimizer is None and sorted(saved.states) == [0, 1]
  for arrays in saved.states.values():
    for array, dtype in zip(arrays, DTYPES[:3], strict=True):
      assert array.dtype == np.dtype(dtype)
      np.testing.assert_array_equal(array, array_values(dtype))


def test_gluon_files():
  network = json.loads((FIXTURES / "gluon" / "network.json").read_text())
  params = mxnet.read_params(FIXTURES / "gluon" / "model.params")
  # Gluon's parameter file is keyed by structural position, nested blocks
  # included; running statistics are saved with the parameters.
  assert sorted(params) == sorted(network["full_names"])
  assert params["4.0.weight"].shape == (6, 48)
  assert params["0.weight"].shape == (3, 1, 3, 3)
  saved = mxnet.read_trainer_states(FIXTURES / "gluon" / "trainer.states")
  stateless = {network["trainer_indices"][n]
               for n, req in network["grad_req"].items() if req == "null"}
  assert stateless and set(saved.states) == set(range(10)) - stateless
  assert saved.optimizer is not None
  assert saved.optimizer.mxnet_class == "mxnet.optimizer.optimizer.FTML"
  attributes = saved.optimizer.attributes
  assert attributes["num_update"] == network["steps_before"]
  assert attributes["rescale_grad"] == 1 / network["batch_size"]
  assert attributes["lr_scheduler"].class_name == "FactorScheduler"
  for index, (d, v, z) in saved.states.items():
    name = next(n for n, i in network["trainer_indices"].items() if i == index)
    assert d.shape == v.shape == z.shape == params[name].shape
    assert (d > 0).all() and (v >= 0).all()


def every_truncation(data):
  return [data[:n] for n in range(len(data))]


@pytest.mark.parametrize("name", ["gluon/model.params", "arrays/dtypes.params",
                                  "module/module-0001.params"])
def test_truncated_or_extended_parameter_files_are_refused(name):
  data = (FIXTURES / name).read_bytes()
  for truncated in every_truncation(data):
    with pytest.raises(mxnet.FileError):
      mxnet.read_params(truncated)
  with pytest.raises(mxnet.FileError, match="bytes after the names"):
    mxnet.read_params(data + b"\0")


def test_corrupted_parameter_files_are_refused():
  data = bytearray((FIXTURES / "gluon" / "model.params").read_bytes())
  with pytest.raises(mxnet.FileError, match="not an MXNet NDArray file"):
    mxnet.read_params(b"\x13" + bytes(data[1:]))
  data[24] ^= 0xFF  # the first array's magic number
  with pytest.raises(mxnet.FileError, match="not an NDArray magic"):
    mxnet.read_params(bytes(data))


@pytest.mark.parametrize("name", ["gluon/trainer.states",
                                  "module/module-0001.states"])
def test_truncated_trainer_state_files_are_refused(name):
  data = (FIXTURES / name).read_bytes()
  for truncated in every_truncation(data):
    with pytest.raises(mxnet.FileError, match="truncated or corrupted"):
      mxnet.read_trainer_states(truncated)


def test_corrupted_pickled_ndarray_is_refused():
  data = (FIXTURES / "gluon" / "trainer.states").read_bytes()
  magic = (0xF993FAC9).to_bytes(4, "little")
  assert magic in data
  with pytest.raises(mxnet.FileError, match="not an NDArray magic"):
    mxnet.read_trainer_states(data.replace(magic, b"\0\0\0\0", 1))


class RunsACommand:
  """Unpickling this object runs a shell command (as any pickle may)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_a_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
  marker = tmp_path / "marker"
  command = RunsACommand(f"touch {marker}")
  # The command in place of a parameter's state, or of the optimizer.
  for payload in [{0: (command,)}, ({}, command)]:
    data = pickle.dumps(payload)
    with pytest.raises(mxnet.FileError,
                       match=r"refused to load '(posix|os|nt)\.system'"):
      mxnet.read_trainer_states(data)
    assert not marker.exists()
  # The same bytes do run the command when unpickled without the allow-list.
  pickle.loads(data)
  assert marker.exists()


@pytest.mark.parametrize("module, name", [
    ("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen"),
    ("copyreg", "_reconstructor"), ("numpy", "load"),
    ("mxnet.ndarray.ndarray", "_new_alloc_handle"), ("__main__", "MyScheduler"),
])
def test_globals_outside_the_allow_list_are_refused(module, name):
  data = b"\x80\x04" + f"c{module}\n{name}\n)R.".encode()
  with pytest.raises(mxnet.FileError, match=f"refused to load '{module}.{name}'"):
    mxnet.read_trainer_states(data)


def test_allowed_constructors_cannot_allocate_or_call():
  # bytearray(10**12) would allocate a terabyte: only bytes are accepted.
  with pytest.raises(mxnet.FileError, match="bytearray of int"):
    mxnet.read_trainer_states(
        b"\x80\x04cbuiltins\nbytearray\n\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85R.")
  # An NDArray with no data is corrupt, not a call.
  with pytest.raises(mxnet.FileError, match="NDArray has no data"):
    mxnet.read_trainer_states(
        b"\x80\x04}K\x00cmxnet.ndarray.ndarray\nNDArray\nN\x85R}\x8c\x06handle"
        b"Nsbs.")


def test_other_pickles_are_not_trainer_states():
  with pytest.raises(mxnet.FileError, match="not an MXNet trainer-state file"):
    mxnet.read_trainer_states(pickle.dumps([1, 2]))
  with pytest.raises(mxnet.FileError, match="integer indices"):
    mxnet.read_trainer_states(pickle.dumps({"a": 1}))

