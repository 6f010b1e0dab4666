"""Apache MXNet's parameter and trainer-state files, read without MXNet.

Three formats:

* MXNet 1.x's ``net.save_parameters(f)``, ``mx.nd.save(f, ...)`` and the
  Module API's ``.params`` files: MXNet's NDArray list format. A header
  (``0x112``, a reserved word), the number of arrays, each array in MXNet's
  per-array format (a magic number, storage type, shape, context, dtype flag,
  raw data), then the names.
* MXNet 2.x's ``net.save_parameters(f)``: a NumPy ``.npz`` (a zip of
  uncompressed ``.npy`` files, one per parameter).
* ``trainer.save_states(f)`` (Gluon) and ``mod.save_optimizer_states(f)``
  (Module): a pickle of ``(states, optimizer)`` (Gluon) or of ``states`` alone
  (Module), where ``states`` maps each parameter's index to its optimizer
  state, NDArrays pickled as ``{'handle': <one array in the per-array
  format>}``.

Pickles can run arbitrary code when loaded, so trainer-state files are not
unpickled: their opcodes are executed by the project's own reader
(``optax_ftml.mxnet._pickle``), which knows only what MXNet writes, calls
nothing from the file and costs at most a constant times the file's size.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from optax_ftml.mxnet._pickle import OPTIMIZER_MODULES
from optax_ftml.mxnet._pickle import FileError
from optax_ftml.mxnet._pickle import PickledObject
from optax_ftml.mxnet._pickle import load_mxnet_pickle

_LIST_MAGIC = 0x112
# MXNet 2's parameter files are NumPy .npz archives (zip files).
_ZIP_MAGIC, _EMPTY_ZIP_MAGIC = b"PK\x03\x04", b"PK\x05\x06"
# NDArray::Save writes V2 for MXNet's classic shapes and V3 under NumPy shape
# semantics (npx.set_np()); they differ only in how an empty shape is read.
_ARRAY_MAGIC_V2 = 0xF993FAC9
_ARRAY_MAGIC_V3 = 0xF993FACA
_ARRAY_MAGIC_V1 = 0xF993FAC8
_DEFAULT_STORAGE = 0
# NumPy's limit; MXNet's own is lower.
_MAX_NDIM = 64
_MAX_ELEMENTS = 2**63 // 16  # any dtype's bytes fit NumPy's int64 sizes
_STORAGE_NAMES = {1: "row_sparse", 2: "csr"}
# mshadow's type flags (include/mshadow/base.h).
_DTYPES = {
    0: np.dtype(np.float32), 1: np.dtype(np.float64), 2: np.dtype(np.float16),
    3: np.dtype(np.uint8), 4: np.dtype(np.int32), 5: np.dtype(np.int8),
    6: np.dtype(np.int64), 7: np.dtype(np.bool_), 8: np.dtype(np.int16),
    9: np.dtype(np.uint16), 10: np.dtype(np.uint32), 11: np.dtype(np.uint64),
    12: np.dtype(ml_dtypes.bfloat16),
}

class _Bytes:
  """Reads little-endian values from ``data``; running past the end raises."""

  def __init__(self, data: bytes, source: str):
    self._data = memoryview(data)
    self.position = 0
    self.source = source

  def error(self, message: str) -> FileError:
    return FileError(f"{self.source}: {message}")

  @property
  def remaining(self) -> int:
    return len(self._data) - self.position

  def take(self, size: int, what: str) -> memoryview:
    if size < 0 or size > self.remaining:
      raise self.error(
          f"truncated or corrupted: {what} needs {size} bytes at offset"
          f" {self.position}, {self.remaining} left.")
    chunk = self._data[self.position:self.position + size]
    self.position += size
    return chunk

  def unpack(self, fmt: str, what: str) -> Any:
    values = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))
    return values[0] if len(values) == 1 else values


def _read_shape(reader: _Bytes, what: str) -> tuple[int, ...] | None:
  """An ``mxnet::TShape``: ``int32`` ndim, then ``int64`` dims (None: -1)."""
  ndim = reader.unpack("i", f"{what} ndim")
  if ndim == -1:
    return None
  if not 0 <= ndim <= _MAX_NDIM or 8 * ndim > reader.remaining:
    raise reader.error(f"corrupted: {what} has ndim {ndim}.")
  dims = reader.unpack(f"{ndim}q", f"{what} dims") if ndim else ()
  dims = (dims,) if isinstance(dims, int) else tuple(dims)
  problem = _shape_problem(dims)
  if problem:
    raise reader.error(f"corrupted: {what} has dims {dims}, {problem}.")
  return dims


def _shape_problem(dims: tuple[int, ...]) -> str | None:
  """Why NumPy cannot hold an array of these dims, or None."""
  if len(dims) > _MAX_NDIM:
    return f"more than {_MAX_NDIM} dims"
  if any(d < 0 for d in dims):
    return "a negative dim"
  # NumPy refuses shapes whose non-zero dims multiply past its index type,
  # even for empty arrays.
  if math.prod(d for d in dims if d) >= _MAX_ELEMENTS:
    return "too many elements"
  return None


def _read_array(reader: _Bytes, index: int) -> np.ndarray:
  """One array in ``NDArray::Save``'s format, as a NumPy array."""
  what = f"array {index}"
  magic = reader.unpack("I", f"{what} magic")
  if magic == _ARRAY_MAGIC_V1:
    raise reader.error(
        f"{what} is in MXNet's legacy (v1) array format, written before MXNet"
        " 1.0; load and save it again with a newer MXNet.")
  if magic not in (_ARRAY_MAGIC_V2, _ARRAY_MAGIC_V3):
    raise reader.error(
        f"corrupted: {what} starts with 0x{magic:08X}, not an NDArray magic"
        f" (0x{_ARRAY_MAGIC_V2:08X} or 0x{_ARRAY_MAGIC_V3:08X}).")
  storage = reader.unpack("i", f"{what} storage type")
  if storage != _DEFAULT_STORAGE:
    name = _STORAGE_NAMES.get(storage, f"storage type {storage}")
    raise reader.error(
        f"{what} has {name} storage; only dense arrays are supported (convert"
        " it with .tostype('default') in MXNet before saving).")
  shape = _read_shape(reader, f"{what} shape")
  # Classic shape semantics write an empty shape for an unset array and stop
  # there; NumPy semantics write ndim -1 for it.
  if shape is None or (magic == _ARRAY_MAGIC_V2 and not shape):
    raise reader.error(f"{what} is an unset (none) NDArray: it holds no data.")
  reader.unpack("ii", f"{what} context")
  type_flag = reader.unpack("i", f"{what} dtype flag")
  if type_flag not in _DTYPES:
    raise reader.error(f"{what} has unsupported dtype flag {type_flag}.")
  dtype = _DTYPES[type_flag]
  # Python integers: a product of int64 dims must not wrap around.
  size = math.prod(shape) * dtype.itemsize
  data = reader.take(size, f"{what} data ({shape}, {dtype})")
  return np.frombuffer(data, dtype).reshape(shape).copy()


