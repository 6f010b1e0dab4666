"""Files from strangers: the named hostile files and a seeded fuzz run
(tests/hostile_files.py, in a subprocess under an address-space limit), and a
test for each check of the readers."""

import json
import os
import pathlib
import pickle
import pickletools
import stat
import struct
import subprocess
import sys
import warnings
import zlib

import ml_dtypes
import numpy as np
import pytest

import hostile_files
from optax_ftml import mxnet
from optax_ftml.mxnet import _files
from optax_ftml.mxnet import _pickle
from optax_ftml.mxnet import _records

SCRIPT = pathlib.Path(hostile_files.__file__)
# Safety bounds, far above what the readers take (milliseconds, a few times
# the file's size); what they catch is a hang or a blow-up.
SECONDS_PER_CASE = 30
PEAK_BYTES_PER_FILE_BYTE = 64
PEAK_BYTES_OVERHEAD = 16 << 20


def run_script(*args, timeout=300):
  done = subprocess.run([sys.executable, str(SCRIPT), *args],
                        capture_output=True, text=True, timeout=timeout,
                        check=False)
  lines = [json.loads(line) for line in done.stdout.splitlines()]
  assert lines, done.stderr
  return done.returncode, lines[:-1], lines[-1]


def quotes_safely(message):
  """Whether an error message is printable ASCII of bounded length: what a
  file says reaches a terminal escaped and short."""
  return message.isascii() and message.isprintable() and len(message) < 600


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
      assert quotes_safely(result["message"]), result
    assert result["seconds"] < SECONDS_PER_CASE, result
    assert result["cpu_seconds"] < SECONDS_PER_CASE, result
    bound = PEAK_BYTES_PER_FILE_BYTE * result["size"] + PEAK_BYTES_OVERHEAD
    assert result["peak_bytes"] < bound, result
    assert result["resident_growth"] < bound, result
  print("\n".join(f"{r['name']}: {r['outcome']}, {r['cpu_seconds']} s CPU,"
                  f" +{r['resident_growth']} B resident" for r in results))


def test_fuzzed_fixtures_read_or_raise_mxnet_file_error():
  returncode, results, _ = run_script("fuzz", "--seed", "0", "--seconds", "15")
  bad = [r for r in results if r["outcome"] not in ("read", "FileError")
         or not quotes_safely(r["message"])]
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
  with pytest.raises(mxnet.FileError, match=f"refused to load '{module}.{name}'"):
    mxnet.read_trainer_states(data)


def test_protocol_2_bytes_and_bytearrays_read():
  states = {0: (bytearray(b"\x00\xff"), b"ab")}
  assert mxnet.read_trainer_states(pickle.dumps(states, 2)).states == {
      0: (b"\x00\xff", b"ab")}


def ndarray_opcodes(handle):
  """An NDArray with this raw ``handle`` (under 256 bytes), as opcodes."""
  return (b"\x8c\x15mxnet.ndarray.ndarray\x8c\x07NDArray\x93N\x85R}"
          b"\x8c\x06handleC" + bytes([len(handle)]) + handle + b"sb")


def pickled_ndarray(handle):
  """A states file holding one NDArray with this raw ``handle``."""
  return hostile_files.PROTO4 + b"}K\x00" + ndarray_opcodes(handle) + b"s."


def test_a_pickled_ndarray_must_be_exactly_one_array():
  handle = hostile_files.array_bytes(np.arange(3, dtype=np.float32))
  array = mxnet.read_trainer_states(pickled_ndarray(handle)).states[0]
  np.testing.assert_array_equal(array, [0, 1, 2])
  with pytest.raises(mxnet.FileError, match="1 bytes after the array"):
    mxnet.read_trainer_states(pickled_ndarray(handle + b"\0"))


def test_the_second_element_must_be_an_optimizer():
  scheduler = (hostile_files.FIXTURES / "schedulers" / "factor-fresh.pkl"
               ).read_bytes()[11:-1]  # without PROTO, FRAME and STOP
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


# The reader's budget, as its module docstring states it: a file of n bytes
# may spend 32 * n + 4096 bytes. These are the documented costs, so that the
# edge tests below compute what a file needs independently of the reader.
BUDGET_PER_FILE_BYTE, BUDGET_BASE = 32, 4096
OBJECT, NUMBER, DICT, REFERENCE, DICT_ITEM, SHARED = 64, 32, 232, 8, 48, 128


def budget(data):
  return BUDGET_PER_FILE_BYTE * len(data) + BUDGET_BASE


