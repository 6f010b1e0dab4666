"""A pickle reader for MXNet's trainer-state files that runs nothing in them.

``pickle.Unpickler`` cannot be made safe for files from strangers by an
allow-list alone: its C core hashes and recurses into whatever the file
builds (a tuple nested 200,000 deep kills the interpreter), allocates memo
tables to indices the file names, and serves ``copyreg`` extensions without
asking. Nor can ``pickletools.genops``, which decodes each opcode's argument
(escape sequences, text integers) before anyone has judged the opcode. So the
file is read here, as CPython's own unpickler reads it, by a dispatch table
from opcode byte to handler, holding only the opcodes MXNet's pickles hold
(protocols 2 to 4, as Python 3 writes them): an opcode not in the table is
refused before its argument is looked at, and a handler checks the length its
argument declares against the bytes left and the budget before decoding it.
The stack machine knows scalars, strings, bytes, lists, tuples, dicts with
integer or string keys, and MXNet's NDArray, optimizer and scheduler classes,
which become inert records. Nothing from the file is ever called, hashed
(beyond its integer and string keys) or printed unescaped, and no object
outliving the load can be reached from it.

One budget per file, ``BUDGET_PER_FILE_BYTE`` (32) bytes per byte of the
file plus ``BUDGET_BASE`` (4096), pays for everything the reader creates or
keeps, each cost charged before the object is made (upper bounds of what
CPython spends on it):

* each object: 64 bytes (``_OBJECT``: a list, tuple, string, bytes, global or
  NDArray placeholder), 32 for an int or float (``_NUMBER``), 232 for a dict
  (``_DICT``), 128 for a record (``_RECORD``, made by the finishing pass, as
  is a tuple rebuilt there); plus 4 (``_PER_BYTE``) per byte of a string's
  argument (a character takes up to 4 bytes in memory), 1 per byte of bytes';
  a decoded array 64 plus the bytes it came from;
* each reference: 8 (``_REFERENCE``) per stack push, mark, memo entry and
  list or tuple element, 48 (``_DICT_ITEM``) per dict item, 128
  (``_SHARED``) the first time an object is fetched from the memo (the
  finishing pass keeps one entry for each shared object);
* and the result as a tree, shared references counted at every occurrence
  (as ``repr``, ``json`` or a copy that does not keep sharing expands it),
  at least what ``repr`` prints for it: 8 per element and dict key (32 for a
  number, 128 for a record), 4 per byte of bytes or character of an ASCII
  string (10 for other strings: ``_PER_CHARACTER``), and for an array 64 plus
  8 per byte (``_PER_ARRAY_BYTE``) plus 4 per element and dimension
  (``_PER_ARRAY_DIMENSION``: the brackets).

Besides, objects may nest at most ``_MAX_DEPTH`` (32) deep. So time and
memory are at most a constant times the file's size, and so is anything the
result can later be expanded into: its ``repr`` is shorter than the budget.
"""

from __future__ import annotations

import pickle
import pickletools
import struct
import warnings
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

from optax_ftml.mxnet._records import FileError
from optax_ftml.mxnet._records import PickledObject
from optax_ftml.mxnet._records import quoted

# MXNet 1.9's optimizers (mxnet/optimizer/optimizer.py) and schedulers
# (mxnet/lr_scheduler.py); MXNet 2.x keeps FTML in mxnet/optimizer/ftml.py.
OPTIMIZER_MODULES = ("mxnet.optimizer.optimizer", "mxnet.optimizer.ftml")
_OPTIMIZER_CLASSES = frozenset({
    "Optimizer", "SGD", "Signum", "FTML", "LARS", "LBSGD", "LAMB", "DCASGD",
    "NAG", "SGLD", "ccSGD", "Adam", "AdaGrad", "RMSProp", "AdaDelta", "Ftrl",
    "Adamax", "Nadam"})
_SCHEDULER_MODULE = "mxnet.lr_scheduler"
_SCHEDULER_CLASSES = frozenset({
    "LRScheduler", "FactorScheduler", "MultiFactorScheduler", "PolyScheduler",
    "CosineScheduler"})
