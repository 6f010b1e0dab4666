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

Every reader takes its bytes from :func:`read_source`, the one way in:
regular files only, read once to the size the file system gives. Pickles can
run arbitrary code when loaded, so trainer-state files are not unpickled:
their opcodes are executed by the project's own reader
(``optax_ftml.mxnet._pickle``), which knows only what MXNet writes, calls
nothing from the file and spends at most a budget of 32 bytes per byte of
the file. Zip files are validated whole before any member is read.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import stat
import struct
import zlib
from typing import Any
from typing import NamedTuple

import ml_dtypes
import numpy as np

from optax_ftml.mxnet._pickle import OPTIMIZER_MODULES
from optax_ftml.mxnet._pickle import load_mxnet_pickle
from optax_ftml.mxnet._records import FileError
from optax_ftml.mxnet._records import PickledObject
from optax_ftml.mxnet._records import quoted

_LIST_MAGIC = 0x112
_LIST_HEADER = struct.pack("<Q", _LIST_MAGIC)
# MXNet 2's parameter files are NumPy .npz archives (zip files).
# An empty archive starts with its (zip64) end record.
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x06\x06")
# NDArray::Save writes V2 for MXNet's classic shapes and V3 under NumPy shape
# semantics (npx.set_np()); they differ only in how an empty shape is read.
_ARRAY_MAGIC_V2 = 0xF993FAC9
_ARRAY_MAGIC_V3 = 0xF993FACA
_ARRAY_MAGIC_V1 = 0xF993FAC8
_DEFAULT_STORAGE = 0
# NumPy's limit; MXNet's own is lower.
_MAX_NDIM = 64
_QUOTED_DIMS = 8  # how many dims a message shows
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
    raise reader.error(
        f"corrupted: {what} has dims {_shape_text(dims)}, {problem}.")
  return dims


def _shape_text(dims: tuple[int, ...]) -> str:
  """``dims`` for a message: at most the first 8 of up to 64 dims."""
  if len(dims) <= _QUOTED_DIMS:
    return str(dims)
  shown = ", ".join(str(d) for d in dims[:_QUOTED_DIMS])
  return f"({shown}, ...: {len(dims)} dims)"


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
  data = reader.take(size, f"{what} data ({_shape_text(shape)}, {dtype})")
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


# Flags for open(): never wait for a writer (a FIFO), never become the
# controlling terminal, never leak to a child process.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))


def _not_regular(mode: int) -> str | None:
  """What a file of this mode is, if it is not a regular file."""
  if stat.S_ISREG(mode):
    return None
  for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                     (stat.S_ISCHR, "a character device"),
                     (stat.S_ISBLK, "a block device"),
                     (stat.S_ISSOCK, "a socket")):
    if test(mode):
      return kind
  return "not a regular file"


def read_source(file: str | os.PathLike | bytes) -> tuple[bytes, str]:
  """The one way in for every reader: a file's bytes and how messages name it.

  Bytes are taken as they are. A path (symbolic links followed) must be a
  regular file, checked before it is opened and again, with ``fstat``, on
  what was opened (without blocking: a FIFO never waits for a writer); it is
  read up to the size ``fstat`` gave, and refused if it has more or fewer
  bytes (a file changing while read, or one such as ``/proc``'s whose size is
  not known before reading).
  """
  source = source_name(file)
  if isinstance(file, (bytes, bytearray, memoryview)):
    return bytes(file), source
  kind = _not_regular(os.stat(file).st_mode)
  if kind is None:
    fd = os.open(file, _OPEN_FLAGS)
    with os.fdopen(fd, "rb", buffering=0) as stream:
      info = os.fstat(fd)
      kind = _not_regular(info.st_mode)
      if kind is None:
        chunks, left = [], info.st_size
        while left and (chunk := stream.read(left)):
          chunks.append(chunk)
          left -= len(chunk)
        if left or stream.read(1):
          raise FileError(
              f"{source}: refused: its size is not the {info.st_size} bytes"
              " its directory entry gives (a file being written, or not a"
              " regular file).")
        return b"".join(chunks), source
  raise FileError(
      f"{source}: refused: {kind}, not a regular file (only regular files are"
      " read, so that reading ends and takes the size the file declares).")


def _read_npy(member: memoryview, what: str, source: str) -> np.ndarray:
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
        f"{source}: corrupted: {what} is not a NumPy array"
        f" ({quoted(str(e))}).") from None
  if dtype not in _DTYPES.values() or dtype.byteorder == ">":
    raise FileError(
        f"{source}: {what} has unsupported dtype {quoted(str(dtype))}.")
  problem = _shape_problem(shape)
  if problem:
    raise FileError(
        f"{source}: corrupted: {what} has shape {_shape_text(shape)},"
        f" {problem}.")
  raw = member[stream.tell():]
  if len(raw) != math.prod(shape) * dtype.itemsize:
    raise FileError(
        f"{source}: corrupted: {what} has {len(raw)} bytes of data for shape"
        f" {_shape_text(shape)} ({dtype}).")
  return np.frombuffer(raw, dtype).reshape(
      shape, order="F" if fortran_order else "C").copy()


