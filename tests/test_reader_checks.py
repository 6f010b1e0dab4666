"""One test per check of the MXNet file readers, each failing without its
check or with its bound moved by one (tests/mutate_readers.py runs them
against such changes): files built here byte by byte."""

import functools
import io
import math
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from optax_ftml import mxnet

try:
  from optax_ftml.mxnet._records import RecordFields
except ImportError:  # before the records had their own module
  from optax_ftml.mxnet._pickle import RecordFields  # pyright: ignore

P4 = b"\x80\x04"
FTML = b"\x8c\x19mxnet.optimizer.optimizer\x8c\x04FTML\x93"
NDARRAY = b"\x8c\x15mxnet.ndarray.ndarray\x8c\x07NDArray\x93"
V1, V2, V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
# mshadow's type flags (include/mshadow/base.h: kFloat32 = 0 ... kBfloat16 = 12).
MSHADOW_FLAGS = {
    0: "float32", 1: "float64", 2: "float16", 3: "uint8", 4: "int32",
    5: "int8", 6: "int64", 7: "bool", 8: "int16", 9: "uint16", 10: "uint32",
    11: "uint64", 12: "bfloat16"}


def states(*opcodes: bytes) -> bytes:
  """A protocol 4 pickle of ``{0: <what the opcodes push>}``."""
  return P4 + b"}K\x00" + b"".join(opcodes) + b"s."


def read_states(data: bytes):
  return mxnet.read_trainer_states(data).states


def refused(data: bytes, match: str | None = None, reader=None):
  with pytest.raises(mxnet.FileError, match=match):
    (reader or mxnet.read_trainer_states)(data)


# --- Opcodes and protocols ---------------------------------------------------

def test_only_protocols_2_to_4_read():
  for protocol in (2, 3, 4):
    assert read_states(bytes([0x80, protocol]) + b"}.") == {}
  for protocol in (0, 1, 5):
    refused(bytes([0x80, protocol]) + b"}.", "protocol 2 to 4")
  refused(b"}.", "protocol 2 to 4")  # no PROTO at all


@pytest.mark.parametrize("opcode", [
    pytest.param(b"\x8b\x01\x00\x00\x00\x01", id="LONG4"),
    pytest.param(b"\x8f", id="EMPTY_SET"),
    pytest.param(b"\x91", id="FROZENSET"),
    pytest.param(b"(\x90", id="ADDITEMS"),
    pytest.param(b"I1\n", id="INT"),
    pytest.param(b"F1.0\n", id="FLOAT"),
    pytest.param(b"S'a'\n", id="STRING"),
    pytest.param(b"Va\n", id="UNICODE"),
    pytest.param(b"U\x01a", id="SHORT_BINSTRING"),
    pytest.param(b"(l", id="LIST"),
    pytest.param(b"(d", id="DICT"),
    pytest.param(b"\x82\x01", id="EXT1"),
    pytest.param(b"\x96\x00\x00\x00\x00\x00\x00\x00\x00", id="BYTEARRAY8"),
])
def test_opcodes_mxnet_never_writes_are_refused(opcode):
  refused(states(opcode), "opcode")


def test_a_pickle_must_end_with_one_object_and_no_open_mark():
  assert read_states(states(b"]")) == {0: []}
  refused(P4 + b"}(.", "one object")  # an open MARK above the dict
  refused(P4 + b"}]." , "one object")  # two objects
  refused(P4 + b"}K\x00]s", "truncated")  # no STOP
  refused(states(b"]") + b"N", "after the pickle's end")


def test_marks_bound_what_pops_can_reach():
  refused(P4 + b"}K\x00(s.", "underflow")  # SETITEM below the mark
  refused(P4 + b"]e.", "no mark")  # APPENDS without MARK
  assert read_states(P4 + b"}(K\x00]K\x01]u.") == {0: [], 1: []}


def test_memo_indices_come_in_order_and_are_set_before_use():
  assert read_states(P4 + b"}q\x00K\x00]q\x01s.") == {0: []}
  refused(P4 + b"}q\x00K\x00]q\x00s.", "out of order")  # index 0 again
  refused(P4 + b"}q\x01.", "out of order")  # skipping index 0
  refused(P4 + b"}K\x00h\x00s.")  # a GET of what is being built: itself
  refused(P4 + b"}K\x00h\x01s.", "never set")


def test_integers_are_at_most_64_bits():
  eight = (2**63 - 1).to_bytes(8, "little", signed=True)
  assert read_states(states(b"\x8a\x08" + eight)) == {0: 2**63 - 1}
  refused(states(b"\x8a\x09" + b"\x01" * 9), "64 bits")