def lists_and_bytes(lists, size):
  """{0: [[], ..., [], blob, blob]}: ``lists`` empty lists and one bytes
  object of ``size`` bytes, memoised and fetched again."""
  data = (hostile_files.PROTO4 + b"}K\x00](" + b"]" * lists + b"B"
          + struct.pack("<I", size) + bytes(size) + b"\x94h\x00es.")
  need = (DICT + REFERENCE + NUMBER + REFERENCE  # {, 0
          + OBJECT + REFERENCE + REFERENCE  # [, mark
          + lists * (OBJECT + REFERENCE)  # the empty lists
          + OBJECT + size + REFERENCE  # the bytes (1 per byte)
          + REFERENCE + SHARED + REFERENCE  # memoised, fetched again
          + REFERENCE * (lists + 2) + DICT_ITEM  # appends, setitem
          # the tree: dict, key, list, its lists, the bytes twice (4 per byte)
          + REFERENCE + NUMBER + REFERENCE + REFERENCE * lists
          + 2 * (REFERENCE + 4 * size))
  return data, need


def one_string_many_times(times, length):
  """{0: [s, s, ..., s]}: one ASCII string, memoised once, ``times`` times."""
  data = (hostile_files.PROTO4 + b"}K\x00](X" + struct.pack("<I", length)
          + b"x" * length + b"\x94" + b"h\x00" * (times - 1) + b"es.")
  need = (DICT + REFERENCE + NUMBER + REFERENCE + OBJECT + REFERENCE
          + REFERENCE  # {, 0, [, mark
          + OBJECT + 4 * length + REFERENCE + REFERENCE  # the string, memo
          + SHARED + REFERENCE * (times - 1)  # fetched again
          + REFERENCE * times + DICT_ITEM  # appends, setitem
          + REFERENCE + NUMBER + REFERENCE  # the tree: dict, key, list
          + times * (REFERENCE + 4 * length))  # each occurrence
  return data, need


def at_the_edge(family, lists_range):
  """Arguments of ``family(lists, size)`` whose file needs exactly its
  budget (key 0) or 1 byte more (key 1), among others. Each list needs 56
  bytes more than it adds to the budget, each byte of a blob about 25 bytes
  less: some sizes and numbers of lists meet the budget exactly."""
  over = {}
  for lists in lists_range:
    for size in range(1000, 1056):
      data, need = family(lists, size)
      over.setdefault(need - budget(data), (lists, size))
  return over


def test_the_budget_admits_a_file_needing_exactly_it_and_refuses_one_more():
  over = at_the_edge(lists_and_bytes, range(440, 540))
  data = lists_and_bytes(*over[0])[0]
  states = mxnet.read_trainer_states(data).states
  assert len(states[0]) == over[0][0] + 2 and states[0][-1] == bytes(over[0][1])
  with pytest.raises(mxnet.FileError, match="budget of 32 bytes per byte of"
                     " file plus 4096"):
    mxnet.read_trainer_states(lists_and_bytes(*over[1])[0])


RECORD, PER_CHARACTER, PER_ARRAY_BYTE, PER_ARRAY_DIMENSION = 128, 10, 8, 4


def record_array_blob_lists(lists, size):
  """{0: (NDArray of 4 float32, FTML record {"\u00e9": 1}, bytes of ``size``,
  [[], ..., []])}: the finishing pass rebuilds the tuple and makes a record."""
  handle = hostile_files.array_bytes(np.zeros(4, np.float32))
  data = (hostile_files.PROTO4 + b"}K\x00(" + ndarray_opcodes(handle)
          + b"\x8c\x19mxnet.optimizer.optimizer\x8c\x04FTML\x93)\x81}"
          + b"\x8c\x02\xc3\xa9K\x01sb" + b"B" + struct.pack("<I", size)
          + bytes(size) + b"](" + b"]" * lists + b"ets.")
  def string(length):
    return OBJECT + 4 * length + REFERENCE
  ndarray = (string(21) + string(7) + OBJECT + REFERENCE  # the global
             + REFERENCE + OBJECT + REFERENCE + REFERENCE  # (None,)
             + OBJECT + REFERENCE + DICT + REFERENCE + string(6)  # R, {, handle
             + OBJECT + len(handle) + REFERENCE + DICT_ITEM  # the bytes, s
             + OBJECT + len(handle))  # decoded
  record = (string(25) + string(4) + OBJECT + REFERENCE  # the global
            + REFERENCE + OBJECT + REFERENCE + DICT + REFERENCE  # ), NEWOBJ, {
            + string(2) + NUMBER + REFERENCE + DICT_ITEM)  # "\u00e9": 1
  need = (DICT + REFERENCE + NUMBER + REFERENCE + REFERENCE  # {, 0, mark
          + ndarray + record
          + OBJECT + size + REFERENCE  # the bytes
          + OBJECT + REFERENCE + REFERENCE + lists * (OBJECT + REFERENCE)
          + lists * REFERENCE  # the lists, appended
          + OBJECT + 4 * REFERENCE + REFERENCE + DICT_ITEM  # the tuple, s
          + OBJECT + 4 * REFERENCE + RECORD  # rebuilt tuple, the record
          # the tree: dict, key, tuple; array, record, bytes, lists
          + REFERENCE + NUMBER + REFERENCE
          + OBJECT + PER_ARRAY_BYTE * 16 + PER_ARRAY_DIMENSION * 4
          + RECORD + REFERENCE + REFERENCE + PER_CHARACTER + NUMBER
          + REFERENCE + 4 * size + REFERENCE + lists * REFERENCE)
  return data, need


