"""A pickle reader for MXNet's trainer-state files that runs nothing in them.

``pickle.Unpickler`` cannot be made safe for files from strangers by an
allow-list alone: its C core hashes and recurses into whatever the file
builds (a tuple nested 200,000 deep kills the interpreter), allocates memo
tables to indices the file names, and serves ``copyreg`` extensions without
asking. So the opcodes are read here (``pickletools.genops``) and executed by
a small stack machine that knows only what MXNet writes (pickle protocols 2
to 4, as Python 3 writes them): scalars, strings, bytes, lists, tuples,
dicts with integer or string keys, and MXNet's NDArray, optimizer and
scheduler classes, which become inert records. Nothing from the file is ever
called, hashed (beyond its integer and string keys) or printed, and no object
outliving the load can be reached from it.

Every cost is bounded by the file's size: each opcode does constant work
besides copying its own argument, memo indices must come in order, arrays
decoded and bytes derived may not exceed twice the file, and the result
(a graph, since the memo lets the file share an object) is walked once per
object, refused if deeper than ``_MAX_DEPTH`` or if, as a tree, it would have
more than ``_ELEMENTS_PER_OPCODE`` times the opcodes' elements.
"""

from __future__ import annotations

import math
import pickletools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

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
_ELEMENTS_PER_OPCODE = 4
_DERIVED_BYTES_PER_FILE_BYTE = 2
# LONG1 integers MXNet writes are counts: 8 bytes hold any of them.
_MAX_LONG_BYTES = 8
_MAX_COUNT = 2**31  # MXNet's update counts and indices are int32
_MISSING = object()


class FileError(ValueError):
  """An MXNet file that cannot be read: corrupted, truncated, unsupported or
  (for pickles) holding something MXNet's files do not hold."""


class PickledObject:
  """An inert record of a pickled MXNet object (an optimizer or a learning-rate
  scheduler): its class and attributes, nothing executable.

  Attributes:
    mxnet_class: the pickled class, e.g. ``"mxnet.optimizer.optimizer.FTML"``.
    attributes: the object's pickled ``__dict__``: plain Python values, NumPy
      arrays and nested :class:`PickledObject` records.
  """

  def __init__(self, mxnet_class: str, attributes: dict[str, Any] | None = None):
    self.mxnet_class = mxnet_class
    self.attributes: dict[str, Any] = {} if attributes is None else attributes

  @property
  def class_name(self) -> str:
    """The class name without its module, e.g. ``"FTML"``."""
    return self.mxnet_class.rpartition(".")[2]

  def __repr__(self) -> str:
    return f"PickledObject({self.mxnet_class}, {self.attributes!r})"


def _describe(value: Any) -> str:
  """``value`` for an error message, in bounded length."""
  if type(value) is int and value.bit_length() > 64:
    return f"an integer of {value.bit_length()} bits"
  if type(value) in (int, float, bool) or value is None:
    return repr(value)
  if isinstance(value, str):
    return repr(value[:40]) + ("..." if len(value) > 40 else "")
  return f"a {type(value).__name__}"