def test_dict_keys_are_integers_or_strings():
  assert read_states(states(b"}\x8c\x01aK\x01s")) == {0: {"a": 1}}
  refused(P4 + b"}K\x00}\x88K\x01ss.", "key of type bool")
  refused(P4 + b"}K\x00}NK\x01ss.", "key of type NoneType")
  refused(P4 + b"}\x8c\x01aK\x01s.", "integer indices")  # the states' keys


# --- Records -----------------------------------------------------------------

def test_a_record_state_is_a_dict_of_string_attribute_names():
  record = read_states(states(FTML, b")\x81}\x8c\x01aK\x01sb"))[0]
  assert record.class_name == "FTML" and record.attributes == {"a": 1}
  refused(states(FTML, b")\x81}K\x01K\x01sb"), "dict of attributes")
  refused(states(FTML, b")\x81]b"), "dict of attributes")
  refused(states(FTML, b")\x81"), "without its state")


def encoded_copies(copies: int, text_length: int, padding: int = 0) -> bytes:
  """``copies`` bytes made by ``_codecs.encode`` from one memoised string,
  in a tuple after ``padding`` characters of an unrelated string."""
  encode = b"\x8c\x07_codecs\x8c\x06encode\x93\x94"  # memo 0
  text = b"X" + struct.pack("<I", text_length) + b"x" * text_length + b"\x94"
  latin1 = b"\x8c\x06latin1\x94\x86\x94"  # memo 1, 2 (the arguments: 3)
  calls = encode + text + latin1 + b"R" + b"h\x00h\x03R" * (copies - 1)
  pad = b"X" + struct.pack("<I", padding) + b"p" * padding
  return states(b"(", pad, calls, b"t")


def test_bytes_derived_from_text_are_charged_to_the_budget():
  length = 10_000
  assert read_states(encoded_copies(3, length))[0][1:] == (b"x" * length,) * 3
  refused(encoded_copies(100, length), "budget")


def ndarray_copies(copies: int) -> bytes:
  """``copies`` NDArrays decoded from one memoised handle."""
  handle = array_record((64,))
  first = (NDARRAY + b"\x94N\x85R}\x8c\x06handleB" + struct.pack("<I", len(handle))
           + handle + b"\x94sb")  # memo 0, 1: the class and the handle
  again = b"h\x00N\x85R}\x8c\x06handleh\x01sb"
  return states(b"(", first, again * (copies - 1), b"t")


def test_array_data_decoded_is_charged_to_the_budget():
  (array,) = read_states(ndarray_copies(1))[0]
  assert array.shape == (64,)
  refused(ndarray_copies(200), "more than once|budget")


def test_only_bytes_are_copied_by_bytearray_and_encode():
  assert read_states(pickle.dumps({0: bytearray(b"ab")}, 2)) == {0: b"ab"}
  refused(states(b"\x8c\x08builtins\x8c\tbytearray\x93K\x01\x85R"), "bytearray of int")
  refused(states(b"\x8c\x07_codecs\x8c\x06encode\x93\x8c\x01a\x8c\x05ascii\x86R"))
  refused(states(b"\x8c\x07_codecs\x8c\x06encode\x93\x8c\x02\xc4\x80"
                 b"\x8c\x06latin1\x86R"), "latin-1")


# --- Bounds ------------------------------------------------------------------

def nested_lists(depth: int) -> bytes:
  return states(b"]" * depth + b"a" * (depth - 1))


def test_objects_nest_at_most_32_deep():
  # The states dict is the first level, so 31 lists inside it are 32 levels.
  value = read_states(nested_lists(31))[0]
  for _ in range(30):
    value = value[0]
  assert value == []
  refused(nested_lists(32), "deeper than 32")


def fanned_out(width: int) -> bytes:
  """{0: T2}, T2 a tuple of ``width`` references to T1, T1 of ``width``
  references to one empty list: about ``width**2`` elements as a tree."""
  first = b"(" + b"]\x94" + b"h\x00" * (width - 1) + b"t\x94"  # memo 0, 1
  return P4 + b"}K\x00" + b"(" + first + b"h\x01" * (width - 1) + b"t" + b"s."


def test_shared_references_are_charged_at_every_occurrence():
  tree = read_states(fanned_out(10))[0]
  assert len(tree) == 10 and tree[0] is tree[9] and len(tree[0]) == 10
  refused(fanned_out(200), "budget")


# The reader's documented costs, in bytes (optax_ftml/mxnet/_pickle.py's
# docstring); a file's budget is 32 per byte of it plus 4096.
DICT, NUMBER, OBJECT, RECORD, REFERENCE, DICT_ITEM, SHARED = (
    232, 32, 64, 128, 8, 48, 128)
PER_TEXT_BYTE, PER_BYTE, PER_CHARACTER = 4, 1, 10  # argument; result
PER_ARRAY_BYTE, PER_ARRAY_DIMENSION = 8, 4  # the result: its bytes, brackets
BUDGET_PER_BYTE, BUDGET_BASE = 32, 4096
FTML_CLASS = (OBJECT + PER_TEXT_BYTE * 25 + REFERENCE  # the module's name
              + OBJECT + PER_TEXT_BYTE * 4 + REFERENCE  # the class's
              + OBJECT + REFERENCE)  # the global