def test_the_budget_charges_the_finishing_pass_records_arrays_and_text():
  over = at_the_edge(record_array_blob_lists, range(560, 640))
  array, record, blob, lists = mxnet.read_trainer_states(
      record_array_blob_lists(*over[0])[0]).states[0]
  assert array.shape == (4,) and record.attributes == {"\u00e9": 1}
  assert len(lists) == over[0][0] and blob == bytes(over[0][1])
  with pytest.raises(mxnet.FileError, match="budget"):
    mxnet.read_trainer_states(record_array_blob_lists(*over[1])[0])


def test_shared_references_are_charged_at_every_occurrence():
  # The largest number of occurrences within the budget, for the string
  # length at which that leaves the least to spare.
  def edge(length):
    times = max(t for t in range(1, 200)
                if (lambda d, n: n <= budget(d))(*one_string_many_times(
                    t, length)))
    data, need = one_string_many_times(times, length)
    return budget(data) - need, times, length
  spare, times, length = min(edge(length) for length in range(20, 400))
  assert spare < REFERENCE
  states = mxnet.read_trainer_states(
      one_string_many_times(times, length)[0]).states
  assert states[0] == ["x" * length] * times
  # What the result expands into stays within the budget.
  assert len(repr(states)) < budget(one_string_many_times(times, length)[0])
  with pytest.raises(mxnet.FileError, match="budget"):
    mxnet.read_trainer_states(one_string_many_times(times + 1, length)[0])


def test_an_array_shared_many_times_is_charged_at_every_occurrence():
  handle = hostile_files.array_bytes(np.zeros(32, np.float32))
  def shared(times):
    return (hostile_files.PROTO4 + b"}K\x00](" + ndarray_opcodes(handle)
            + b"\x94" + b"h\x00" * (times - 1) + b"es.")
  first, second = mxnet.read_trainer_states(shared(2)).states[0]
  assert first is second and first.shape == (32,)
  with pytest.raises(mxnet.FileError, match="budget"):
    mxnet.read_trainer_states(shared(60))


@pytest.mark.parametrize("name, argument", [
    ("STRING", b"'\\q'\n"), ("INT", b"9" * 5000 + b"\n"), ("LONG", b"1L\n"),
    ("FLOAT", b"1e5\n"), ("UNICODE", b"\\ud800\n"), ("PUT", b"0\n"),
    ("GET", b"0\n"), ("BINSTRING", b"\xff\xff\xff\x7f"),
    ("LONG4", b"\xff\xff\xff\x7f"), ("BYTEARRAY8", b"\xff" * 8),
    ("EXT4", b"\xff" * 4), ("PERSID", b"x\n"), ("INST", b"os\nsystem\n"),
])
def test_opcodes_are_judged_before_their_arguments_are_decoded(name, argument):
  """Each argument would fail or warn if decoded (an invalid escape, a text
  integer past int()'s digit limit, a lone surrogate, a length past the
  file): refused by opcode instead, under the tests' -W error."""
  code = next(op.code for op in pickletools.opcodes if op.name == name)
  data = hostile_files.PROTO4 + b"}K\x00" + code.encode("latin-1") + argument
  with pytest.raises(mxnet.FileError,
                     match=f"refused: pickle opcode {name} .0x... at offset 5"):
    mxnet.read_trainer_states(data + b"s.")


def test_only_the_opcodes_mxnet_writes_are_in_the_dispatch_table():
  written = {
      "PROTO", "FRAME", "STOP", "BININT", "BININT1", "BININT2", "LONG1",
      "BINFLOAT", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
      "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "NONE", "NEWTRUE", "NEWFALSE",
      "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "MARK", "TUPLE", "TUPLE1",
      "TUPLE2", "TUPLE3", "SETITEM", "SETITEMS", "APPEND", "APPENDS",
      "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET", "GLOBAL",
      "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD"}
  codes = {op.name: ord(op.code) for op in pickletools.opcodes}
  assert set(_pickle._DISPATCH) == {codes[name] for name in written} - {
      codes["PROTO"]}  # PROTO only comes first


@pytest.mark.parametrize("opcode, length_format", [
    (b"X", "<I"), (b"\x8c", "<B"), (b"\x8d", "<Q"), (b"C", "<B"),
    (b"B", "<I"), (b"\x8e", "<Q")])
