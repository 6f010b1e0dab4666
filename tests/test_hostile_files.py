"""Files from strangers: the named hostile files and a seeded fuzz run
(tests/hostile_files.py, in a subprocess under an address-space limit), and a
test for each check of the readers."""

import json
import pathlib
import pickle
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import hostile_files
from optax_ftml import mxnet
from optax_ftml.mxnet import _files

SCRIPT = pathlib.Path(hostile_files.__file__)
# Safety bounds, far above what the readers take (milliseconds, a few times
# the file's size); what they catch is a hang or a blow-up.
SECONDS_PER_CASE = 30
PEAK_BYTES_PER_FILE_BYTE = 64
PEAK_BYTES_OVERHEAD = 16 << 20


def run_script(*args):
  done = subprocess.run([sys.executable, str(SCRIPT), *args],
                        capture_output=True, text=True, timeout=300,
                        check=False)
  lines = [json.loads(line) for line in done.stdout.splitlines()]
  assert lines, done.stderr
  return done.returncode, lines[:-1], lines[-1]


def test_named_hostile_files_are_refused_quickly_and_change_nothing():
  returncode, results, summary = run_script("cases")
  assert returncode == 0, results
  assert summary["library_changed"] is False
  assert [r["name"] for r in results] == list(hostile_files.CASES)
  for result in results:
    expected = hostile_files.CASES[result["name"]][2]
    if expected is None:
      assert result["outcome"] == "read", result
    else:
      assert result["outcome"] == "FileError", result
      assert expected in result["message"], result
    assert result["seconds"] < SECONDS_PER_CASE, result
    assert result["peak_bytes"] < (PEAK_BYTES_PER_FILE_BYTE * result["size"]
                                   + PEAK_BYTES_OVERHEAD), result


def test_fuzzed_fixtures_read_or_raise_mxnet_file_error():
  returncode, results, _ = run_script("fuzz", "--seed", "0", "--seconds", "15")
  bad = [r for r in results if r["outcome"] not in ("read", "FileError")]
  assert returncode == 0 and not bad, bad[:5]
  assert len(results) >= 1000
  kinds = {(r["name"], r["outcome"]) for r in results}
  assert {("truncate", "FileError"), ("flip", "read"),
          ("splice", "FileError"), ("insert", "FileError")} <= kinds
  assert max(r["seconds"] for r in results) < SECONDS_PER_CASE


def test_benign_shared_references_read_as_the_graph_they_describe():
  # The hostile builders at small sizes: refused above only for their size.
  lists = mxnet.read_trainer_states(hostile_files.shared_lists(3)).states[0]
  assert lists == [[[[], []], [[], []]], [[[], []], [[], []]]]
  assert lists[0] is lists[1]  # shared, as in the file: not copied
  record = mxnet.read_trainer_states(hostile_files.shared_records(2)).states[0]
  assert record.class_name == "FTML"
  assert record.attributes["a"] is record.attributes["b"]
  assert record.attributes["a"].attributes["a"].attributes == {}
  twice = mxnet.read_trainer_states(hostile_files.blob_copies(2, "ndarray"))
  first, second = twice.states[0]
  assert first.shape == (1 << 18,) and first.dtype == np.float32
  assert first is not second and not first.any()