# A (2, 3) float32 array in NDArray::Save's format.
HANDLE = (struct.pack("<IIi2q", 0xF993FAC9, 0, 2, 2, 3) + struct.pack("<iii", 1, 0, 0)
          + bytes(24))

# Elements of a list: their bytes and their cost (reading them, the list's
# reference to them, and the result as a tree).
ELEMENTS = {
    "empty list": (b"]", OBJECT + REFERENCE + REFERENCE + REFERENCE),
    "shared list": (b"]\x94h\x00",  # first: memo index 0
                    OBJECT + REFERENCE + REFERENCE + SHARED + REFERENCE
                    + 2 * REFERENCE + 2 * REFERENCE),
    "record": (FTML + b")\x81}b",
               FTML_CLASS + REFERENCE + OBJECT + REFERENCE  # () and NEWOBJ
               + DICT + REFERENCE + RECORD  # its state, the record made
               + REFERENCE + RECORD + REFERENCE),  # the list's, the tree's
    "array": (NDARRAY + b"N\x85R}\x8c\x06handleC" + bytes([len(HANDLE)]) + HANDLE
              + b"sb",
              OBJECT + PER_TEXT_BYTE * 21 + REFERENCE  # the class: module,
              + OBJECT + PER_TEXT_BYTE * 7 + REFERENCE  # name,
              + OBJECT + REFERENCE  # global
              + REFERENCE + OBJECT + REFERENCE + REFERENCE  # (None,)
              + OBJECT + REFERENCE  # REDUCE
              + DICT + REFERENCE + OBJECT + PER_TEXT_BYTE * 6 + REFERENCE
              + OBJECT + PER_BYTE * len(HANDLE) + REFERENCE + DICT_ITEM
              + OBJECT + len(HANDLE)  # the decoded array
              + REFERENCE  # the list's reference
              + OBJECT + PER_ARRAY_BYTE * 24 + PER_ARRAY_DIMENSION * 2 * 6),
    "encoded bytes": (b"\x8c\x07_codecs\x8c\x06encode\x93\x8c\x05abcde"
                      b"\x8c\x06latin1\x86R",
                      OBJECT + PER_TEXT_BYTE * 7 + REFERENCE  # the class
                      + OBJECT + PER_TEXT_BYTE * 6 + REFERENCE
                      + OBJECT + REFERENCE
                      + OBJECT + PER_TEXT_BYTE * 5 + REFERENCE  # the text
                      + OBJECT + PER_TEXT_BYTE * 6 + REFERENCE  # "latin1"
                      + OBJECT + 2 * REFERENCE + REFERENCE  # the arguments
                      + OBJECT + PER_BYTE * 5 + REFERENCE  # the bytes made
                      + REFERENCE + REFERENCE + PER_TEXT_BYTE * 5),
    "non-ASCII text": (b"\x8c\x06" + "\u00e9\u00e9\u00e9".encode(),
                       OBJECT + PER_TEXT_BYTE * 6 + REFERENCE + REFERENCE
                       + REFERENCE + PER_CHARACTER * 3),
}


def ascii_text(length):
  return (b"\x8c" + bytes([length]) + b"x" * length,
          OBJECT + PER_TEXT_BYTE * length + REFERENCE * 2 + REFERENCE
          + PER_TEXT_BYTE * length)


def raw_bytes(length):
  return (b"C" + bytes([length]) + b"\0" * length,
          OBJECT + PER_BYTE * length + REFERENCE * 2 + REFERENCE
          + PER_TEXT_BYTE * length)


def list_file(extra: str, lists: int, text: int, raw: int) -> tuple[bytes, int]:
  """``{0: [extra, [] * lists, "x" * text, b"\\0" * raw]}`` and its cost."""
  parts = [ELEMENTS[extra], *[ELEMENTS["empty list"]] * lists,
           ascii_text(text), raw_bytes(raw)]
  data = P4 + b"}K\x00](" + b"".join(d for d, _ in parts) + b"es."
  cost = (DICT + REFERENCE + NUMBER + REFERENCE + OBJECT + REFERENCE  # {0: [
          + REFERENCE + DICT_ITEM  # MARK, SETITEM
          + REFERENCE + NUMBER + REFERENCE  # the tree: {0: [
          + sum(c for _, c in parts))
  return data, cost