def test_declared_lengths_are_checked_against_the_bytes_left(opcode,
                                                             length_format):
  def states(declared):
    return (hostile_files.PROTO4 + b"}K\x00" + opcode
            + struct.pack(length_format, declared) + b"abcs.")
  assert mxnet.read_trainer_states(states(3)).states[0] in ("abc", b"abc")
  # Declaring every byte left reads them, and then finds no opcode.
  with pytest.raises(mxnet.FileError, match="an opcode needs 1 bytes"):
    mxnet.read_trainer_states(states(5))
  with pytest.raises(mxnet.FileError, match="declares 6 bytes at offset"):
    mxnet.read_trainer_states(states(6))


def test_frames_are_checked_against_the_bytes_left():
  body = b"}K\x00K\x01s."
  framed = hostile_files.PROTO4 + b"\x95" + struct.pack("<Q", len(body)) + body
  assert mxnet.read_trainer_states(framed).states == {0: 1}
  with pytest.raises(mxnet.FileError, match="a frame of 8 bytes"):
    mxnet.read_trainer_states(framed.replace(b"\x95\x07", b"\x95\x08"))


def test_integers_are_at_most_8_bytes():
  def states(width):
    return (hostile_files.PROTO4 + b"}K\x00\x8a" + bytes([width])
            + b"\xff" * width + b"s.")
  assert mxnet.read_trainer_states(states(8)).states == {0: -1}
  with pytest.raises(mxnet.FileError, match="an integer of 9 bytes"):
    mxnet.read_trainer_states(states(9))


def test_global_lines_are_short_ascii():
  def states(module):
    return hostile_files.PROTO4 + b"c" + module + b"\nFTML\n)R."
  with pytest.raises(mxnet.FileError,
                     match=r"refused to load 'x{60}'\.\.\. \(105 in all\)"):
    mxnet.read_trainer_states(states(b"x" * 100))
  with pytest.raises(mxnet.FileError, match="not a line of at most 100 bytes"):
    mxnet.read_trainer_states(states(b"x" * 101))
  with pytest.raises(mxnet.FileError, match=r"'mxnet\\xe9' is not ASCII"):
    mxnet.read_trainer_states(states(b"mxnet\xe9"))


def test_strings_must_be_utf8():
  with pytest.raises(mxnet.FileError, match="is not UTF-8"):
    mxnet.read_trainer_states(hostile_files.global_named("\udc80", "FTML"))


@pytest.mark.parametrize("protocol, found", [
    (0, "got MARK"), (1, "got EMPTY_DICT"), (5, "got PROTO 5")])
def test_only_protocols_2_to_4_are_read(protocol, found):
  data = pickle.dumps({0: 1}, protocol)
  with pytest.raises(mxnet.FileError, match=f"protocol 2 to 4 .Python 3.,"
                     f" {found}"):
    mxnet.read_trainer_states(data)
  assert mxnet.read_trainer_states(pickle.dumps({0: 1}, 2)).states == {0: 1}


def test_warnings_raised_as_errors_while_reading_are_file_errors():
  """Under -W error (as the tests run), a warning is raised: it becomes a
  FileError. The warning filters are the same during the read as outside
  it (changing them would change them for every thread)."""
  filters = []
  def warns(handle):
    filters.append(list(warnings.filters))
    warnings.warn("a library complains", DeprecationWarning, stacklevel=1)
  data = pickled_ndarray(hostile_files.array_bytes(np.zeros(1, np.float32)))
  with pytest.raises(mxnet.FileError, match="DeprecationWarning 'a library"):
    _pickle.load_mxnet_pickle(data, warns)
  assert filters == [list(warnings.filters)]


def test_quoted_escapes_and_shortens():
  assert _records.quoted("a" * 60) == repr("a" * 60)
  assert _records.quoted("a" * 61) == repr("a" * 60) + "... (61 in all)"
  assert _records.quoted("\x1b[2J\n\u202e\udc80") == (
      "'\\x1b[2J\\n\\u202e\\udc80'")
  assert _records.quoted(b"\x1b") == "b'\\x1b'"


def test_pickled_attribute_values_are_quoted():
  fields = _records.RecordFields(_records.PickledObject(
      "mxnet.optimizer.optimizer.FTML", {"beta1": "\x1b[31m" * 20}))
  with pytest.raises(mxnet.FileError) as raised:
    fields.real("beta1")
  assert "'\\x1b[31m" in str(raised.value) and "(100 in all)" in str(
      raised.value)


def test_readers_say_which_reader_a_file_needs():
  example = pathlib.Path(_files.__file__).parent / "example"
  params = (example / "model.params").read_bytes()
  npz = (hostile_files.FIXTURES / "gluon2" / "model.params").read_bytes()
  for data in (params, npz):
    with pytest.raises(mxnet.FileError, match=r"looks like an MXNet parameters"
                       r" file, not a trainer-state file: use"
                       r" mxnet\.read_params"):
      mxnet.read_trainer_states(data)
  states = (example / "trainer.states").read_bytes()
  for protocol in (2, 5):
    with pytest.raises(mxnet.FileError, match=r"looks like an MXNet"
                       r" trainer-state file \(a pickle\), not a parameters"
                       r" file: use mxnet\.read_trainer_states"):
      mxnet.read_params(bytes([0x80, protocol]) + states[2:])
  with pytest.raises(mxnet.FileError, match="not an MXNet NDArray file"):
    mxnet.read_params(bytes([0x80, 6]) + states[2:])