_NDARRAY = ("mxnet.ndarray.ndarray", "NDArray")
# NDArray pickles its bytes as a bytearray; protocol 2 spells bytes as
# _codecs.encode(text, "latin1") (and the builtins module as __builtin__).
_BYTEARRAYS = (("builtins", "bytearray"), ("__builtin__", "bytearray"))
_ENCODE = ("_codecs", "encode")

_PROTOCOLS = range(2, 5)
_MAX_DEPTH = 32
# LONG1 integers MXNet writes are counts: 8 bytes hold any of them.
_MAX_LONG_BYTES = 8
# GLOBAL's module and name lines: MXNet's are a few dozen characters.
_MAX_GLOBAL_LINE = 100

# The budget (see the module docstring), in bytes: upper bounds of what
# CPython spends on each object, so that a file of n bytes holds the reader
# to a little over BUDGET_PER_FILE_BYTE * n bytes.
BUDGET_PER_FILE_BYTE = 32
# What even the smallest file may spend: an empty dict of states costs more
# than 32 times its 5 bytes.
BUDGET_BASE = 4096
_OBJECT = 64
_NUMBER = 32
_DICT = 232
_RECORD = 128
_PER_BYTE = 4
_REFERENCE = 8
_DICT_ITEM = 48
_SHARED = 128
# What repr makes of a non-ASCII character (at most "\U0001f600"), and of an
# array's bytes and its elements' brackets.
_PER_CHARACTER = 10
_PER_ARRAY_BYTE = 8
_PER_ARRAY_DIMENSION = 4


class Budget:
  """What reading one file may still spend, in bytes."""

  def __init__(self, file_size: int):
    self.limit = BUDGET_PER_FILE_BYTE * file_size + BUDGET_BASE
    self.left = self.limit

  def charge(self, cost: int) -> None:
    self.left -= cost
    if self.left < 0:
      raise FileError(
          f"refused: reading it needs more than its budget of"
          f" {BUDGET_PER_FILE_BYTE} bytes per byte of file plus {BUDGET_BASE}"
          f" ({self.limit} bytes): it builds more, or its shared references"
          " expand to more, than MXNet's files do.")


class _Global(NamedTuple):
  """A class or function the file names: never resolved, only recognised."""
  module: str
  name: str


class _Pending:
  """A record or NDArray made by REDUCE or NEWOBJ, whose state BUILD gives."""

  __slots__ = ("array", "state", "where")

  def __init__(self, where: _Global):
    self.where = where
    self.state: dict[str, Any] | None = None
    self.array: Any = None


def _allowed(where: _Global) -> bool:
  module, name = where
  return (where == _NDARRAY or where in _BYTEARRAYS or where == _ENCODE
          or (module in OPTIMIZER_MODULES and name in _OPTIMIZER_CLASSES)
          or (module == _SCHEDULER_MODULE and name in _SCHEDULER_CLASSES))