@pytest.mark.parametrize("module, name", [
    ("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
    ("mxnet.optimizer.optimizer", "register"),
    ("mxnet.optimizer.optimizer", "Updater"),
    ("mxnet.optimizer.ftml", "ftml_update"),
    ("mxnet.lr_scheduler", "logging"), ("mxnet.ndarray.ndarray", "array"),
    ("builtins", "getattr"), ("_codecs", "decode"),
])
def test_near_misses_of_the_allow_list_are_refused(module, name):
  data = hostile_files.PROTO4 + f"c{module}\n{name}\n)R.".encode()
  with pytest.raises(mxnet.FileError, match=f"refused to load {module}.{name}"):
    mxnet.read_trainer_states(data)


def test_protocol_2_bytes_and_bytearrays_read():
  states = {0: (bytearray(b"\x00\xff"), b"ab")}
  assert mxnet.read_trainer_states(pickle.dumps(states, 2)).states == {
      0: (b"\x00\xff", b"ab")}


def pickled_ndarray(handle):
  """A states file holding one NDArray with this raw ``handle``."""
  return (hostile_files.PROTO4 + b"}K\x00\x8c\x15mxnet.ndarray.ndarray\x8c\x07"
          b"NDArray\x93N\x85R}\x8c\x06handleC" + bytes([len(handle)]) + handle
          + b"sbs.")


def test_a_pickled_ndarray_must_be_exactly_one_array():
  handle = hostile_files.array_bytes(np.arange(3, dtype=np.float32))
  array = mxnet.read_trainer_states(pickled_ndarray(handle)).states[0]
  np.testing.assert_array_equal(array, [0, 1, 2])
  with pytest.raises(mxnet.FileError, match="1 bytes after the array"):
    mxnet.read_trainer_states(pickled_ndarray(handle + b"\0"))


def test_the_second_element_must_be_an_optimizer():
  scheduler = (hostile_files.FIXTURES / "schedulers" / "factor-fresh.pkl"
               ).read_bytes()[2:-1]  # without PROTO and STOP
  data = hostile_files.PROTO4 + b"}" + scheduler + b"\x86."
  as_ftml = data.replace(b"\x8c\x12mxnet.lr_scheduler\x94\x8c\x0fFactorScheduler",
                         b"\x8c\x19mxnet.optimizer.optimizer\x94\x8c\x04FTML")
  assert mxnet.read_trainer_states(as_ftml).optimizer.class_name == "FTML"
  with pytest.raises(mxnet.FileError, match="not an MXNet trainer-state file"):
    mxnet.read_trainer_states(data)


def test_bfloat16_arrays_read_as_bfloat16():
  values = np.array([1.5, -2.0, 0.0078125], ml_dtypes.bfloat16)
  data = (struct.pack("<QQQ", 0x112, 0, 1)
          + struct.pack("<IIiq", 0xF993FAC9, 0, 1, 3)
          + struct.pack("<iii", 1, 0, 12) + values.tobytes()
          + struct.pack("<Q", 0))
  (array,) = mxnet.read_params(data)
  assert array.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(array, values)


def named_params(names, shape=(2,)):
  array = np.zeros(shape, np.float32)
  body = b"".join(hostile_files.array_bytes(array) for _ in names)
  tail = struct.pack("<Q", len(names)) + b"".join(
      struct.pack("<Q", len(n)) + n.encode() for n in names)
  return struct.pack("<QQQ", 0x112, 0, len(names)) + body + tail


def test_parameter_file_structure_checks():
  assert list(mxnet.read_params(named_params(["a", "b"]))) == ["a", "b"]
  with pytest.raises(mxnet.FileError, match="duplicate names"):
    mxnet.read_params(named_params(["a", "a"]))
  wrong_count = named_params(["a"]).replace(
      struct.pack("<Q", 1) + struct.pack("<Q", 1) + b"a",
      struct.pack("<Q", 2) + struct.pack("<Q", 1) + b"a")
  with pytest.raises(mxnet.FileError, match="2 names for 1 arrays"):
    mxnet.read_params(wrong_count)
  with pytest.raises(mxnet.FileError, match="cannot fit in the file"):
    mxnet.read_params(struct.pack("<QQQ", 0x112, 0, 2**40) + bytes(64))
  with pytest.raises(mxnet.FileError, match=r"has dims \(-1, 4\)"):
    mxnet.read_params(hostile_files.params_file((-1, 4)))
  with pytest.raises(mxnet.FileError, match="ndim -2"):
    mxnet.read_params(hostile_files.params_file((1,) * 2).replace(
        struct.pack("<i", 2), struct.pack("<i", -2), 1))


def test_reads_refuse_negative_sizes():
  reader = _files._Bytes(b"abcd", "<bytes>")
  with pytest.raises(mxnet.FileError, match="needs -1 bytes"):
    reader.take(-1, "a field")
  assert bytes(reader.take(4, "a field")) == b"abcd"


def test_a_record_is_built_once():
  """A second BUILD would overwrite a record's attributes after others
  referred to them."""
  ftml = b"\x8c\x19mxnet.optimizer.optimizer\x8c\x04FTML\x93)\x81"
  once = hostile_files.PROTO4 + b"}K\x00" + ftml + b"}b" + b"s."
  assert mxnet.read_trainer_states(once).states[0].attributes == {}
  with pytest.raises(mxnet.FileError, match="BUILD on a _Pending"):
    mxnet.read_trainer_states(hostile_files.PROTO4 + b"}K\x00" + ftml
                              + b"}b}b" + b"s.")


def test_globals_are_named_by_strings_and_called_without_arguments():
  with pytest.raises(mxnet.FileError, match="named by non-strings"):
    mxnet.read_trainer_states(hostile_files.PROTO4 + b"K\x01K\x02\x93.")
  with pytest.raises(mxnet.FileError, match="called with arguments"):
    mxnet.read_trainer_states(
        hostile_files.PROTO4 + b"}K\x00\x8c\x19mxnet.optimizer.optimizer"
        b"\x8c\x04FTML\x93K\x01\x85\x81}bs.")