def test_paths_that_are_not_regular_files_are_refused_without_blocking():
  # A reader that blocks on a FIFO never returns: the timeout catches it.
  returncode, results, _ = run_script("paths", timeout=60)
  assert returncode == 0, results
  outcomes = {(r["name"], r["reader"]): r for r in results}
  for (name, reader), result in outcomes.items():
    if name == "a symbolic link to a parameter file":
      assert result["outcome"] == ("read" if reader == "params"
                                   else "FileError"), result
      continue
    assert result["outcome"] == "FileError", result
    expected = ("its size is not the 0 bytes" if name == "a file of /proc"
                else "not a regular file")
    assert expected in result["message"], result
    assert result["seconds"] < 5, result


def test_a_file_is_read_once_to_the_size_fstat_gives(tmp_path):
  path = tmp_path / "model.params"
  path.write_bytes(named_params(["a"]))
  assert list(mxnet.read_params(path)) == ["a"]
  assert list(mxnet.read_params(str(path))) == ["a"]
  with pytest.raises(FileNotFoundError):
    mxnet.read_params(tmp_path / "missing")


NPY = hostile_files.npy(np.arange(3, dtype=np.float32))


def zip_parts(members):
  """The local records (header and data) and central entries of a zip of
  stored members, each ready to be damaged."""
  records, entries, offset = [], [], 0
  for name, data in members:
    records.append(hostile_files.local_header(name, data) + data)
    entries.append(hostile_files.central_entry(name, data, offset))
    offset += len(records[-1])
  return records, entries


def test_zips_written_by_python_numpy_and_mxnet_read(tmp_path):
  expected = np.arange(3, dtype=np.float32)
  ours = hostile_files.stored_zip([(b"a.npy", NPY)])
  np.testing.assert_array_equal(mxnet.read_params(ours)["a"], expected)
  python = hostile_files.npz([("a.npy", NPY)])
  np.testing.assert_array_equal(mxnet.read_params(python)["a"], expected)
  # NumPy writes zip64 sizes into each local header.
  np.savez(tmp_path / "a.npz", a=expected)
  np.testing.assert_array_equal(
      mxnet.read_params(tmp_path / "a.npz")["a"], expected)
  # MXNet 2 writes its sizes into a data descriptor after each member.
  mxnet2 = mxnet.read_params(hostile_files.FIXTURES / "gluon2" / "model.params")
  assert mxnet2["0.weight"].shape == (3, 1, 3, 3)


def test_zip_members_must_not_overlap():
  records, entries = zip_parts([(b"a.npy", NPY), (b"b.npy", NPY)])
  body = b"".join(records)
  # b's entry pointing at a's record: one byte range read twice.
  again = hostile_files.central_entry(b"a.npy", NPY, 0)
  with pytest.raises(mxnet.FileError, match=r"'a\.npy' at offset 0 overlaps"):
    mxnet.read_params(hostile_files.zip_archive(body, [entries[0], again]))
  with pytest.raises(mxnet.FileError, match="overlaps the one before"):
    mxnet.read_params(hostile_files.nested_member_npz())


def test_zip_member_names_are_unique():
  records, entries = zip_parts([(b"a.npy", NPY), (b"a.npy", NPY)])
  with pytest.raises(mxnet.FileError, match="duplicate names"):
    mxnet.read_params(hostile_files.zip_archive(b"".join(records), entries))


def test_zip_members_must_follow_each_other_without_gaps():
  records, entries = zip_parts([(b"a.npy", NPY), (b"b.npy", NPY)])
  gap = hostile_files.central_entry(b"b.npy", NPY, len(records[0]) + 1)
  body = records[0] + b"\0" + records[1]
  with pytest.raises(mxnet.FileError, match="leaves a gap"):
    mxnet.read_params(hostile_files.zip_archive(body, [entries[0], gap]))
  with pytest.raises(mxnet.FileError, match="1 bytes between the members"):
    mxnet.read_params(hostile_files.zip_archive(records[0] + b"\0",
                                                entries[:1]))