class RecordFields:
  """Reads a pickled record's attributes, each checked against the range
  MXNet's constructors enforce; a failure names the attribute."""

  def __init__(self, record: PickledObject):
    self.name = record.class_name
    self.attributes = record.attributes

  def error(self, key: str, value: Any, expected: str) -> FileError:
    return FileError(
        f"the pickled {self.name}'s {key} is {_describe(value)}; MXNet's"
        f" {self.name} has {expected}.")

  def get(self, key: str) -> Any:
    if key not in self.attributes:
      raise FileError(
          f"the pickled {self.name} lacks the attribute {key!r}; it was not"
          " written by MXNet.")
    return self.attributes[key]

  def real(self, key: str, low: float = -math.inf, high: float = math.inf,
           low_open: bool = False, value: Any = _MISSING) -> float:
    """A real number (a Python int or float: not a bool, string, array or
    record) in the range."""
    value = self.get(key) if value is _MISSING else value
    if (type(value) not in (int, float) or abs(value) >= 2**64
        or not math.isfinite(value)
        or not (low < value if low_open else low <= value) or value > high):
      bracket = "(" if low_open else "["
      raise self.error(key, value, f"a real number in {bracket}{low}, {high}]")
    return value

  def count(self, key: str, low: int = 0, value: Any = _MISSING) -> int:
    """An integer in ``[low, 2**31)``."""
    value = self.get(key) if value is _MISSING else value
    if type(value) is not int or not low <= value < _MAX_COUNT:
      raise self.error(key, value, f"an integer in [{low}, 2**31)")
    return value

  def of_type(self, key: str, kind: type, default: Any = _MISSING) -> Any:
    """An attribute of exactly this type (``default`` if absent)."""
    if default is not _MISSING and key not in self.attributes:
      return default
    value = self.get(key)
    if type(value) is not kind:
      raise self.error(key, value, f"a {kind.__name__}")
    return value


class _Global(NamedTuple):
  """A class or function the file names: never resolved, only recognised."""
  module: str
  name: str


class _Pending:
  """A record or NDArray made by REDUCE or NEWOBJ, whose state BUILD gives."""

  def __init__(self, where: _Global):
    self.where = where
    self.state: dict[str, Any] | None = None
    self.array: Any = None


def _allowed(where: _Global) -> bool:
  module, name = where
  return (where == _NDARRAY or where in _BYTEARRAYS or where == _ENCODE
          or (module in OPTIMIZER_MODULES and name in _OPTIMIZER_CLASSES)
          or (module == _SCHEDULER_MODULE and name in _SCHEDULER_CLASSES))