def at_budget(extra: str, slack: int) -> bytes:
  """A list file whose budget exceeds its cost by exactly ``slack``."""
  for text in range(100):
    for raw in range(100):
      data, cost = list_file(extra, 0, text, raw)
      left = BUDGET_PER_BYTE * len(data) + BUDGET_BASE - cost - slack
      per_list = ELEMENTS["empty list"][1] - BUDGET_PER_BYTE  # > 0
      if left >= 0 and left % per_list == 0:
        data, cost = list_file(extra, left // per_list, text, raw)
        assert BUDGET_PER_BYTE * len(data) + BUDGET_BASE - cost == slack
        return data
  raise AssertionError("no such file")


@pytest.mark.parametrize("extra", list(ELEMENTS))
def test_a_file_may_cost_exactly_its_budget_and_not_a_byte_more(extra):
  """The budget is 32 bytes per byte of the file plus 4096, and each object
  costs what the reader documents: a file costing exactly its budget reads,
  one costing a byte more does not."""
  assert read_states(at_budget(extra, 0))[0]
  refused(at_budget(extra, -1), "budget")


def test_numbers_of_every_width():
  data = states(b"(", b"K\xff", b"M\xff\xff", b"J\xff\xff\xff\xff",
                b"\x8a\x02\x00\x80", b"G\x3f\xf8\x00\x00\x00\x00\x00\x00",
                b"\x88\x89N", b"t")
  assert read_states(data)[0] == (255, 65535, -1, -32768, 1.5, True, False, None)


def test_the_stack_machine_refuses_what_does_not_fit():
  refused(b"}\x04}.", "protocol 2 to 4")  # the first opcode is not PROTO
  refused(states(b"](K\x00K\x01u"), "SETITEMS needs a dict")
  refused(P4 + b"}(K\x00u.", "SETITEMS needs a dict and pairs")
  refused(states(b"}(]e"), "APPENDS needs a list")
  refused(states(b"K\x01)R"), "REDUCE of a int")
  refused(states(b"K\x01)\x81"), "NEWOBJ of a int")
  refused(states(FTML, b"]R"), "REDUCE of a _Global")
  refused(P4 + b"\x94}.", "nothing to memoise")
  refused(states(FTML), "bare reference")
  refused(P4 + b"K\x00(\x85.", "underflow")  # TUPLE1 of nothing above a mark
  refused(P4 + b"K\x00(K\x01(\x85.", "underflow")  # above the last mark
  refused(P4 + b"\x85.", "underflow")  # no mark, nothing on the stack
  refused(states(b"\x8c\x07_codecs\x8c\x06encode\x93C\x02ab\x8c\x06latin1"
                 b"\x86R"), "encode of bytes, str")


def test_an_argument_may_end_where_the_file_ends():
  """Then the file lacks STOP: the argument is read, the next opcode is not."""
  refused(P4 + b"}K\x00\x8c\x03abc", "an opcode needs 1 bytes")
  refused(P4 + b"}K\x00\x8c\x04abc", "declares 4 bytes")


def test_an_object_containing_itself_is_refused():
  refused(P4 + b"}K\x00]\x94h\x00as.", "contains itself")


# --- Arrays ------------------------------------------------------------------

def array_record(shape, flag=0, magic=V2, data=None, ndim=None):
  dtype = np.dtype(ml_dtypes.bfloat16 if flag == 12 else MSHADOW_FLAGS[flag])
  data = bytes(math.prod(shape) * dtype.itemsize) if data is None else data
  return (struct.pack("<IIi", magic, 0, len(shape) if ndim is None else ndim)
          + struct.pack(f"<{len(shape)}q", *shape) + struct.pack("<iii", 1, 0, flag)
          + data)


def params(*records: bytes) -> bytes:
  return (struct.pack("<QQQ", 0x112, 0, len(records)) + b"".join(records)
          + struct.pack("<Q", 0))


@pytest.mark.parametrize("flag", sorted(MSHADOW_FLAGS))
def test_dtype_flags_are_mshadows(flag):
  expected = (np.dtype(ml_dtypes.bfloat16) if flag == 12
              else np.dtype(MSHADOW_FLAGS[flag]))
  values = np.arange(3).astype(expected)
  (array,) = mxnet.read_params(params(array_record((3,), flag,
                                                   data=values.tobytes())))
  assert array.dtype == expected
  assert array.tobytes() == values.tobytes()


def test_unknown_dtype_flags_are_refused():
  for flag in (-1, 13):
    data = params(array_record((1,), 0)).replace(
        struct.pack("<iii", 1, 0, 0), struct.pack("<iii", 1, 0, flag))
    refused(data, "dtype flag", mxnet.read_params)


def test_array_magics():
  (v2,) = mxnet.read_params(params(array_record((2,), magic=V2)))
  (v3,) = mxnet.read_params(params(array_record((2,), magic=V3)))
  assert v2.shape == v3.shape == (2,)
  refused(params(array_record((2,), magic=V1)), "legacy", mxnet.read_params)
  refused(params(array_record((2,), magic=V3 + 1)), "magic", mxnet.read_params)


def test_no_dims_are_an_unset_array_in_2x_and_a_scalar_under_numpy_shapes():
  (scalar,) = mxnet.read_params(params(array_record((), magic=V3)))
  assert scalar.shape == () and scalar.dtype == np.float32
  refused(params(array_record((), magic=V2)), "unset", mxnet.read_params)
  unset_v3 = params(array_record((), magic=V3, ndim=-1))
  refused(unset_v3, "unset", mxnet.read_params)


def test_array_data_is_exactly_what_its_shape_needs():
  assert mxnet.read_params(params(array_record((2, 3))))[0].shape == (2, 3)
  short = params(array_record((2, 3), data=bytes(23)))
  refused(short, "corrupted", mxnet.read_params)
  refused(params(array_record((2, 3), data=bytes(25))), "corrupted",
          mxnet.read_params)


def test_sparse_storage_is_refused():
  for storage, name in ((1, "row_sparse"), (2, "csr"), (3, "storage type 3")):
    data = params(array_record((2,))).replace(
        struct.pack("<IIi", V2, 0, 1), struct.pack("<IiI", V2, storage, 1))
    refused(data, name, mxnet.read_params)


def test_shapes_numpy_can_hold():
  (empty,) = mxnet.read_params(params(array_record((0, 5))))
  assert empty.shape == (0, 5)
  refused(params(array_record((-1, 2), data=b"")), "negative",
          mxnet.read_params)
  refused(params(array_record((2**31, 2**31, 2**2), data=b"")), "too many",
          mxnet.read_params)
  refused(params(array_record((1,) * 65)), "ndim 65", mxnet.read_params)
  (many,) = mxnet.read_params(params(array_record((1,) * 64)))
  assert many.ndim == 64


def test_elements_below_2_to_the_59():
  """Any dtype's bytes (at most 16 an element) must fit NumPy's int64 sizes:
  fewer than 2**63 // 16 elements, empty dims aside."""
  refused(params(array_record((2**59,), data=b"")), "too many elements",
          mxnet.read_params)
  refused(params(array_record((0, 2**59), data=b"")), "too many elements",
          mxnet.read_params)
  refused(params(array_record((2**59 - 1,), data=b"")), "needs", mxnet.read_params)


def test_counts_and_ndims_are_bounded_by_the_bytes_left():
  """Before anything is allocated: 24 bytes at least per array, 8 per dim."""
  arrays = struct.pack("<QQ", 0x112, 0) + struct.pack("<Q", 4) + bytes(119)
  refused(arrays, "starts with 0x00000000", mxnet.read_params)  # 4 fit
  refused(arrays.replace(struct.pack("<Q", 4), struct.pack("<Q", 5), 1),
          "5 arrays cannot fit", mxnet.read_params)
  ten_dims = (struct.pack("<QQQ", 0x112, 0, 1) + struct.pack("<IIi", V2, 0, 10)
              + bytes(75))
  refused(ten_dims, "has ndim 10", mxnet.read_params)
  refused(ten_dims + bytes(5), "truncated", mxnet.read_params)


def test_a_path_is_read_to_the_size_it_declares():
  refused("/proc/self/status", "its size is not the 0 bytes", mxnet.read_params)


def test_a_pickled_ndarray_is_one_array():
  handle = b"\0" * 24
  data = states(NDARRAY, b"N\x85R}\x8c\x06handleC", bytes([len(handle)]), handle,
                b"sb")
  refused(data, "array 0 starts with", mxnet.read_trainer_states)


def test_a_list_file_has_no_names_or_one_per_array():
  one = params(array_record((1,)))
  assert len(mxnet.read_params(one)) == 1
  named = one[:-8] + struct.pack("<QQ", 1, 1) + b"w"
  assert list(mxnet.read_params(named)) == ["w"]
  refused(one[:-8] + struct.pack("<QQ", 1, 1) + b"\xff", "UTF-8",
          mxnet.read_params)


# --- NumPy archives ------------------------------------------------------------

def npz(**members: bytes) -> bytes:
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    for name, data in members.items():
      archive.writestr(name + ".npy", data)
  return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def test_npy_data_is_exactly_what_its_shape_needs():
  member = npy(np.arange(6, dtype=np.float32).reshape(2, 3))
  assert mxnet.read_params(npz(w=member))["w"].shape == (2, 3)
  refused(npz(w=member + b"\0"), "bytes of data", mxnet.read_params)
  refused(npz(w=member[:-1]), "bytes of data", mxnet.read_params)


def test_npy_shapes_numpy_can_hold():
  header = npy(np.zeros(1, np.uint8))
  huge = header.replace(b"(1,)", b"(4611686018427387904, 4)", 1)
  refused(npz(w=huge), "too many elements", mxnet.read_params)


def npy_with_header(length: int) -> bytes:
  """A version 1.0 ``.npy`` of the uint8 values 1 and 2 whose header (the
  text after its length field) is ``length`` bytes."""
  header = "{'descr': '|u1', 'fortran_order': False, 'shape': (2,), }"
  return (b"\x93NUMPY\x01\x00" + struct.pack("<H", length)
          + (header.ljust(length - 1) + "\n").encode("latin1") + b"\x01\x02")


def test_npy_headers_are_at_most_10000_bytes():
  read = mxnet.read_params(npz(w=npy_with_header(10_000)))["w"]
  np.testing.assert_array_equal(read, np.array([1, 2], np.uint8))
  refused(npz(w=npy_with_header(10_001)), "not a NumPy array", mxnet.read_params)


def test_npz_names_are_distinct():
  member = npy(np.zeros(2, np.float32))
  buffer = io.BytesIO()
  with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(
      buffer, "w") as archive:
    archive.writestr("w.npy", member)
    archive.writestr("w.npy", member)
  refused(buffer.getvalue(), "duplicate names", mxnet.read_params)


def test_npy_fortran_order_is_honoured():
  values = np.arange(6, dtype=np.float32).reshape(2, 3)
  read = mxnet.read_params(npz(w=npy(np.asfortranarray(values))))["w"]
  np.testing.assert_array_equal(read, values)


def test_npy_dtypes_are_mxnets_little_endian_ones():
  assert mxnet.read_params(npz(w=npy(np.zeros(2, "<i2"))))["w"].dtype == np.int16
  refused(npz(w=npy(np.zeros(2, ">f4"))), "unsupported dtype", mxnet.read_params)
  refused(npz(w=npy(np.zeros(2, np.complex64))), "unsupported dtype",
          mxnet.read_params)


def test_npz_members_are_stored_npy_files_with_distinct_names():
  member = npy(np.zeros(2, np.float32))
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
    archive.writestr("w.npy", member)
  refused(buffer.getvalue(), "compressed", mxnet.read_params)
  refused(npz(**{"w": member, "v.txt": b""}).replace(b"v.txt.npy", b"v.txt.np_"),
          "other than .npy", mxnet.read_params)
  assert mxnet.read_params(npz()) == {}


# --- Record fields --------------------------------------------------------------

def fields(**attributes):
  return RecordFields(mxnet.PickledObject("mxnet.optimizer.optimizer.FTML",
                                          attributes))


def test_record_reals_are_finite_and_in_their_closed_range():
  f = fields(x=1.0, inf=math.inf, nan=math.nan, big=2**64, flag=True, s="1")
  assert f.real("x", 0.0, 1.0) == 1.0  # the upper bound is closed
  assert f.real("x", 1.0) == 1.0  # so is the lower, unless open
  with pytest.raises(mxnet.FileError, match="x"):
    f.real("x", 1.0, low_open=True)
  with pytest.raises(mxnet.FileError):
    f.real("x", 0.0, 0.5)
  for key in ("inf", "nan", "big", "flag", "s"):
    with pytest.raises(mxnet.FileError, match=key):
      f.real(key)
  with pytest.raises(mxnet.FileError, match="lacks the attribute"):
    f.real("missing")


def test_record_reals_below_2_to_the_64():
  f = fields(wide=2**63, wider=2**64)
  assert f.real("wide") == 2**63
  with pytest.raises(mxnet.FileError, match="is 9223372036854775808;"):
    f.count("wide")  # 64 bits: printed whole
  with pytest.raises(mxnet.FileError, match="is an integer of 65 bits"):
    f.real("wider")  # more: described


def test_record_counts_are_int32_and_types_exact():
  f = fields(n=2**31 - 1, big=2**31, negative=-1, flag=True, d={}, zero=0)
  assert f.count("n") == 2**31 - 1
  assert f.count("zero") == 0
  for key in ("big", "negative", "flag"):
    with pytest.raises(mxnet.FileError, match=key):
      f.count(key)
  assert f.count("negative", low=-1) == -1
  assert f.of_type("d", dict) == {}
  assert f.of_type("absent", dict, default=None) is None
  with pytest.raises(mxnet.FileError, match="a dict"):
    f.of_type("n", dict)


# --- The zip checks (MXNet 2's parameter files) ----------------------------------

class _Unseekable(io.RawIOBase):
  """A stream zipfile cannot seek back in: it writes data descriptors, as
  MXNet 2's ``save_parameters`` does."""

  def __init__(self):
    self.data = bytearray()

  def writable(self):
    return True

  def write(self, b):
    self.data += b
    return len(b)


def two_members(descriptors=False, zip64=False) -> bytes:
  members = {"a": npy(np.arange(3, dtype=np.float32)),
             "b": npy(np.ones((2, 2), np.int8))}
  stream = _Unseekable() if descriptors else io.BytesIO()
  with zipfile.ZipFile(stream, "w") as archive:
    for name, data in members.items():
      info = zipfile.ZipInfo(name + ".npy", (2020, 1, 1, 0, 0, 0))
      with archive.open(info, "w", force_zip64=zip64) as f:
        f.write(data)
  return bytes(stream.data) if descriptors else stream.getvalue()


def patched(data: bytes, where: str, offset: int, fmt: str, value: int,
            index: int = 0) -> bytes:
  """``data`` with a field of the ``index``-th local header ("local"), central
  directory entry ("central") or the end record ("end") replaced."""
  signature = {"local": b"PK\x03\x04", "central": b"PK\x01\x02",
               "end": b"PK\x05\x06"}[where]
  at = -1
  for _ in range(index + 1):
    at = data.index(signature, at + 1)
  out = bytearray(data)
  struct.pack_into(fmt, out, at + offset, value)
  return bytes(out)


def both_headers(data, offset_local, offset_central, fmt, value):
  data = patched(data, "local", offset_local, fmt, value)
  return patched(data, "central", offset_central, fmt, value)


def test_stored_members_with_data_descriptors_or_zip64_read():
  for data in (two_members(), two_members(descriptors=True),
               two_members(zip64=True)):
    arrays = mxnet.read_params(data)
    assert list(arrays) == ["a", "b"] and arrays["b"].dtype == np.int8


ZIP_DAMAGE = {
    "archive comment": (lambda d: d[:-2] + b"\x01\x00x",
                        "not the file's last 22 bytes"),
    "byte after the end record": (lambda d: d + b"\0", "last 22 bytes"),
    "zip64 end record missing": (
        lambda d: patched(d, "end", 12, "<I", 0xFFFFFFFF), "zip64 end record"),
    "a second disk": (lambda d: patched(d, "end", 4, "<H", 1), "multi-disk"),
    "entries on another disk": (lambda d: patched(d, "end", 8, "<H", 1),
                                "multi-disk"),
    "directory offset moved": (
        lambda d: patched(d, "end", 16, "<I",
                          struct.unpack_from("<I", d, len(d) - 6)[0] - 1),
        "does not end where"),
    "a central entry's signature": (
        lambda d: patched(d, "central", 0, "<4s", b"PK\x01\x03", 1),
        "central directory entry at offset|ends inside"),
    "encrypted": (lambda d: both_headers(d, 6, 8, "<H", 1), "is encrypted"),
    "deflated": (lambda d: both_headers(d, 8, 10, "<H", 8), "is compressed"),
    "another flag": (lambda d: both_headers(d, 6, 8, "<H", 2),
                     "unsupported flags 0x0002"),
    "packed size": (lambda d: patched(d, "central", 20, "<I", 1),
                    "declares 1 bytes stored"),
    "one entry fewer": (
        lambda d: patched(patched(d, "end", 8, "<H", 1), "end", 10, "<H", 1),
        "more than its entries"),
    "local name": (lambda d: patched(d, "local", 30, "<B", ord("c")),
                   "disagrees with the central directory"),
    "local CRC": (lambda d: patched(d, "local", 14, "<I", 7),
                  "local header declares sizes"),
    "local size": (lambda d: patched(d, "local", 22, "<I", 7),
                   "local header declares sizes"),
    "second member moved on": (
        lambda d: patched(d, "central", 42, "<I",
                          d.index(b"PK\x03\x04", 1) + 1, 1),
        "gap after|disagrees"),
    "second member moved back": (
        lambda d: patched(d, "central", 42, "<I",
                          d.index(b"PK\x03\x04", 1) - 1, 1),
        "overlaps the one before"),
    "member data changed": (
        lambda d: d[:d.index(b"\x93NUMPY") + 100] + b"\x55"
        + d[d.index(b"\x93NUMPY") + 101:], "fails its CRC"),
}


@pytest.mark.parametrize("damage", list(ZIP_DAMAGE))
def test_zip_checks(damage):
  change, message = ZIP_DAMAGE[damage]
  assert mxnet.read_params(two_members())
  refused(change(two_members()), message, mxnet.read_params)


def test_zip64_records_and_fields_must_be_whole():
  wide_end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0, 0, 0xFFFFFFFF, 0, 0)
  refused(wide_end, "zip64 end record is missing", mxnet.read_params)
  data = two_members(zip64=True)
  extra_at = data.index(b"PK\x03\x04") + 30 + len("a.npy")
  assert struct.unpack_from("<H", data, extra_at)[0] == 1  # the zip64 field
  for size, message in ((17, "runs past its end"), (14, "runs past its end"),
                        (13, "runs past its end"), (12, "without its zip64 value")):
    # The field's 16 bytes (two sizes) declared as ``size``: what follows is
    # read as the next field's header (2 or 3 bytes: too short for one).
    changed = bytearray(data)
    struct.pack_into("<H", changed, extra_at + 2, size)
    refused(bytes(changed), message, mxnet.read_params)
  # A zip64 field of 15 bytes (the extra field shortened with it): one byte
  # short of the two sizes the local header's 0xFFFFFFFF fields ask for.
  short = bytearray(data)
  struct.pack_into("<H", short, data.index(b"PK\x03\x04") + 28, 19)
  struct.pack_into("<H", short, extra_at + 2, 15)
  refused(bytes(short), "without its zip64 value", mxnet.read_params)
  # Only the size wide, its zip64 field a byte short and another field after
  # it (whose first byte, 0, would complete the size if read with the field).
  size = struct.unpack_from("<Q", data, extra_at + 4)[0]
  one_wide = bytearray(data)
  struct.pack_into("<I", one_wide, data.index(b"PK\x03\x04") + 18, size)
  struct.pack_into("<HH7sHH5s", one_wide, extra_at, 1, 7,
                   struct.pack("<Q", size)[:7], 0, 5, b"")
  refused(bytes(one_wide), "without its zip64 value", mxnet.read_params)