def test_zip_members_must_lie_before_the_central_directory():
  # Header and directory agree on one byte more than there is.
  record = hostile_files.local_header(b"a.npy", NPY + b"\0") + NPY
  longer = hostile_files.central_entry(b"a.npy", NPY + b"\0", 0)
  with pytest.raises(mxnet.FileError, match="runs past the members' end"):
    mxnet.read_params(hostile_files.zip_archive(record, [longer]))
  # A local header inside the central directory.
  entry = hostile_files.central_entry(b"a.npy", NPY, 0)
  header = hostile_files.local_header(b"a.npy", NPY)
  inside = hostile_files.central_entry(b"a.npy", NPY, len(header + NPY))
  with pytest.raises(mxnet.FileError, match="is past the members"):
    mxnet.read_params(hostile_files.zip_archive(header + NPY, [entry, inside]))


def zip64_extra(*values):
  return struct.pack("<HH", 1, 8 * len(values)) + struct.pack(
      f"<{len(values)}Q", *values)


def test_zip64_sizes_must_lie_within_the_file():
  wide = (0xFFFFFFFF, 0xFFFFFFFF)
  def archive(size):
    record = hostile_files.local_header(
        b"a.npy", NPY, sizes=wide, extra=zip64_extra(size, size)) + NPY
    entry = hostile_files.central_entry(
        b"a.npy", NPY, 0, sizes=wide, extra=zip64_extra(size, size))
    return hostile_files.zip_archive(record, [entry])
  np.testing.assert_array_equal(mxnet.read_params(archive(len(NPY)))["a"],
                                [0, 1, 2])
  with pytest.raises(mxnet.FileError, match="runs past the members' end"):
    mxnet.read_params(archive(2**62))
  with pytest.raises(mxnet.FileError, match="without its zip64 value"):
    mxnet.read_params(hostile_files.zip_archive(
        hostile_files.local_header(b"a.npy", NPY) + NPY,
        [hostile_files.central_entry(b"a.npy", NPY, 0, sizes=wide)]))


@pytest.mark.parametrize("flags, message", [
    (0x0001, "is encrypted"), (0x0041, "is encrypted"),
    (0x0002, "unsupported flags 0x0002"), (0x2000, "unsupported flags")])
def test_zip_members_are_neither_encrypted_nor_flagged(flags, message):
  record = hostile_files.local_header(b"a.npy", NPY, flags=flags) + NPY
  entry = hostile_files.central_entry(b"a.npy", NPY, 0, flags=flags)
  with pytest.raises(mxnet.FileError, match=message):
    mxnet.read_params(hostile_files.zip_archive(record, [entry]))


@pytest.mark.parametrize("damage, message", [
    ("name", "local header at offset 0 disagrees"),
    ("method", "local header at offset 0 disagrees"),
    ("flags", "local header at offset 0 disagrees"),
    ("crc", "local header declares sizes 140 and 140 and CRC 1"),
    ("size", "local header declares sizes 139 and 139")])
def test_local_headers_must_agree_with_the_central_directory(damage, message):
  local = {"name": {"name": b"b.npy"}, "method": {"method": 8},
           "flags": {"flags": 0x0800}, "crc": {"crc": 1},
           "size": {"sizes": (len(NPY) - 1, len(NPY) - 1)}}[damage]
  name = local.pop("name", b"a.npy")
  record = hostile_files.local_header(name, NPY, **local) + NPY
  entry = hostile_files.central_entry(b"a.npy", NPY, 0)
  with pytest.raises(mxnet.FileError, match=message):
    mxnet.read_params(hostile_files.zip_archive(record, [entry]))


def test_data_descriptors_must_agree_with_the_central_directory():
  crc = zlib.crc32(NPY)
  def archive(descriptor):
    record = hostile_files.local_header(b"a.npy", NPY, flags=0x08, crc=0,
                                        sizes=(0, 0)) + NPY + descriptor
    entry = hostile_files.central_entry(b"a.npy", NPY, 0, flags=0x08)
    return hostile_files.zip_archive(record, [entry])
  sizes = struct.pack("<III", crc, len(NPY), len(NPY))
  for descriptor in (sizes, b"PK\x07\x08" + sizes):
    assert list(mxnet.read_params(archive(descriptor))) == ["a"]
  with pytest.raises(mxnet.FileError, match="data descriptor disagrees"):
    mxnet.read_params(archive(struct.pack("<III", crc, len(NPY) + 1,
                                          len(NPY))))


def test_zip_members_must_match_their_crc():
  damaged = NPY[:-1] + b"\x01"
  record = hostile_files.local_header(b"a.npy", damaged, crc=zlib.crc32(NPY))
  entry = hostile_files.central_entry(b"a.npy", damaged, 0,
                                      crc=zlib.crc32(NPY))
  with pytest.raises(mxnet.FileError, match="fails its CRC"):
    mxnet.read_params(hostile_files.zip_archive(record + damaged, [entry]))