_Handler = Callable[["_Machine"], bool | None]
class _Machine:
  """Executes the opcodes MXNet's pickles hold; see the module docstring."""

  def __init__(self, data: bytes, budget: Budget,
               decode_array: Callable[[bytes], Any]):
    self.data = data
    self.position = 0
    self.budget = budget
    self.decode_array = decode_array
    self.stack: list[Any] = []
    self.marks: list[int] = []
    self.memo: list[Any] = []
    self.shared: set[int] = set()

  def run(self) -> Any:
    code = self.read(1, "the first opcode")[0]
    if code != pickle.PROTO[0]:
      raise FileError(
          "not a pickle MXNet writes: expected pickle protocol 2 to 4 (Python"
          f" 3), got {_name(code)}.")
    protocol = self.read(1, "PROTO")[0]
    if protocol not in _PROTOCOLS:
      raise FileError(
          "not a pickle MXNet writes: expected pickle protocol 2 to 4 (Python"
          f" 3), got PROTO {protocol}.")
    while True:
      at = self.position
      code = self.read(1, "an opcode")[0]
      handler = _DISPATCH.get(code)
      if handler is None:
        raise FileError(
            f"refused: pickle opcode {_name(code)} at offset {at}, which"
            " MXNet's files never hold.")
      if handler(self):
        break
    if self.position != len(self.data):
      raise FileError(
          f"corrupted: {len(self.data) - self.position} bytes after the"
          " pickle's end.")
    if len(self.stack) != 1 or self.marks:
      raise FileError("corrupted pickle: it does not end with one object.")
    return self.stack[0]

  # Reading the file.

  def read(self, size: int, what: str) -> bytes:
    if size > len(self.data) - self.position:
      raise FileError(
          f"truncated or corrupted pickle: {what} needs {size} bytes at offset"
          f" {self.position}, {len(self.data) - self.position} left.")
    chunk = self.data[self.position:self.position + size]
    self.position += size
    return chunk

  def unpack(self, fmt: str, what: str) -> Any:
    return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

  def payload(self, length_format: str, what: str, per_byte: int) -> bytes:
    """A length-prefixed argument: the declared length is checked against
    the bytes left and charged before the bytes are read."""
    size = self.unpack(length_format, f"{what}'s length")
    if size > len(self.data) - self.position:
      raise FileError(
          f"truncated or corrupted pickle: {what} declares {size} bytes at"
          f" offset {self.position}, {len(self.data) - self.position} left.")
    self.budget.charge(_OBJECT + per_byte * size)
    return self.read(size, what)

  def line(self, what: str) -> str:
    """A GLOBAL argument: a short ASCII line."""
    end = self.data.find(b"\n", self.position,
                         self.position + _MAX_GLOBAL_LINE + 1)
    if end < 0:
      raise FileError(
          f"truncated or corrupted pickle: {what} at offset {self.position}"
          f" is not a line of at most {_MAX_GLOBAL_LINE} bytes.")
    raw = self.read(end + 1 - self.position, what)[:-1]
    if not raw.isascii():
      raise FileError(f"refused: {what} {quoted(raw)} is not ASCII.")
    return raw.decode("ascii")

  # The stack.

  def push(self, value: Any) -> None:
    self.budget.charge(_REFERENCE)
    self.stack.append(value)

  def top(self) -> Any:
    """The top of the stack, which must lie above the last mark."""
    if len(self.stack) <= (self.marks[-1] if self.marks else 0):
      raise FileError("corrupted pickle: stack underflow.")
    return self.stack[-1]

  def pop(self) -> Any:
    self.top()
    return self.stack.pop()

  def pop_mark(self) -> list[Any]:
    if not self.marks:
      raise FileError("corrupted pickle: no mark on the stack.")
    start = self.marks.pop()
    items = self.stack[start:]
    del self.stack[start:]
    return items

  def new_tuple(self, items: list[Any]) -> None:
    self.budget.charge(_OBJECT + _REFERENCE * len(items))
    self.push(tuple(items))

  # Containers.

  def set_items(self, items: list[Any]) -> None:
    target = self.top()
    if not isinstance(target, dict) or len(items) % 2:
      raise FileError("corrupted pickle: SETITEMS needs a dict and pairs.")
    self.budget.charge(_DICT_ITEM * (len(items) // 2))
    for key, value in zip(items[::2], items[1::2], strict=True):
      # Only keys whose hash costs their length, and no bools: MXNet's keys
      # are parameter indices and names.
      if type(key) not in (int, str):
        raise FileError(
            f"refused: a dict key of type {type(key).__name__} (MXNet's keys"
            " are integers and strings).")
      target[key] = value

  def append(self, items: list[Any]) -> None:
    target = self.top()
    if not isinstance(target, list):
      raise FileError("corrupted pickle: APPENDS needs a list.")
    self.budget.charge(_REFERENCE * len(items))
    target.extend(items)

  # Objects.

  def global_(self, module: Any, name: Any) -> None:
    if not (isinstance(module, str) and isinstance(name, str)):
      raise FileError("corrupted pickle: a global named by non-strings.")
    where = _Global(module, name)
    if not _allowed(where):
      raise FileError(
          f"refused to load {quoted(f'{module}.{name}')}: MXNet"
          " trainer-state files hold only NDArrays, MXNet optimizers and MXNet"
          " learning-rate schedulers, and nothing else is loaded from them (a"
          " pickle can run arbitrary code). A custom scheduler or optimizer"
          " class cannot be read.")
    self.budget.charge(_OBJECT)
    self.push(where)

  def call(self, opcode: str) -> None:
    """REDUCE and NEWOBJ: only the allowed globals, with MXNet's arguments."""
    args = self.pop()
    where = self.pop()
    if not isinstance(where, _Global) or type(args) is not tuple:
      raise FileError(f"refused: {opcode} of a {type(where).__name__}.")
    if where in _BYTEARRAYS or where == _ENCODE:
      self.push(self.bytes_of(where, args))
      return
    if args not in ((), (None,)):
      raise FileError(
          f"refused: {where.module}.{where.name} called with arguments.")
    self.budget.charge(_OBJECT)
    self.push(_Pending(where))

  def bytes_of(self, where: _Global, args: tuple[Any, ...]) -> bytes:
    if len(args) == 1 and isinstance(args[0], bytes) and where != _ENCODE:
      return args[0]
    if (len(args) == 2 and isinstance(args[0], str)
        and args[1] in ("latin1", "latin-1")):
      self.budget.charge(_OBJECT + len(args[0]))
      try:
        return args[0].encode("latin-1")
      except UnicodeEncodeError:
        raise FileError("corrupted pickle: bytes beyond latin-1.") from None
    if not args and where != _ENCODE:
      return b""
    raise FileError(
        f"refused: {where.module}.{where.name} of"
        f" {', '.join(type(a).__name__ for a in args)} (only bytes are copied).")

  def build(self) -> None:
    state = self.pop()
    target = self.top()
    if not isinstance(target, _Pending) or target.state is not None:
      raise FileError(
          f"refused: BUILD on a {type(target).__name__}, not a fresh MXNet"
          " object.")
    if not isinstance(state, dict) or not all(type(k) is str for k in state):
      raise FileError(
          f"corrupted: the pickled {target.where.name} has state"
          f" {type(state).__name__}, expected a dict of attributes.")
    target.state = state
    if target.where == _NDARRAY:
      handle = state.get("handle")
      if not isinstance(handle, bytes):
        raise FileError(
            "corrupted: a pickled NDArray has no data (handle"
            f" {type(handle).__name__}).")
      self.budget.charge(_OBJECT + len(handle))
      target.array = self.decode_array(handle)

  def memoize(self, index: int) -> None:
    if index != len(self.memo):
      raise FileError(
          f"refused: memo index {index} out of order (expected {len(self.memo)}).")
    if not self.stack:
      raise FileError("corrupted pickle: nothing to memoise.")
    self.budget.charge(_REFERENCE)
    self.memo.append(self.stack[-1])

  def get(self, index: int) -> None:
    if not 0 <= index < len(self.memo):
      raise FileError(f"corrupted pickle: memo index {index} never set.")
    value = self.memo[index]
    if id(value) not in self.shared:
      self.budget.charge(_SHARED)
      self.shared.add(id(value))
    self.push(value)


_OPCODE_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}


def _name(code: int) -> str:
  """An opcode byte as messages name it."""
  return f"{_OPCODE_NAMES.get(code, 'unknown')} (0x{code:02X})"


def _number(fmt: str) -> _Handler:
  def load(machine: _Machine) -> None:
    machine.budget.charge(_NUMBER)
    machine.push(machine.unpack(fmt, "a number"))
  return load


def _long1(machine: _Machine) -> None:
  size = machine.unpack("<B", "LONG1's length")
  if size > _MAX_LONG_BYTES:
    raise FileError(f"refused: an integer of {size} bytes (wider than 64 bits).")
  machine.budget.charge(_NUMBER)
  machine.push(int.from_bytes(machine.read(size, "LONG1"), "little", signed=True))


def _text(length_format: str) -> _Handler:
  def load(machine: _Machine) -> None:
    raw = machine.payload(length_format, "a string", _PER_BYTE)
    try:
      machine.push(raw.decode("utf-8"))
    except UnicodeDecodeError:
      raise FileError(
          f"corrupted pickle: a string before offset {machine.position} is not"
          " UTF-8.") from None
  return load


def _bytes(length_format: str) -> _Handler:
  def load(machine: _Machine) -> None:
    machine.push(machine.payload(length_format, "bytes", 1))
  return load


def _constant(value: Any) -> _Handler:
  def load(machine: _Machine) -> None:
    machine.push(value)
  return load


def _empty(kind: Callable[[], Any], cost: int) -> _Handler:
  def load(machine: _Machine) -> None:
    machine.budget.charge(cost)
    machine.push(kind())
  return load


def _tuple_of(size: int) -> _Handler:
  def load(machine: _Machine) -> None:
    items = [machine.pop() for _ in range(size)]
    machine.new_tuple(items[::-1])
  return load


def _memoize_at(fmt: str | None) -> _Handler:
  def load(machine: _Machine) -> None:
    machine.memoize(len(machine.memo) if fmt is None
                    else machine.unpack(fmt, "a memo index"))
  return load


def _get_at(fmt: str) -> _Handler:
  def load(machine: _Machine) -> None:
    machine.get(machine.unpack(fmt, "a memo index"))
  return load


def _mark(machine: _Machine) -> None:
  machine.budget.charge(_REFERENCE)
  machine.marks.append(len(machine.stack))


def _setitem(machine: _Machine) -> None:
  value = machine.pop()
  key = machine.pop()
  machine.set_items([key, value])


def _append(machine: _Machine) -> None:
  machine.append([machine.pop()])


def _global(machine: _Machine) -> None:
  module = machine.line("GLOBAL's module")
  machine.global_(module, machine.line("GLOBAL's name"))


def _stack_global(machine: _Machine) -> None:
  name = machine.pop()
  machine.global_(machine.pop(), name)


def _frame(machine: _Machine) -> None:
  size = machine.unpack("<Q", "FRAME's length")
  if size > len(machine.data) - machine.position:
    raise FileError(
        f"truncated or corrupted pickle: a frame of {size} bytes at offset"
        f" {machine.position}, {len(machine.data) - machine.position} left.")


# Opcode byte -> handler, as in CPython's pickle._Unpickler: only the opcodes
# MXNet's pickles hold. A handler returns True at STOP.
_DISPATCH: dict[int, _Handler] = {
    pickle.BININT1[0]: _number("<B"), pickle.BININT2[0]: _number("<H"),
    pickle.BININT[0]: _number("<i"), pickle.LONG1[0]: _long1,
    pickle.BINFLOAT[0]: _number(">d"),
    pickle.SHORT_BINUNICODE[0]: _text("<B"), pickle.BINUNICODE[0]: _text("<I"),
    pickle.BINUNICODE8[0]: _text("<Q"),
    pickle.SHORT_BINBYTES[0]: _bytes("<B"), pickle.BINBYTES[0]: _bytes("<I"),
    pickle.BINBYTES8[0]: _bytes("<Q"),
    pickle.NONE[0]: _constant(None), pickle.NEWTRUE[0]: _constant(True),
    pickle.NEWFALSE[0]: _constant(False), pickle.EMPTY_TUPLE[0]: _constant(()),
    pickle.EMPTY_LIST[0]: _empty(list, _OBJECT),
    pickle.EMPTY_DICT[0]: _empty(dict, _DICT),
    pickle.MARK[0]: _mark,
    pickle.TUPLE[0]: lambda m: m.new_tuple(m.pop_mark()),
    pickle.TUPLE1[0]: _tuple_of(1), pickle.TUPLE2[0]: _tuple_of(2),
    pickle.TUPLE3[0]: _tuple_of(3),
    pickle.SETITEM[0]: _setitem,
    pickle.SETITEMS[0]: lambda m: m.set_items(m.pop_mark()),
    pickle.APPEND[0]: _append,
    pickle.APPENDS[0]: lambda m: m.append(m.pop_mark()),
    pickle.MEMOIZE[0]: _memoize_at(None), pickle.BINPUT[0]: _memoize_at("<B"),
    pickle.LONG_BINPUT[0]: _memoize_at("<I"),
    pickle.BINGET[0]: _get_at("<B"), pickle.LONG_BINGET[0]: _get_at("<I"),
    pickle.GLOBAL[0]: _global, pickle.STACK_GLOBAL[0]: _stack_global,
    pickle.REDUCE[0]: lambda m: m.call("REDUCE"),
    pickle.NEWOBJ[0]: lambda m: m.call("NEWOBJ"),
    pickle.BUILD[0]: lambda m: m.build(),
    pickle.FRAME[0]: _frame,
    pickle.STOP[0]: lambda m: True,
}


class _Finisher:
  """Turns the machine's graph into the result, in place where it can: each
  object visited once per occurrence (shared ones once), NDArrays replaced
  by their arrays, records by :class:`PickledObject`; the tree's size is
  charged to the budget."""

  def __init__(self, budget: Budget, shared: set[int]):
    self.budget = budget
    self.shared = shared
    self.done: dict[int, tuple[Any, int]] = {}  # id -> (result, tree cost)
    self.active: set[int] = set()

  def finish(self, value: Any, depth: int = 0) -> tuple[Any, int]:
    """``value`` finished, and its cost as a tree."""
    if value is None or type(value) is bool:
      return value, _REFERENCE
    if type(value) in (int, float):
      return value, _NUMBER
    if type(value) is bytes or (type(value) is str and value.isascii()):
      return value, _REFERENCE + _PER_BYTE * len(value)
    if type(value) is str:
      return value, _REFERENCE + _PER_CHARACTER * len(value)
    key = id(value)
    if key in self.done:
      return self.done[key]
    if key in self.active:
      raise FileError("refused: an object in the pickle contains itself.")
    if depth >= _MAX_DEPTH:
      raise FileError(
          f"refused: objects nested deeper than {_MAX_DEPTH} (MXNet's files"
          " nest a few levels).")
    shared = key in self.shared
    if shared:  # only shared objects can be reached twice, or from inside
      self.active.add(key)
    result, cost = self.convert(value, depth + 1)
    if cost > self.budget.left:
      self.budget.charge(cost)  # refused
    if shared:
      self.active.discard(key)
      self.done[key] = result, cost
    return result, cost

  def convert(self, value: Any, depth: int) -> tuple[Any, int]:
    if isinstance(value, _Global):  # a tuple too: first
      raise FileError(
          f"refused: a bare reference to {value.module}.{value.name}.")
    if type(value) is list:
      total = _REFERENCE
      for i, item in enumerate(value):
        result, cost = self.finish(item, depth)
        value[i] = result
        total += cost
      return value, total
    if type(value) is tuple:
      finished = [self.finish(item, depth) for item in value]
      total = _REFERENCE + sum(cost for _, cost in finished)
      if all(r is item for (r, _), item in zip(finished, value, strict=True)):
        return value, total
      self.budget.charge(_OBJECT + _REFERENCE * len(value))
      return tuple(r for r, _ in finished), total
    if type(value) is dict:
      total = _REFERENCE
      for k in value:  # values replaced in place: the keys stay
        result, cost = self.finish(value[k], depth)
        value[k] = result
        total += cost + self.finish(k)[1]
      return value, total
    if isinstance(value, _Pending):
      if value.state is None:
        raise FileError(
            f"corrupted: a pickled {value.where.name} without its state.")
      if value.where == _NDARRAY:
        array = value.array
        return array, (_OBJECT + _PER_ARRAY_BYTE * array.nbytes
                       + _PER_ARRAY_DIMENSION * array.ndim * array.size)
      attributes, cost = self.finish(value.state, depth)
      self.budget.charge(_RECORD)
      return PickledObject(f"{value.where.module}.{value.where.name}",
                           attributes), _RECORD + cost
    raise AssertionError(f"unexpected {type(value).__name__}")


def load_mxnet_pickle(data: bytes, decode_array: Callable[[bytes], Any]) -> Any:
  """The object an MXNet pickle holds, NDArrays decoded by ``decode_array``.

  Raises:
    FileError: for anything but a pickle of what MXNet writes, or one that
      needs more than its budget; also for any warning raised while reading.
  """
  budget = Budget(len(data))
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      machine = _Machine(data, budget, decode_array)
      finisher = _Finisher(budget, machine.shared)
      result, cost = finisher.finish(machine.run())
      budget.charge(cost)
  except Warning as e:
    raise FileError(
        f"refused: reading it raised {type(e).__name__}"
        f" {quoted(str(e))}.") from None
  return result