def _read_array_bytes(data: bytes, source: str) -> np.ndarray:
  """One array alone (a pickled NDArray's ``handle``)."""
  reader = _Bytes(data, source)
  array = _read_array(reader, 0)
  if reader.remaining:
    raise reader.error(f"corrupted: {reader.remaining} bytes after the array.")
  return array


def source_name(file: str | os.PathLike | bytes) -> str:
  """How messages name ``file``: its path, or ``<bytes>``."""
  if isinstance(file, (bytes, bytearray, memoryview)):
    return "<bytes>"
  if not isinstance(file, (str, os.PathLike)):
    raise TypeError(
        f"file must be a path or bytes, got {type(file).__name__}.")
  return os.fspath(file)


def _source_bytes(file: str | os.PathLike | bytes) -> tuple[bytes, str]:
  source = source_name(file)
  if isinstance(file, (bytes, bytearray, memoryview)):
    return bytes(file), source
  with open(file, "rb") as f:
    return f.read(), source


def _read_npy(member: bytes, what: str, source: str) -> np.ndarray:
  """One ``.npy`` member of an MXNet 2 parameter file, checked before any
  allocation: a known dtype and exactly the bytes its shape needs."""
  stream = io.BytesIO(member)
  try:
    version = np.lib.format.read_magic(stream)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(stream, max_header_size=10_000)
  except Exception as e:  # NumPy's header parser raises several kinds
    raise FileError(
        f"{source}: corrupted: {what} is not a NumPy array ({e}).") from None
  if dtype not in _DTYPES.values() or dtype.byteorder == ">":
    raise FileError(f"{source}: {what} has unsupported dtype {dtype}.")
  problem = _shape_problem(shape)
  if problem:
    raise FileError(
        f"{source}: corrupted: {what} has shape {shape}, {problem}.")
  raw = member[stream.tell():]
  if len(raw) != math.prod(shape) * dtype.itemsize:
    raise FileError(
        f"{source}: corrupted: {what} has {len(raw)} bytes of data for shape"
        f" {shape} ({dtype}).")
  return np.frombuffer(raw, dtype).reshape(
      shape, order="F" if fortran_order else "C").copy()