def test_the_central_directory_must_fill_the_space_the_end_record_gives():
  records, entries = zip_parts([(b"a.npy", NPY)])
  good = hostile_files.zip_archive(records[0], entries)
  assert list(mxnet.read_params(good)) == ["a"]
  end = len(good) - 22
  for field, delta in ((12, 1), (12, -1), (16, 1), (10, 1)):  # size, offset
    damaged = bytearray(good)
    width = 2 if field == 10 else 4
    value = int.from_bytes(good[end + field:end + field + width], "little")
    damaged[end + field:end + field + width] = (value + delta).to_bytes(
        width, "little")
    if field == 10:  # both entry counts
      damaged[end + 8:end + 10] = damaged[end + 10:end + 12]
    with pytest.raises(mxnet.FileError, match="central directory"):
      mxnet.read_params(bytes(damaged))
  with pytest.raises(mxnet.FileError, match="no archive comment"):
    mxnet.read_params(hostile_files.zip_archive(records[0], entries,
                                                comment=b"x"))
  # An end record declaring a comment the file does not hold.
  with pytest.raises(mxnet.FileError, match="no archive comment"):
    mxnet.read_params(good[:-2] + b"\x01\x00")
  with pytest.raises(mxnet.FileError, match="multi-disk"):
    mxnet.read_params(good[:end + 8] + b"\x00\x00" + good[end + 10:])


def test_a_zip64_end_record_is_read_and_checked():
  records, entries = zip_parts([(b"a.npy", NPY)])
  directory = b"".join(entries)
  def archive(record_at, record_size=44, disks=1):
    record64 = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", record_size, 45, 45,
                           0, 0, 1, 1, len(directory), len(records[0]))
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, record_at, disks)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF,
                      0xFFFFFFFF, 0xFFFFFFFF, 0)
    return records[0] + directory + record64 + locator + end
  at = len(records[0]) + len(directory)
  assert list(mxnet.read_params(archive(at))) == ["a"]
  for damaged in (archive(at + 1), archive(at, record_size=45),
                  archive(at, disks=2)):
    with pytest.raises(mxnet.FileError, match="zip64 end record is missing or"):
      mxnet.read_params(damaged)


@pytest.mark.parametrize("opcodes, message", [
    (b"s", "stack underflow"), (b"}(s", "stack underflow"),
    (b"}K\x00(K\x01s", "stack underflow"),  # the key lies below the mark
    (b"]\x94h\x00a", "contains itself"),
    (b"}K\x00u", "no mark on the stack"),
    (b"}(K\x00u", "SETITEMS needs a dict and pairs"),
    (b"K\x00(K\x00e", "APPENDS needs a list"), (b"\x94", "nothing to memoise"),
    (b"h\x00", "memo index 0 never set"), (b"}}", "does not end with one"),
    (b"}(", "does not end with one"), (b"K\x00)R", "REDUCE of a int"),
    (b"\x8c\x08builtins\x8c\tbytearray\x93\x85", "bare reference to builtins"),
    (b"\x8c\x07_codecs\x8c\x06encode\x93\x8c\x02\xc4\x81\x8c\x06latin1\x86R",
     "bytes beyond latin-1"),
    (b"\x8c\x19mxnet.optimizer.optimizer\x8c\x04FTML\x93)\x81]b",
     "has state list, expected a dict"),
    (b"\x8c\x19mxnet.optimizer.optimizer\x8c\x04FTML\x93)\x81}K\x00K\x00sb",
     "has state dict, expected a dict of attributes"),
    (b"\x8c\x19mxnet.optimizer.optimizer\x8c\x04FTML\x93)\x81",
     "FTML without its state"),
])
def test_the_stack_machine_refuses_what_does_not_fit(opcodes, message):
  with pytest.raises(mxnet.FileError, match=message):
    _pickle.load_mxnet_pickle(hostile_files.PROTO4 + opcodes + b".",
                              lambda handle: None)


def test_objects_nest_at_most_32_levels():
  def nested(levels):  # a dict holding tuples: levels containers in all
    return hostile_files.PROTO4 + b"}K\x00)" + b"\x85" * (levels - 2) + b"s."
  value = mxnet.read_trainer_states(nested(32)).states[0]
  for _ in range(30):
    (value,) = value
  assert value == ()
  with pytest.raises(mxnet.FileError, match="nested deeper than 32"):
    mxnet.read_trainer_states(nested(33))


def test_zip_directory_entries_must_parse_exactly():
  record = hostile_files.local_header(b"a.npy", NPY) + NPY
  def archive(**entry):
    return hostile_files.zip_archive(
        record, [hostile_files.central_entry(b"a.npy", NPY, 0, **entry)])
  with pytest.raises(mxnet.FileError, match="an extra field runs past"):
    mxnet.read_params(archive(extra=struct.pack("<HH", 9, 4) + b"ab"))
  assert list(mxnet.read_params(archive(extra=struct.pack("<HH", 9, 2)
                                        + b"ab"))) == ["a"]
  with pytest.raises(mxnet.FileError, match="declares 139 bytes stored for 140"):
    mxnet.read_params(archive(sizes=(len(NPY) - 1, len(NPY))))
  entry = hostile_files.central_entry(b"a.npy", NPY, 0)
  with pytest.raises(mxnet.FileError, match="holds more than its entries"):
    mxnet.read_params(hostile_files.zip_archive(record, [entry, b"\0"])[:-22]
                      + hostile_files.end_record(1, len(entry) + 1,
                                                 len(record)))
  bad_name = hostile_files.central_entry(b"\xff.npy", NPY, 0, flags=0x0800)
  with pytest.raises(mxnet.FileError, match=r"name b'\\xff\.npy' is not UTF-8"):
    mxnet.read_params(hostile_files.zip_archive(record, [bad_name]))