class _Machine:
  """Executes the opcodes MXNet's pickles hold; see the module docstring."""

  def __init__(self, size: int, decode_array: Callable[[bytes], Any]):
    self.stack: list[Any] = []
    self.marks: list[int] = []
    self.memo: list[Any] = []
    self.derived_budget = _DERIVED_BYTES_PER_FILE_BYTE * size
    self.decode_array = decode_array

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

  def derive(self, size: int) -> None:
    self.derived_budget -= size
    if self.derived_budget < 0:
      raise FileError(
          "refused: the pickle's bytes are used more than once (decoded data"
          " would exceed twice the file's size).")

  def call(self, where: Any, args: Any, opcode: str) -> Any:
    """REDUCE and NEWOBJ: only the allowed globals, with MXNet's arguments."""
    if not isinstance(where, _Global) or type(args) is not tuple:
      raise FileError(f"refused: {opcode} of a {type(where).__name__}.")
    if where in _BYTEARRAYS or where == _ENCODE:
      return self.bytes_of(where, args)
    if args not in ((), (None,)):
      raise FileError(
          f"refused: {where.module}.{where.name} called with arguments.")
    return _Pending(where)

  def bytes_of(self, where: _Global, args: tuple[Any, ...]) -> bytes:
    if len(args) == 1 and isinstance(args[0], bytes) and where != _ENCODE:
      return args[0]
    if (len(args) == 2 and isinstance(args[0], str)
        and args[1] in ("latin1", "latin-1")):
      self.derive(len(args[0]))
      try:
        return args[0].encode("latin-1")
      except UnicodeEncodeError:
        raise FileError("corrupted pickle: bytes beyond latin-1.") from None
    if not args and where != _ENCODE:
      return b""
    raise FileError(
        f"refused: {where.module}.{where.name} of"
        f" {', '.join(type(a).__name__ for a in args)} (only bytes are copied).")

  def build(self, target: Any, state: Any) -> None:
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
      self.derive(len(handle))
      target.array = self.decode_array(handle)

  def set_items(self, target: Any, items: list[Any]) -> None:
    if not isinstance(target, dict) or len(items) % 2:
      raise FileError("corrupted pickle: SETITEMS needs a dict and pairs.")
    for key, value in zip(items[::2], items[1::2], strict=True):
      # Only keys whose hash costs their length, and no bools: MXNet's keys
      # are parameter indices and names.
      if type(key) not in (int, str):
        raise FileError(
            f"refused: a dict key of type {type(key).__name__} (MXNet's keys"
            " are integers and strings).")
      target[key] = value

  def append(self, target: Any, items: list[Any]) -> None:
    if not isinstance(target, list):
      raise FileError("corrupted pickle: APPENDS needs a list.")
    target.extend(items)

  def memoize(self, index: int) -> None:
    if index != len(self.memo):
      raise FileError(
          f"refused: memo index {index} out of order (expected {len(self.memo)}).")
    if not self.stack:
      raise FileError("corrupted pickle: nothing to memoise.")
    self.memo.append(self.stack[-1])

  def get(self, index: int) -> None:
    if not 0 <= index < len(self.memo):
      raise FileError(f"corrupted pickle: memo index {index} never set.")
    self.stack.append(self.memo[index])

  def global_(self, module: Any, name: Any) -> None:
    if not (isinstance(module, str) and isinstance(name, str)):
      raise FileError("corrupted pickle: a global named by non-strings.")
    where = _Global(module, name)
    if not _allowed(where):
      raise FileError(
          f"refused to load {module[:200]}.{name[:200]}: MXNet trainer-state"
          " files hold only NDArrays, MXNet optimizers and MXNet learning-rate"
          " schedulers, and nothing else is loaded from them (a pickle can run"
          " arbitrary code). A custom scheduler or optimizer class cannot be"
          " read.")
    self.stack.append(where)

  def step(self, name: str, arg: Any) -> None:
    """One opcode: every opcode MXNet's pickles hold, and no other."""
    if name in _ARGUMENTS:
      if name == "LONG1" and arg.bit_length() > 8 * _MAX_LONG_BYTES:
        raise FileError("refused: an integer wider than 64 bits.")
      self.stack.append(arg)
    elif name in _NEW:
      self.stack.append(_NEW[name]())
    elif name == "MARK":
      self.marks.append(len(self.stack))
    elif name == "TUPLE":
      self.stack.append(tuple(self.pop_mark()))
    elif name in _TUPLE_SIZES:
      items = [self.pop() for _ in range(_TUPLE_SIZES[name])]
      self.stack.append(tuple(reversed(items)))
    elif name == "SETITEM":
      value = self.pop()
      key = self.pop()
      self.set_items(self.top(), [key, value])
    elif name == "SETITEMS":
      items = self.pop_mark()
      self.set_items(self.top(), items)
    elif name == "APPEND":
      value = self.pop()
      self.append(self.top(), [value])
    elif name == "APPENDS":
      items = self.pop_mark()
      self.append(self.top(), items)
    else:
      self.step_objects(name, arg)

  def step_objects(self, name: str, arg: Any) -> None:
    if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
      self.memoize(len(self.memo) if name == "MEMOIZE" else arg)
    elif name in ("GET", "BINGET", "LONG_BINGET"):
      self.get(arg)
    elif name == "GLOBAL":
      module, _, qualified = arg.partition(" ")
      self.global_(module, qualified)
    elif name == "STACK_GLOBAL":
      qualified = self.pop()
      self.global_(self.pop(), qualified)
    elif name in ("REDUCE", "NEWOBJ"):
      args = self.pop()
      self.stack.append(self.call(self.pop(), args, name))
    elif name == "BUILD":
      state = self.pop()
      self.build(self.top(), state)
    elif name != "FRAME":
      raise FileError(
          f"refused: pickle opcode {name}, which MXNet's files never hold.")


_ARGUMENTS = frozenset({
    "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "SHORT_BINUNICODE",
    "BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"})