def _read_npz(data: bytes, source: str) -> dict[str, np.ndarray]:
  """MXNet 2's ``save_parameters``: a NumPy ``.npz`` of uncompressed ``.npy``
  members (never unpickled, never decompressed)."""
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
    members = archive.infolist()
    for info in members:
      if (info.compress_type != zipfile.ZIP_STORED
          or info.compress_size != info.file_size
          or info.file_size > len(data)):
        raise FileError(
            f"{source}: {info.filename[:100]!r} is compressed or larger than"
            " the file; MXNet writes uncompressed members.")
    contents = [(info.filename, archive.read(info)) for info in members]
  except FileError:
    raise
  except Exception as e:  # zipfile raises many kinds of error
    raise FileError(
        f"{source}: truncated or corrupted zip ({type(e).__name__}).") from None
  names = [name.removesuffix(".npy") for name, _ in contents]
  if any(not name.endswith(".npy") for name, _ in contents):
    raise FileError(f"{source}: the zip holds files other than .npy.")
  if len(set(names)) != len(names):
    raise FileError(f"{source}: corrupted: duplicate names.")
  return {name: _read_npy(member, f"array {name[:100]!r}", source)
          for name, (_, member) in zip(names, contents, strict=True)}


def read_params(
    file: str | os.PathLike | bytes,
) -> dict[str, np.ndarray] | list[np.ndarray]:
  """Reads an MXNet parameter file into NumPy arrays, without MXNet.

  Reads what MXNet 1.x's ``net.save_parameters``, ``mx.nd.save`` and the
  Module API's ``save_checkpoint`` write (MXNet's NDArray list format), and
  what MXNet 2.x's ``net.save_parameters`` writes (a NumPy ``.npz`` of
  uncompressed ``.npy`` members, read without unpickling or decompressing
  anything). Gluon's keys are structural (``0.weight``, ``3.0.bias``: child
  positions and attribute names); the Module API's are ``arg:<name>`` and
  ``aux:<name>``.

  Args:
    file: a path, or the file's contents as bytes.

  Returns:
    A dict from name to array, in the file's order; a list of arrays if the
    file has no names (``mx.nd.save`` of a list).

  Raises:
    FileError: (a ``ValueError``) if the file is not an MXNet parameter
      file, is truncated or corrupted, or holds something unsupported: sparse
      storage, unset arrays, an unknown dtype, compressed or non-``.npy``
      zip members. Nothing is returned then.
    TypeError: if ``file`` is neither a path nor bytes.

  Examples:
    A Gluon checkpoint shipped with this package (a convolution and a Dense
    layer):

    >>> import importlib.resources
    >>> from optax_ftml import mxnet
    >>> example = importlib.resources.files("optax_ftml.mxnet") / "example"
    >>> params = mxnet.read_params(example / "model.params")
    >>> {name: array.shape for name, array in params.items()}
    {'0.weight': (4, 1, 3, 3), '0.bias': (4,), '3.weight': (10, 64), '3.bias': (10,)}
  """
  data, source = _source_bytes(file)
  if data[:4] in (_ZIP_MAGIC, _EMPTY_ZIP_MAGIC):
    return _read_npz(data, source)
  reader = _Bytes(data, source)
  header, _ = reader.unpack("QQ", "the header")
  if header != _LIST_MAGIC:
    raise reader.error(
        f"not an MXNet NDArray file: header 0x{header:X}, expected"
        f" 0x{_LIST_MAGIC:X}.")
  count = reader.unpack("Q", "the number of arrays")
  # Each array takes at least 24 bytes: a bound before trusting the count.
  if count > reader.remaining // 24:
    raise reader.error(f"corrupted: {count} arrays cannot fit in the file.")
  arrays = [_read_array(reader, i) for i in range(count)]
  name_count = reader.unpack("Q", "the number of names")
  if name_count not in (0, count):
    raise reader.error(
        f"corrupted: {name_count} names for {count} arrays.")
  names = []
  for i in range(name_count):
    length = reader.unpack("Q", f"name {i} length")
    try:
      names.append(bytes(reader.take(length, f"name {i}")).decode("utf-8"))
    except UnicodeDecodeError as e:
      raise reader.error(f"corrupted: name {i} is not UTF-8.") from e
  if reader.remaining:
    raise reader.error(f"corrupted: {reader.remaining} bytes after the names.")
  if len(set(names)) != len(names):
    raise reader.error("corrupted: duplicate names.")
  return dict(zip(names, arrays, strict=True)) if names else arrays