# The zip format (PKWARE's APPNOTE.TXT): local file headers, the central
# directory, the (zip64) end of central directory record.
_LOCAL = struct.Struct("<4sHHHIIIIHH")
_CENTRAL = struct.Struct("<4sHHHHIIIIHHHHHII")
_END = struct.Struct("<4sHHHHIIH")
_END64_LOCATOR = struct.Struct("<4sIQI")
_END64 = struct.Struct("<4sQHHIIQQQQ")
_LOCAL_MAGIC, _CENTRAL_MAGIC = b"PK\x03\x04", b"PK\x01\x02"
_END_MAGIC, _END64_MAGIC, _LOCATOR_MAGIC = (b"PK\x05\x06", b"PK\x06\x06",
                                            b"PK\x06\x07")
_DESCRIPTOR_MAGIC = b"PK\x07\x08"
_ZIP64_EXTRA = 0x0001
_WIDE = 0xFFFFFFFF  # a 32-bit field whose value is in the zip64 extra field
_STORED = 0
_ENCRYPTED = 0x0001
# Bit 3: sizes and CRC in a data descriptor after the data (MXNet 2 writes
# its members so); bit 11: UTF-8 names.
_DESCRIPTOR, _UTF8 = 0x0008, 0x0800


class _Member(NamedTuple):
  """A zip member as the central directory declares it."""
  name: str
  raw_name: bytes
  flags: int
  crc: int
  size: int
  offset: int


def _zip64_values(extra: bytes, fields: list[int], error: Any) -> list[int]:
  """``fields`` with each value ``_WIDE`` replaced from the zip64 extra field,
  in the order the format gives them; the extra field must parse exactly."""
  wide = [i for i, value in enumerate(fields) if value == _WIDE]
  position, found = 0, None
  while position < len(extra):
    if position + 4 > len(extra):
      raise error("an extra field runs past its end")
    kind, size = struct.unpack_from("<HH", extra, position)
    if position + 4 + size > len(extra):
      raise error("an extra field runs past its end")
    if kind == _ZIP64_EXTRA:
      found = extra[position + 4:position + 4 + size]
    position += 4 + size
  if not wide:
    return fields
  if found is None or len(found) < 8 * len(wide):
    raise error("a 32-bit size or offset is 0xFFFFFFFF without its zip64 value")
  values = list(fields)
  for slot, i in enumerate(wide):
    values[i] = struct.unpack_from("<Q", found, 8 * slot)[0]
  return values


def _central_directory(data: bytes, error: Any) -> tuple[list[_Member], int]:
  """The members the central directory declares, and where it starts."""
  end_at = len(data) - _END.size
  if end_at < 0 or data[end_at:end_at + 4] != _END_MAGIC or data[-2:] != b"\0\0":
    raise error("the end of central directory record is not the file's last"
                f" {_END.size} bytes (MXNet writes no archive comment)")
  _, disk, cd_disk, on_disk, count, cd_size, cd_offset, _ = _END.unpack_from(
      data, end_at)
  cd_end = end_at
  locator_at = end_at - _END64_LOCATOR.size
  # Zip64 records are needed for wide sizes and offsets, optional for a count
  # of 0xFFFF (Python's zipfile adds them only from 65,536 entries, Go's from
  # 65,535) and allowed for any archive: read them wherever their locator is.
  if _WIDE in (cd_size, cd_offset) or data[locator_at:end_at].startswith(
      _LOCATOR_MAGIC):
    record_at = locator_at - _END64.size
    if record_at < 0:
      raise error("a zip64 end record is missing")
    magic, _, at, disks = _END64_LOCATOR.unpack_from(data, locator_at)
    (magic64, record_size, _, _, disk, cd_disk, on_disk, count, cd_size,
     cd_offset) = _END64.unpack_from(data, record_at)
    if (magic != _LOCATOR_MAGIC or magic64 != _END64_MAGIC or at != record_at
        or disks != 1 or record_size != _END64.size - 12):
      raise error("a zip64 end record is missing or malformed")
    cd_end = record_at
  if disk or cd_disk or on_disk != count:
    raise error("a multi-disk archive")
  if cd_offset + cd_size != cd_end or count * _CENTRAL.size > cd_size:
    raise error(
        f"the central directory ({count} entries, {cd_size} bytes at offset"
        f" {cd_offset}) does not end where the end record begins ({cd_end})")
  members, position = [], cd_offset
  for _ in range(count):
    if position + _CENTRAL.size > cd_end:
      raise error("the central directory ends inside an entry")
    (magic, _, _, flags, method, _, crc, packed, size, name_size, extra_size,
     comment_size, disk, _, _, offset) = _CENTRAL.unpack_from(data, position)
    name_at = position + _CENTRAL.size
    position = name_at + name_size + extra_size + comment_size
    if magic != _CENTRAL_MAGIC or position > cd_end:
      raise error(f"a central directory entry at offset"
                  f" {name_at - _CENTRAL.size} is malformed")
    raw_name = data[name_at:name_at + name_size]
    name = _zip_name(raw_name, flags, error)
    size, packed, offset = _zip64_values(
        data[name_at + name_size:name_at + name_size + extra_size],
        [size, packed, offset], error)
    what = f"the member {quoted(name)}"
    if flags & _ENCRYPTED:
      raise error(f"{what} is encrypted")
    if method != _STORED:
      raise error(f"{what} is compressed; MXNet writes uncompressed members")
    if flags & ~(_DESCRIPTOR | _UTF8):
      raise error(f"{what} has unsupported flags 0x{flags:04X}")
    if packed != size:
      raise error(f"{what} declares {packed} bytes stored for {size} bytes")
    if disk:
      raise error(f"{what} starts on disk {disk} of a multi-disk archive")
    members.append(_Member(name, raw_name, flags, crc, size, offset))
  if position != cd_end:
    raise error("the central directory holds more than its entries")
  return members, cd_offset