def zip64_end(count: int, cd_size: int, cd_offset: int, at: int) -> bytes:
  """A zip64 end record at offset ``at``, its locator and the end record,
  whose fields hold what fits as Python's zipfile writes them."""
  return (struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count,
                      count, cd_size, cd_offset)
          + struct.pack("<4sIQI", b"PK\x06\x07", 0, at, 1)
          + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF),
                        min(count, 0xFFFF), min(cd_size, 0xFFFFFFFF),
                        min(cd_offset, 0xFFFFFFFF), 0))


def test_an_empty_archive_may_have_zip64_records():
  empty = zip64_end(0, 0, 0, at=0)
  assert zipfile.ZipFile(io.BytesIO(empty)).namelist() == []
  assert mxnet.read_params(empty) == {}
  # A byte less: the locator is found, the zip64 record has no room before it.
  refused(empty[:4] + empty[5:], "zip64 end record is missing", mxnet.read_params)


@functools.cache
def members(count: int) -> bytes:
  """An archive of ``count`` empty ``.npy`` members, as Python's zipfile
  writes it: zip64 end records only from 65,536 members on."""
  buffer, member = io.BytesIO(), npy(np.zeros(0, np.uint8))
  with zipfile.ZipFile(buffer, "w") as archive:
    for i in range(count):
      archive.writestr(f"{i}.npy", member)
  return buffer.getvalue()