_NEW: dict[str, Callable[[], Any]] = {
    "NONE": lambda: None, "NEWTRUE": lambda: True, "NEWFALSE": lambda: False,
    "EMPTY_DICT": dict, "EMPTY_LIST": list, "EMPTY_TUPLE": tuple}
_TUPLE_SIZES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


class _Finisher:
  """Turns the machine's graph into the result: each object visited once,
  NDArrays replaced by their arrays, records by :class:`PickledObject`."""

  def __init__(self, max_elements: int):
    self.max_elements = max_elements
    self.done: dict[int, tuple[Any, int]] = {}  # id -> (result, tree size)
    self.active: set[int] = set()

  def finish(self, value: Any, depth: int = 0) -> tuple[Any, int]:
    if value is None or type(value) in (bool, int, float, str, bytes):
      return value, 1
    key = id(value)
    if key in self.done:
      return self.done[key]
    if key in self.active:
      raise FileError("refused: an object in the pickle contains itself.")
    if depth >= _MAX_DEPTH:
      raise FileError(
          f"refused: objects nested deeper than {_MAX_DEPTH} (MXNet's files"
          " nest a few levels).")
    self.active.add(key)
    result, size = self.convert(value, depth + 1)
    self.active.discard(key)
    if size > self.max_elements:
      raise FileError(
          f"refused: the pickle's shared references expand to more than"
          f" {self.max_elements} elements.")
    self.done[key] = result, size
    return result, size

  def convert(self, value: Any, depth: int) -> tuple[Any, int]:
    if isinstance(value, _Global):  # a tuple too: first
      raise FileError(
          f"refused: a bare reference to {value.module}.{value.name}.")
    if type(value) in (list, tuple):
      finished = [self.finish(v, depth) for v in value]
      return (type(value)(r for r, _ in finished),
              1 + sum(n for _, n in finished))
    if isinstance(value, dict):
      finished = {k: self.finish(v, depth) for k, v in value.items()}
      return ({k: r for k, (r, _) in finished.items()},
              1 + sum(n for _, n in finished.values()))
    if isinstance(value, _Pending):
      if value.state is None:
        raise FileError(
            f"corrupted: a pickled {value.where.name} without its state.")
      if value.where == _NDARRAY:
        return value.array, 1
      attributes, size = self.finish(value.state, depth)
      return PickledObject(f"{value.where.module}.{value.where.name}",
                         attributes), 1 + size
    raise AssertionError(f"unexpected {type(value).__name__}")


def load_mxnet_pickle(data: bytes, decode_array: Callable[[bytes], Any]) -> Any:
  """The object an MXNet pickle holds, NDArrays decoded by ``decode_array``.

  Raises:
    FileError: for anything but a pickle of what MXNet writes.
  """
  machine = _Machine(len(data), decode_array)
  opcodes = 0
  end = -1
  try:
    for opcode, arg, position in pickletools.genops(data):
      if opcodes == 0 and (opcode.name != "PROTO" or arg not in _PROTOCOLS):
        raise FileError(
            "not a pickle MXNet writes: expected pickle protocol 2 to 4"
            f" (Python 3), got {opcode.name}"
            f"{f' {arg}' if opcode.name == 'PROTO' else ''}.")
      opcodes += 1
      if opcode.name == "STOP":
        end = position + 1  # pyright: ignore[reportOptionalOperand]
      elif opcode.name != "PROTO":
        machine.step(opcode.name, arg)
  except (ValueError, UnicodeDecodeError) as e:
    if isinstance(e, FileError):
      raise
    raise FileError(f"truncated or corrupted pickle ({e}).") from None
  if end != len(data):
    raise FileError(
        f"corrupted: {len(data) - end} bytes after the pickle's end.")
  if len(machine.stack) != 1 or machine.marks:
    raise FileError("corrupted pickle: it does not end with one object.")
  return _Finisher(_ELEMENTS_PER_OPCODE * opcodes).finish(machine.stack[0])[0]