def _safe_loads(data: bytes, source: str) -> Any:
  """The object an MXNet pickle holds, read by the project's own opcode reader
  (see ``optax_ftml.mxnet._pickle``); every failure is a ``FileError``."""
  try:
    return load_mxnet_pickle(
        data, lambda handle: _read_array_bytes(handle, "a pickled NDArray"))
  except FileError as e:
    raise FileError(f"{source}: {e}") from None


@dataclasses.dataclass(frozen=True)
class TrainerStates:
  """The contents of an MXNet trainer-state file.

  Attributes:
    states: each parameter's optimizer state by its index in the trainer (or
      module): for FTML the arrays ``(d, v, z)``. Parameters never updated
      (Gluon's ``grad_req='null'``, e.g. BatchNorm's running statistics) have
      no entry.
    optimizer: the pickled optimizer (Gluon's ``Trainer.save_states``), or
      None (the Module API's ``save_optimizer_states`` saves the states only).
  """

  states: dict[int, Any]
  optimizer: PickledObject | None


def read_trainer_states(
    file: str | os.PathLike | bytes,
) -> TrainerStates:
  """Reads an MXNet trainer-state file without MXNet and without running code.

  Reads what Gluon's ``trainer.save_states`` (a pickle of ``(states,
  optimizer)``) and the Module API's ``save_optimizer_states`` (a pickle of
  ``states``) write, with a reader of its own that executes only the pickle
  opcodes MXNet writes: MXNet's NDArrays become NumPy arrays, its optimizers
  and learning-rate schedulers inert :class:`PickledObject` records, and any
  other global, any opcode MXNet never writes (extensions, persistent ids,
  sets), any key but an integer or a string, nesting deeper than 32 and
  shared references expanding beyond a few times the file's size are refused.
  Nothing in the file is called, and time and memory stay within a constant
  times the file's size.

  Args:
    file: a path, or the file's contents as bytes.

  Returns:
    A :class:`TrainerStates`.

  Raises:
    FileError: (a ``ValueError``) if the pickle refers to anything outside
      the allow-list (e.g. a function such as ``os.system``, or a custom
      scheduler class), is truncated or corrupted, or holds sparse or
      unsupported arrays. Nothing is returned then.
    TypeError: if ``file`` is neither a path nor bytes.

  Examples:
    >>> import importlib.resources
    >>> from optax_ftml import mxnet
    >>> example = importlib.resources.files("optax_ftml.mxnet") / "example"
    >>> saved = mxnet.read_trainer_states(example / "trainer.states")
    >>> saved.optimizer.class_name, saved.optimizer.attributes["num_update"]
    ('FTML', 100)
    >>> d, v, z = saved.states[3]  # the Dense weight's FTML state
    >>> d.shape, d.dtype
    ((10, 64), dtype('float32'))
  """
  data, source = _source_bytes(file)
  contents = _safe_loads(data, source)
  if isinstance(contents, dict):
    states, optimizer = contents, None
  elif (isinstance(contents, tuple) and len(contents) == 2
        and isinstance(contents[0], dict)
        and isinstance(contents[1], PickledObject)
        and contents[1].mxnet_class.startswith(OPTIMIZER_MODULES)):
    states, optimizer = contents
  else:
    raise FileError(
        f"{source}: not an MXNet trainer-state file: expected a dict of states"
        f" or a (states, optimizer) pair, got {type(contents).__name__}.")
  wrong_keys = {type(k).__name__ for k in states if type(k) is not int}
  if wrong_keys:
    raise FileError(
        f"{source}: corrupted: state keys must be integer indices, got keys of"
        f" type {', '.join(sorted(wrong_keys))}.")
  return TrainerStates(states=states, optimizer=optimizer)