def test_zip_directory_and_headers_must_lie_where_they_say():
  record = hostile_files.local_header(b"a.npy", NPY) + NPY
  entry = hostile_files.central_entry(b"a.npy", NPY, 0)
  # Room for two entries by count, but the second would end past the end.
  short = entry + bytes(hostile_files.central_entry(b"", b"", 0).__len__() - 1)
  with pytest.raises(mxnet.FileError, match="ends inside an entry"):
    mxnet.read_params(record + short + hostile_files.end_record(
        2, len(short), len(record)))
  with pytest.raises(mxnet.FileError,
                     match=f"entry at offset {len(record)} is malformed"):
    mxnet.read_params(hostile_files.zip_archive(
        record, [b"PK\x01\x03" + entry[4:]]))
  with pytest.raises(mxnet.FileError, match="starts on disk 1"):
    mxnet.read_params(hostile_files.zip_archive(
        record, [entry[:34] + b"\x01\x00" + entry[36:]]))
  records, entries = zip_parts([(b"a.npy", NPY), (b"b.npy", NPY)])
  with pytest.raises(mxnet.FileError, match=f"offset {len(record)} disagrees"):
    mxnet.read_params(hostile_files.zip_archive(
        records[0] + b"PK\x03\x05" + records[1][4:], entries))
  # A local header whose name runs past the members.
  long_name = record[:26] + struct.pack("<H", 500) + record[28:]
  with pytest.raises(mxnet.FileError, match="offset 0 disagrees"):
    mxnet.read_params(hostile_files.zip_archive(long_name, [entry]))
  with pytest.raises(mxnet.FileError, match="zip64 end record is missing"):
    mxnet.read_params(hostile_files.end_record(0xFFFF, 0xFFFFFFFF, 0))
  # 65,535 entries fit the end record (zip64 records optional), not 0 bytes.
  with pytest.raises(mxnet.FileError, match="65535 entries, 0 bytes"):
    mxnet.read_params(hostile_files.end_record(0xFFFF, 0, 0))


def test_zip64_data_descriptors_have_8_byte_sizes():
  crc, wide = zlib.crc32(NPY), (0xFFFFFFFF, 0xFFFFFFFF)
  def archive(descriptor):
    record = hostile_files.local_header(
        b"a.npy", NPY, flags=0x08, crc=0, sizes=wide,
        extra=zip64_extra(0, 0)) + NPY + descriptor
    entry = hostile_files.central_entry(b"a.npy", NPY, 0, flags=0x08)
    return hostile_files.zip_archive(record, [entry])
  wide_sizes = struct.pack("<IQQ", crc, len(NPY), len(NPY))
  assert list(mxnet.read_params(archive(b"PK\x07\x08" + wide_sizes))) == ["a"]
  narrow = struct.pack("<III", crc, len(NPY), len(NPY))
  with pytest.raises(mxnet.FileError, match="data descriptor disagrees"):
    mxnet.read_params(archive(b"PK\x07\x08" + narrow))


@pytest.mark.parametrize("size_change", [-1, 1])
def test_a_file_whose_size_is_not_what_fstat_says_is_refused(
    tmp_path, monkeypatch, size_change):
  path = tmp_path / "model.params"
  path.write_bytes(named_params(["a"]))
  real_fstat = os.fstat
  def fstat(fd):
    info = list(real_fstat(fd))
    info[stat.ST_SIZE] += size_change
    return os.stat_result(info)
  monkeypatch.setattr(os, "fstat", fstat)
  size = len(named_params(["a"])) + size_change
  with pytest.raises(mxnet.FileError, match=f"its size is not the {size} bytes"):
    mxnet.read_params(path)


def test_messages_show_at_most_8_dims():
  with pytest.raises(mxnet.FileError,
                     match=r"dims \(1, 1, 1, 1, 1, 1, 1, -1\), a negative"):
    mxnet.read_params(hostile_files.params_file((1,) * 7 + (-1,)))
  with pytest.raises(mxnet.FileError, match=r"dims \(1, 1, 1, 1, 1, 1, 1, 1,"
                     r" \.\.\.: 9 dims\), a negative"):
    mxnet.read_params(hostile_files.params_file((1,) * 8 + (-1,)))