def _zip_name(raw: bytes, flags: int, error: Any) -> str:
  try:
    return raw.decode("utf-8" if flags & _UTF8 else "cp437")
  except UnicodeDecodeError:
    raise error(f"the member name {quoted(raw)} is not UTF-8") from None


def _local_data(data: bytes, member: _Member, limit: int, error: Any
                ) -> tuple[int, int]:
  """Where ``member``'s data lies, checked against its local header (and
  data descriptor), and where the member ends; all before ``limit``."""
  what = f"the member {quoted(member.name)}"
  at = member.offset
  if at + _LOCAL.size > limit:
    raise error(f"{what}'s local header at offset {at} is past the members")
  (magic, _, flags, method, _, crc, packed, size, name_size,
   extra_size) = _LOCAL.unpack_from(data, at)
  name_at = at + _LOCAL.size
  start = name_at + name_size + extra_size
  if (magic != _LOCAL_MAGIC or start > limit or flags != member.flags
      or method != _STORED or data[name_at:name_at + name_size]
      != member.raw_name):
    raise error(f"{what}'s local header at offset {at} disagrees with the"
                " central directory")
  extra = data[name_at + name_size:start]
  wide = _WIDE in (packed, size)
  size, packed = _zip64_values(extra, [size, packed], error)
  declared = (crc, packed, size)
  if declared != (member.crc, member.size, member.size) and not (
      flags & _DESCRIPTOR and declared == (0, 0, 0)):
    raise error(f"{what}'s local header declares sizes {packed} and {size}"
                f" and CRC {crc}, the central directory {member.size} and"
                f" CRC {member.crc}")
  end = start + member.size
  if end > limit:
    raise error(f"{what} ({member.size} bytes at offset {start}) runs past"
                " the members' end")
  if flags & _DESCRIPTOR:
    sizes = "<IQQ" if wide else "<III"
    if data[end:end + 4] == _DESCRIPTOR_MAGIC:
      end += 4
    if end + struct.calcsize(sizes) > limit or struct.unpack_from(
        sizes, data, end) != (member.crc, member.size, member.size):
      raise error(f"{what}'s data descriptor disagrees with the central"
                  " directory")
    end += struct.calcsize(sizes)
  return start, end