def test_an_archive_of_65535_members_reads_with_or_without_zip64_records():
  # A count of 0xFFFF fits the end record: Python's zipfile writes no zip64
  # records for it, Go's archive/zip does.
  plain = members(0xFFFF)
  assert plain[-42:-38] != b"PK\x06\x07"
  cd_size, cd_offset = struct.unpack_from("<II", plain, len(plain) - 10)
  with_zip64 = plain[:-22] + zip64_end(0xFFFF, cd_size, cd_offset,
                                       at=len(plain) - 22)
  for data in (plain, with_zip64):
    assert len(zipfile.ZipFile(io.BytesIO(data)).namelist()) == 0xFFFF
    assert len(mxnet.read_params(data)) == 0xFFFF


def test_central_directory_entries_lie_inside_it():
  data = two_members()
  cd, end = data.index(b"PK\x01\x02"), len(data) - 22
  assert end - cd == 2 * (46 + len("a.npy"))
  def cut(size):  # the directory cut to ``size`` bytes, the end record told
    return patched(data[:cd + size] + data[end:], "end", 12, "<I", size)
  refused(cut(96), "ends inside an entry", mxnet.read_params)  # 2nd header
  refused(cut(97), "central directory entry at offset", mxnet.read_params)


def test_data_descriptors_must_agree():
  data = two_members(descriptors=True)
  at = data.index(b"PK\x07\x08")
  wrong = data[:at + 4] + b"\0\0\0\0" + data[at + 8:]  # the descriptor's CRC
  refused(wrong, "data descriptor disagrees", mxnet.read_params)


def test_bytes_between_the_members_and_the_directory_are_refused():
  data = two_members()
  cd = data.index(b"PK\x01\x02")
  moved = data[:cd] + b"\0" + data[cd:]
  moved = patched(moved, "end", 16, "<I", cd + 1)
  refused(moved, "1 bytes between the members", mxnet.read_params)


def test_zip_member_names():
  flagged = both_headers(two_members(), 6, 8, "<H", 0x0800)
  assert list(mxnet.read_params(flagged)) == ["a", "b"]
  bad = patched(patched(flagged, "local", 30, "<B", 0xFF), "central", 46, "<B",
                0xFF)
  refused(bad, "not UTF-8", mxnet.read_params)