def _zip_members(data: bytes, source: str) -> dict[str, memoryview]:
  """The members of a zip of stored members, each name with its bytes,
  validated before any is read: the central directory against the end record
  and each local header (and data descriptor), no encryption or compression,
  and the members (in the order of their offsets) following each other
  without gap or overlap from the file's start to the central directory. So
  no byte is read twice and the members' total size is less than the file's.
  """
  def error(message: str) -> FileError:
    return FileError(f"{source}: corrupted or unsupported zip: {message}.")

  members, cd_offset = _central_directory(data, error)
  position, extents = 0, {}  # name -> where its data starts
  for member in sorted(members, key=lambda m: m.offset):
    if member.offset != position:
      relation = ("overlaps the one before" if member.offset < position
                  else "leaves a gap after the one before")
      raise error(
          f"the member {quoted(member.name)} at offset {member.offset}"
          f" {relation} (which ends at {position}); MXNet's members follow"
          " each other")
    start, position = _local_data(data, member, cd_offset, error)
    extents[member.name] = start
  if position != cd_offset:
    raise error(f"{cd_offset - position} bytes between the members and the"
                " central directory")
  if any(not m.name.endswith(".npy") for m in members):
    raise error("the zip holds files other than .npy")
  if len(extents) != len(members):
    raise error("duplicate names")
  view, contents = memoryview(data), {}
  for member in members:
    start = extents[member.name]
    contents[member.name] = view[start:start + member.size]
    if zlib.crc32(contents[member.name]) != member.crc:
      raise error(f"the member {quoted(member.name)} fails its CRC")
  return contents


def _read_npz(data: bytes, source: str) -> dict[str, np.ndarray]:
  """MXNet 2's ``save_parameters``: a NumPy ``.npz`` of uncompressed ``.npy``
  members (never unpickled, never decompressed)."""
  return {name.removesuffix(".npy"): _read_npy(
      member, f"array {quoted(name.removesuffix('.npy'))}", source)
          for name, member in _zip_members(data, source).items()}


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

  Files from strangers are safe to read: a path must be a regular file
  (symbolic links followed; a FIFO, directory or device is refused without
  blocking) and is read once, to the size the file system gives. Every count,
  shape and size is checked against the bytes left before anything is
  allocated, so memory stays within a few times the file's size. A ``.npz``
  is validated whole before any member is read: its central directory
  against the end record and each local header, its members stored (not
  compressed or encrypted), within the file and following each other without
  gap or overlap (no byte read twice), each matching its CRC. Whatever an
  error message quotes from the file is escaped to printable ASCII and cut at
  60 characters.

  Args:
    file: a path, or the file's contents as bytes.

  Returns:
    A dict from name to array, in the file's order; a list of arrays if the
    file has no names (``mx.nd.save`` of a list).

  Raises:
    FileError: (a ``ValueError``) if the file is not an MXNet parameter
      file (a trainer-state file is named as such), is not a regular file,
      is truncated or corrupted, or holds something unsupported: sparse
      storage, unset arrays, an unknown dtype, compressed, encrypted,
      overlapping or non-``.npy`` zip members. Nothing is returned then.
    OSError: if the path cannot be opened (e.g. ``FileNotFoundError``).
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
  data, source = read_source(file)
  if data[:4] in _ZIP_MAGICS:
    return _read_npz(data, source)
  if _looks_like_pickle(data):
    raise FileError(
        f"{source}: this looks like an MXNet trainer-state file (a pickle),"
        " not a parameters file: use mxnet.read_trainer_states.")
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


def _looks_like_pickle(data: bytes) -> bool:
  """Whether ``data`` starts as Python 3's pickles do (PROTO 2 to 5)."""
  return data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04",
                                               b"\x05")


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
  sets, protocol 0's text opcodes: refused before their arguments are
  decoded), any key but an integer or a string and nesting deeper than 32 are
  refused. Nothing in the file is called, nothing the reader runs on it warns,
  and a warning raised as an error (``python -W error``) while reading would
  be a ``FileError``.

  A file of ``n`` bytes has a budget of ``32 * n + 4096`` bytes, charged
  before each object is made: every object the reader creates or keeps (an
  upper bound of CPython's size for it) and the result counted as a tree,
  shared references at every occurrence, strings, bytes and arrays by their
  size (so the result's ``repr``, or a copy that does not keep sharing, is
  within the budget too). A file needing more is refused. A path must be a
  regular file (symbolic links followed; a FIFO, directory or device is
  refused without blocking) and is read once, to the size the file system
  gives. Whatever an error message quotes from the file is escaped to
  printable ASCII and cut at 60 characters.

  Args:
    file: a path, or the file's contents as bytes.

  Returns:
    A :class:`TrainerStates`.

  Raises:
    FileError: (a ``ValueError``) if the pickle refers to anything outside
      the allow-list (e.g. a function such as ``os.system``, or a custom
      scheduler class), needs more than its budget, is truncated or
      corrupted, or holds sparse or unsupported arrays; or if the file is a
      parameter file (named as such) or not a regular file. Nothing is
      returned then.
    OSError: if the path cannot be opened (e.g. ``FileNotFoundError``).
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
  data, source = read_source(file)
  if data[:4] in _ZIP_MAGICS or data[:8] == _LIST_HEADER:
    raise FileError(
        f"{source}: this looks like an MXNet parameters file, not a"
        " trainer-state file: use mxnet.read_params.")
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
