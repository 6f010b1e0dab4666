"""MXNet files generated from a grammar, fed to the readers one per forked
child under warnings-as-errors, an address-space limit and an alarm.

Unlike tests/hostile_files.py, which mutates recorded fixtures, this builds
files from scratch: trainer-state pickles (protocols 2 to 4, MXNet's opcodes
and records: NDArrays as ``{'handle': bytearray}``, optimizer and scheduler
classes, dicts, lists, tuples, memo sharing, framing), ``.params`` files in
MXNet's NDArray list format and ``.npz`` archives (stored, deflated,
encrypted-flagged, zip64, overlapping members), with random shapes, nesting,
sharing and sizes. A well-formed file comes with the value it encodes, which
the reader must return exactly; any other file must be read or refused with
``optax_ftml.mxnet.FileError``, within ``SECONDS_PER_BYTE`` (CPU time) and
``RESIDENT_BYTES_PER_BYTE`` times its size (plus a fixed overhead; resident
growth is the child's peak resident set over its start), without changing the
reader modules, ``sys.modules`` or the warning filters, and with an error
message of printable ASCII shorter than ``MAX_MESSAGE``.
tests/test_generated_files.py runs 700 inputs; a longer run is

  python -W error tests/file_grammar.py --seed 1 --seconds 3600

Each input prints one JSON line (its seed and index, which regenerate it, the
reader, the grammar's kind, size, outcome, message, CPU seconds, resident growth
and any violated bound); the last line counts the outcomes. The process exits
1 if any input escaped.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import pickle
import random
import resource
import signal
import struct
import sys
import time
import warnings
import zipfile
from typing import Any
from typing import NamedTuple

import ml_dtypes
import numpy as np

from optax_ftml import mxnet
from optax_ftml.mxnet import _files
from optax_ftml.mxnet import _pickle

# Safety bounds per input, far above what a linear reader takes: what they
# catch is work or memory growing faster than the file.
SECONDS_PER_BYTE = 20e-6
SECONDS_OVERHEAD = 2.0
RESIDENT_BYTES_PER_BYTE = 64
RESIDENT_OVERHEAD = 24 << 20
MAX_MESSAGE = 600
ADDRESS_SPACE_HEADROOM = 2 << 30

DTYPE_FLAGS = {
    0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32,
    5: np.int8, 6: np.int64, 7: np.bool_, 8: np.int16, 9: np.uint16,
    10: np.uint32, 11: np.uint64, 12: ml_dtypes.bfloat16}
MAGIC_V1, MAGIC_V2, MAGIC_V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
OPTIMIZERS = [("mxnet.optimizer.optimizer", name) for name in (
    "Optimizer", "SGD", "Signum", "FTML", "LARS", "LBSGD", "LAMB", "DCASGD",
    "NAG", "SGLD", "ccSGD", "Adam", "AdaGrad", "RMSProp", "AdaDelta", "Ftrl",
    "Adamax", "Nadam")] + [("mxnet.optimizer.ftml", "FTML")]
SCHEDULERS = [("mxnet.lr_scheduler", name) for name in (
    "LRScheduler", "FactorScheduler", "MultiFactorScheduler", "PolyScheduler",
    "CosineScheduler")]
# Names the reader must refuse: near misses of its allow-list.
STRANGERS = [("builtins", "eval"), ("os", "system"), ("numpy", "ndarray"),
             ("mxnet.optimizer.optimizer", "register"), ("_codecs", "decode"),
             ("mxnet.ndarray.ndarray", "array"), ("copyreg", "_reconstructor"),
             ("mxnet.lr_scheduler", "logging"), ("__builtin__", "eval")]
ATTRIBUTES = ["lr", "wd", "beta1", "beta2", "epsilon", "rescale_grad",
              "clip_gradient", "num_update", "lr_scheduler", "idx2name",
              "lr_mult", "wd_mult", "_index_update_count", "base_lr", "step",
              "factor", "multi_precision", "param_dict", "begin_num_update"]


# --- The values a file holds ------------------------------------------------

class Array:
  """An NDArray: the array and how its header spells it."""

  def __init__(self, array: np.ndarray, flag: int, magic: int):
    self.array, self.flag, self.magic = array, flag, magic


class Record:
  """An optimizer or scheduler: ``module.name`` with attributes."""

  def __init__(self, module: str, name: str, attributes: dict[str, Any]):
    self.module, self.name, self.attributes = module, name, attributes


class Blob:
  """``bytearray(data)``, which the reader returns as bytes."""

  def __init__(self, data: bytes):
    self.data = data


def log_uniform(rng: random.Random, high: int) -> int:
  """An integer in ``[0, high]``, small ones as likely as large ones."""
  return min(high, int(math.exp(rng.uniform(0, math.log(high + 1)))) - 1)


def random_array(rng: random.Random, max_elements: int = 64) -> Array:
  flag = rng.choice(list(DTYPE_FLAGS))
  dtype = np.dtype(DTYPE_FLAGS[flag])
  ndim = rng.choice([0, 1, 1, 2, 2, 3, 4])
  shape = [rng.randint(0, 4) for _ in range(ndim)]
  while math.prod(shape) > max_elements:
    shape[rng.randrange(ndim)] //= 2
  raw = rng.randbytes(math.prod(shape) * dtype.itemsize)
  array = np.frombuffer(raw, dtype).reshape(shape)
  if dtype == np.bool_:
    array = array.view(np.uint8).astype(bool)
  # MXNet's classic semantics (V2) cannot say "no dims"; NumPy's (V3) can.
  magic = MAGIC_V3 if not shape or rng.random() < 0.5 else MAGIC_V2
  return Array(array, flag, magic)


def random_text(rng: random.Random, low: int = 0, high: int = 12) -> str:
  alphabet = rng.choice(["abcdefghij_.", "\x00\x7f\xe9\xff", "\u0100\u20ac\U0001F600"])
  return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def random_scalar(rng: random.Random) -> Any:
  kind = rng.randrange(9)
  if kind == 0:
    return rng.choice([None, True, False])
  if kind == 1:
    return rng.randint(-300, 70_000)
  if kind == 2:
    return rng.randint(-2**63, 2**63 - 1)
  if kind == 3:
    return rng.choice([0.0, -0.0, 1e-300, 1e300, math.inf, -math.inf,
                       rng.uniform(-10, 10)])
  if kind == 4:
    return random_text(rng)
  if kind == 5:
    return rng.randbytes(rng.randint(0, 20))
  if kind == 6:
    return Blob(rng.randbytes(rng.randint(0, 20)))
  return rng.randint(0, 2**31 - 1)


class ValueGrammar:
  """Random values of what MXNet's pickles hold, with shared references."""

  def __init__(self, rng: random.Random, max_depth: int, sharing: float):
    self.rng = rng
    self.max_depth = max_depth
    self.sharing = sharing
    self.made: list[Any] = []  # containers that may be referred to again

  def value(self, depth: int) -> Any:
    rng = self.rng
    if self.made and rng.random() < self.sharing:
      return rng.choice(self.made)
    if depth >= self.max_depth or rng.random() < 0.35:
      return random_array(rng) if rng.random() < 0.2 else random_scalar(rng)
    kind = rng.choice(["list", "tuple", "dict", "record", "array"])
    if kind == "array":
      made: Any = random_array(rng)
    elif kind == "record":
      module, name = rng.choice(OPTIMIZERS + SCHEDULERS)
      made = Record(module, name, self.attributes(depth + 2))
    elif kind == "dict":
      made = {self.key(): self.value(depth + 1)
              for _ in range(log_uniform(rng, 6))}
    else:
      items = [self.value(depth + 1) for _ in range(log_uniform(rng, 6))]
      made = items if kind == "list" else tuple(items)
    self.made.append(made)
    return made

  def key(self) -> int | str:
    return (self.rng.randint(-5, 2**31 - 1) if self.rng.random() < 0.5
            else random_text(self.rng))

  def attributes(self, depth: int) -> dict[str, Any]:
    names = self.rng.sample(ATTRIBUTES, self.rng.randint(0, 6))
    return {name: self.value(depth) for name in names}

  def trainer_states(self) -> Any:
    """Gluon's ``(states, optimizer)`` or the Module API's ``states``."""
    states = {self.rng.randint(0, 40): self.state()
              for _ in range(log_uniform(self.rng, 8))}
    if self.rng.random() < 0.3:
      return states
    module, name = self.rng.choice(OPTIMIZERS)
    return (states, Record(module, name, self.attributes(2)))

  def state(self) -> Any:
    """FTML's ``(d, v, z)`` most of the time, any value otherwise."""
    if self.rng.random() < 0.6:
      shape_source = random_array(self.rng)
      return tuple(Array(np.zeros_like(shape_source.array), shape_source.flag,
                         shape_source.magic) for _ in range(3))
    return self.value(1)


class ExpectedRecord(NamedTuple):
  """The :class:`mxnet.PickledObject` a :class:`Record` reads as."""
  mxnet_class: str
  attributes: dict[str, Any]


def expected(value: Any) -> Any:
  """What the reader returns for ``value``: arrays, records and bytes."""
  if isinstance(value, Array):
    return value.array
  if isinstance(value, Blob):
    return value.data
  if isinstance(value, Record):
    return ExpectedRecord(f"{value.module}.{value.name}",
                          expected(value.attributes))
  if isinstance(value, dict):
    return {k: expected(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(expected(v) for v in value)
  return value


def tree_size(value: Any) -> int:
  """Elements of ``value`` as a tree: shared objects counted each time."""
  if isinstance(value, Record):
    return 1 + tree_size(value.attributes)
  if isinstance(value, dict):
    return 1 + sum(tree_size(v) for v in value.values())
  if isinstance(value, (list, tuple)):
    return 1 + sum(tree_size(v) for v in value)
  return 1


def same(read: Any, model: Any) -> bool:
  """Whether the reader's result is the model's, arrays by dtype and bytes."""
  if isinstance(model, np.ndarray):
    return (isinstance(read, np.ndarray) and read.dtype == model.dtype
            and read.shape == model.shape and read.tobytes() == model.tobytes())
  if isinstance(model, ExpectedRecord):
    return (isinstance(read, mxnet.PickledObject)
            and read.mxnet_class == model.mxnet_class
            and same(read.attributes, model.attributes))
  if isinstance(model, dict):
    return (type(read) is dict and list(read) == list(model)
            and all(same(read[k], v) for k, v in model.items()))
  if isinstance(model, (list, tuple)):
    return (type(read) is type(model) and len(read) == len(model)
            and all(same(r, m) for r, m in zip(read, model, strict=True)))
  if isinstance(model, float) and math.isnan(model):
    return isinstance(read, float) and math.isnan(read)
  return type(read) is type(model) and read == model


# --- Bytes ------------------------------------------------------------------

def array_record(array: Array) -> bytes:
  """One array in ``NDArray::Save``'s format."""
  shape = array.array.shape
  return (struct.pack("<IIi", array.magic, 0, len(shape))
          + struct.pack(f"<{len(shape)}q", *shape) + struct.pack("<ii", 1, 0)
          + struct.pack("<i", array.flag) + array.array.tobytes())


class PickleWriter:
  """Writes a value with the opcodes Python 3's pickle uses for MXNet's
  objects at ``protocol``, choosing randomly among equivalent spellings
  (opcode widths, APPEND or APPENDS, memoising or not, framing)."""

  def __init__(self, rng: random.Random, protocol: int):
    self.rng, self.protocol = rng, protocol
    self.out = bytearray()
    self.memo: dict[int, int] = {}
    self.slots = 0
    self.alive: list[Any] = []  # keeps the memoised objects' ids unique

  def dumps(self, value: Any) -> bytes:
    self.write(value)
    self.out += b"."
    frame = (b"\x95" + struct.pack("<Q", len(self.out))
             if self.protocol >= 4 and self.rng.random() < 0.7 else b"")
    return b"\x80" + bytes([self.protocol]) + frame + bytes(self.out)

  def memoize(self, value: Any) -> None:
    if self.rng.random() < 0.15:
      return  # pickle memoises everything; a writer need not
    self.memo[id(value)] = self.slots
    self.alive.append(value)
    self.slot()

  def slot(self) -> None:
    """The top of the stack memoised at the next index."""
    index = self.slots
    self.slots += 1
    if self.protocol >= 4 and self.rng.random() < 0.8:
      self.out += b"\x94"
    elif index < 256 and self.rng.random() < 0.8:
      self.out += b"q" + bytes([index])
    else:
      self.out += b"r" + struct.pack("<I", index)

  def get(self, index: int) -> None:
    self.out += (b"h" + bytes([index]) if index < 256 and self.rng.random() < 0.8
                 else b"j" + struct.pack("<I", index))

  def write(self, value: Any) -> None:
    if id(value) in self.memo:
      self.get(self.memo[id(value)])
      return
    if value is None or type(value) is bool:
      self.out += {None: b"N", True: b"\x88", False: b"\x89"}[value]
    elif type(value) is int:
      self.int_(value)
    elif type(value) is float:
      self.out += b"G" + struct.pack(">d", value)
    elif type(value) is str:
      self.str_(value)
    elif type(value) is bytes:
      self.bytes_(value)
    elif isinstance(value, Blob):
      self.global_(*(("builtins" if self.protocol >= 3 else "__builtin__"),
                     "bytearray"))
      self.bytes_(value.data)
      self.out += b"\x85R"
      self.memoize(value)
    elif isinstance(value, Array):
      self.global_("mxnet.ndarray.ndarray", "NDArray")
      self.out += b"N\x85R"
      self.memoize(value)
      self.write({"handle": Blob(array_record(value))})
      self.out += b"b"
    elif isinstance(value, Record):
      self.global_(value.module, value.name)
      self.out += b")\x81"
      self.memoize(value)
      self.write(value.attributes)
      self.out += b"b"
    else:
      self.container(value)

  def container(self, value: Any) -> None:
    if type(value) is tuple:
      if len(value) <= 3 and self.rng.random() < 0.8:
        for item in value:
          self.write(item)
        self.out += [b")", b"\x85", b"\x86", b"\x87"][len(value)]
      else:
        self.out += b"("
        for item in value:
          self.write(item)
        self.out += b"t"
      if id(value) not in self.memo:  # a tuple inside itself is not possible
        self.memoize(value)
      return
    items = list(value.items()) if type(value) is dict else value
    self.out += b"}" if type(value) is dict else b"]"
    self.memoize(value)
    while items:
      batch = items[:self.rng.randint(1, 4)]
      items = items[len(batch):]
      one = len(batch) == 1 and self.rng.random() < 0.5
      if not one:
        self.out += b"("
      for item in batch:
        if type(value) is dict:
          self.write(item[0])
          self.write(item[1])
        else:
          self.write(item)
      if type(value) is dict:
        self.out += b"s" if one else b"u"
      else:
        self.out += b"a" if one else b"e"

  def int_(self, value: int) -> None:
    if 0 <= value < 256 and self.rng.random() < 0.9:
      self.out += b"K" + bytes([value])
    elif 0 <= value < 65536 and self.rng.random() < 0.9:
      self.out += b"M" + struct.pack("<H", value)
    elif -2**31 <= value < 2**31 and self.rng.random() < 0.9:
      self.out += b"J" + struct.pack("<i", value)
    else:
      encoded = pickle.encode_long(value)  # pyright: ignore[reportAttributeAccessIssue]
      self.out += b"\x8a" + bytes([len(encoded)]) + encoded

  def str_(self, value: str) -> None:
    encoded = value.encode("utf-8", "surrogatepass")
    width = self.rng.random()
    if self.protocol >= 4 and len(encoded) < 256 and width < 0.7:
      self.out += b"\x8c" + bytes([len(encoded)]) + encoded
    elif self.protocol >= 4 and width > 0.9:
      self.out += b"\x8d" + struct.pack("<Q", len(encoded)) + encoded
    else:
      self.out += b"X" + struct.pack("<I", len(encoded)) + encoded
    if self.rng.random() < 0.5:
      self.slot()  # memoised as pickle does, never referred to again

  def bytes_(self, value: bytes) -> None:
    if self.protocol == 2:  # _codecs.encode(text, "latin1")
      self.global_("_codecs", "encode")
      self.str_(value.decode("latin-1"))
      self.str_(self.rng.choice(["latin1", "latin-1"]))
      self.out += b"\x86R"
      return
    width = self.rng.random()
    if len(value) < 256 and width < 0.7:
      self.out += b"C" + bytes([len(value)]) + value
    elif self.protocol >= 4 and width > 0.9:
      self.out += b"\x8e" + struct.pack("<Q", len(value)) + value
    else:
      self.out += b"B" + struct.pack("<I", len(value)) + value

  def global_(self, module: str, name: str) -> None:
    if self.protocol >= 4 and self.rng.random() < 0.8:
      self.str_(module)
      self.str_(name)
      self.out += b"\x93"
    else:
      self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    self.slot()


def hostile_pickle(rng: random.Random) -> tuple[str, bytes]:
  """Pickles built to cost: many objects, deep nesting, heavy sharing,
  bytes used many times, opcodes and globals MXNet never writes."""
  kind = rng.choice(["many", "deep", "shared", "reused bytes", "stranger",
                     "stray opcode", "wide integer", "bad memo"])
  proto = b"\x80" + bytes([rng.choice([2, 3, 4])])
  n = log_uniform(rng, 300_000)
  head = b"}K\x00"
  if kind == "many":
    if rng.random() < 0.5:
      unit = rng.choice([b"]a", b"}a", b")a", b"Na", b"K\x01a", b"(]]]]e",
                         b"]\x94a", b"\x8c\x00a"])
      return kind, proto + head + b"]" + unit * n + b"s."
    atom = rng.choice([b"]", b"}", b")", b"N", b"]\x94", b"}\x94"])
    opener, closer = rng.choice([(b"(", b"t"), (b"](", b"e"), (b"(", b"")])
    return kind, proto + head + opener + atom * n + closer + b"s."
  if kind == "deep":
    depth = log_uniform(rng, 5000)
    opener, closer = rng.choice([(b"]", b"a"), (b"}K\x00", b"s"),
                                 (b"(", b"t"), (b"", b"\x85")])
    return kind, proto + head + opener * depth + b"N" + closer * depth + b"s."
  if kind == "shared":
    depth = rng.randint(1, 40)
    width = rng.randint(2, 6)
    # L[i + 1] = [L[i]] * width, every level in one outer list.
    out = bytearray(proto + head + b"](]q\x00")
    for i in range(depth):
      out += b"](" + (b"h" + bytes([i])) * width + b"eq" + bytes([i + 1])
    return kind, bytes(out + b"es.")
  if kind == "reused bytes":
    blob = rng.randbytes(log_uniform(rng, 1 << 20))
    out = (b"\x8c\x08builtins\x8c\tbytearray\x93\x94B"
           + struct.pack("<I", len(blob)) + blob + b"\x94")
    copies = rng.randint(1, 5000)
    body = b"](" + out + b"\x85R" + b"h\x00h\x01\x85R" * copies + b"e"
    return kind, b"\x80\x04" + head + body + b"s."
  if kind == "stranger":
    module, name = rng.choice(STRANGERS)
    arg = rng.choice([b")", b"N\x85", b"\x8c\x02id\x85"])
    return kind, (proto + head + b"c" + module.encode() + b"\n" + name.encode()
                  + b"\n" + arg + rng.choice([b"R", b"\x81"]) + b"s.")
  if kind == "stray opcode":
    opcode = rng.choice([b"\x8f", b"\x90", b"\x91", b"\x82\x01", b"\x92",
                         b"Q", b"P\n", b"F1.0\n", b"I1\n", b"L1\n", b"S''\n",
                         b"V\n", b"U\x00", b"T\x00\x00\x00\x00", b"\x96",
                         b"\x97", b"\x98\x00\x00\x00\x00\x00\x00\x00\x00",
                         b"0", b"1", b"2", b"d", b"l", b"o", b"i\n\n", b"\x83\x01"
                         b"\x00", b"\x84\x01\x00\x00\x00", b"S'\\x'\n"])
    return kind, proto + head + b"N" + opcode + b"s."
  if kind == "wide integer":
    width = rng.choice([9, 64, 255])
    return kind, proto + head + b"\x8a" + bytes([width]) + rng.randbytes(width) + b"s."
  index = rng.choice([1, 255, 2**16, 2**27, 2**31 - 1])
  return kind, proto + head + b"N" + rng.choice([b"r", b"j"]) + struct.pack(
      "<I", index) + b"s."


def damage(rng: random.Random, data: bytes) -> bytes:
  """A grammar-level fault: truncation, a byte changed, a slice repeated."""
  if not data:
    return data
  at = rng.randrange(len(data))
  kind = rng.randrange(3)
  if kind == 0:
    return data[:at]
  if kind == 1:
    return data[:at] + bytes([rng.randrange(256)]) + data[at + 1:]
  end = min(len(data), at + rng.randint(1, 64))
  return data[:end] + data[at:end] * rng.randint(1, 50) + data[end:]


def params_file(rng: random.Random, arrays: list[Array], names: list[bytes]
                ) -> bytes:
  return (struct.pack("<QQQ", 0x112, 0, len(arrays))
          + b"".join(array_record(a) for a in arrays)
          + struct.pack("<Q", len(names))
          + b"".join(struct.pack("<Q", len(n)) + n for n in names))


def hostile_params(rng: random.Random) -> tuple[str, bytes]:
  kind = rng.choice(["header", "count", "magic", "storage", "ndim", "dims",
                     "dtype", "names", "trailing", "many", "many dims"])
  array = random_array(rng)
  record = bytearray(array_record(array))
  if kind == "many":
    n = log_uniform(rng, 100_000)
    return kind, params_file(rng, [array] * n, [])
  if kind == "many dims":  # up to 64 dims, one of them wrong
    dims = [rng.choice([1, 2**31, 2**62]) for _ in range(rng.randint(2, 64))]
    dims[rng.randrange(len(dims))] = rng.choice([-1, -2**62, 2**63 - 1])
    return kind, (struct.pack("<QQQ", 0x112, 0, 1)
                  + struct.pack(f"<IIi{len(dims)}q", MAGIC_V2, 0, len(dims), *dims)
                  + struct.pack("<iii", 1, 0, 0) + struct.pack("<Q", 0))
  if kind == "magic":
    record[:4] = struct.pack("<I", rng.choice([MAGIC_V1, 0, MAGIC_V3 + 1]))
  elif kind == "storage":
    record[4:8] = struct.pack("<i", rng.choice([1, 2, -1, 3]))
  elif kind == "ndim":
    record[8:12] = struct.pack("<i", rng.choice([-1, -2, 65, 2**31 - 1]))
  elif kind == "dims" and array.array.ndim:
    record[12:20] = struct.pack("<q", rng.choice([-1, 2**31, 2**62, 2**63 - 1]))
  elif kind == "dtype":
    ndim = array.array.ndim
    record[20 + 8 * ndim:24 + 8 * ndim] = struct.pack(
        "<i", rng.choice([-1, 13, 14, 100]))
  data = params_file(rng, [Array(array.array, array.flag, array.magic)], [])
  data = data[:24] + bytes(record) + data[24 + len(record):]
  if kind == "header":
    data = struct.pack("<Q", rng.choice([0x111, 0x113, 0])) + data[8:]
  elif kind == "count":
    data = data[:16] + struct.pack("<Q", rng.choice([2, 2**40, 2**64 - 1])) + data[24:]
  elif kind == "names":
    count = rng.choice([1, 2, 2**63])
    data = data[:-8] + struct.pack("<Q", count) + struct.pack("<Q", 2) + rng.choice(
        [b"\xff\xfe", b"ab"])
  elif kind == "trailing":
    data += rng.randbytes(rng.randint(1, 16))
  return kind, data


def npy(rng: random.Random, array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  fortran = array.ndim > 1 and rng.random() < 0.3
  np.lib.format.write_array(buffer, np.asfortranarray(array) if fortran else array,
                            version=rng.choice([(1, 0), (2, 0)]))
  return buffer.getvalue()


def npz_archive(rng: random.Random, members: list[tuple[str, bytes]],
                deflate: bool = False, zip64: bool = False,
                comment: bool = False) -> bytes:
  buffer = io.BytesIO()
  method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
  with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", method) as archive:
    warnings.simplefilter("ignore")  # duplicate names are meant
    for name, data in members:
      info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
      info.compress_type = method
      with archive.open(info, "w", force_zip64=zip64) as f:
        f.write(data)
    if comment:  # NumPy writes none
      archive.comment = rng.randbytes(rng.randint(1, 40))
  return buffer.getvalue()


def central_directory(data: bytes) -> tuple[int, int, int]:
  """(offset of the end record, offset and size of the central directory)."""
  end = data.rfind(b"PK\x05\x06")
  size, offset = struct.unpack("<II", data[end + 12:end + 20])
  return end, offset, size


def overlapped(rng: random.Random, data: bytes, copies: int) -> bytes:
  """The central directory's first entry repeated ``copies`` times, renamed
  or not: every copy names the same local member's bytes."""
  end, offset, _ = central_directory(data)
  entry_size = 46 + sum(struct.unpack("<HHH", data[offset + 28:offset + 34]))
  entry = data[offset:offset + entry_size]
  name_length = struct.unpack("<H", entry[28:30])[0]
  entries = [entry[:46] + f"{i:0{name_length - 4}d}.npy".encode()[-name_length:]
             + entry[46 + name_length:] for i in range(copies)]
  if name_length < 5 or rng.random() < 0.5:
    entries = [entry] * copies
  directory = b"".join(entries)
  record = bytearray(data[end:end + 22])
  record[8:12] = struct.pack("<HH", min(copies, 0xFFFF), min(copies, 0xFFFF))
  record[12:20] = struct.pack("<II", len(directory), offset)
  return data[:offset] + directory + bytes(record) + data[end + 22:]


def flagged(data: bytes, bit: int) -> bytes:
  """Every local and central header with general-purpose flag ``bit`` set."""
  out = bytearray(data)
  for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
    at = out.find(signature)
    while at >= 0:
      flags = struct.unpack("<H", out[at + flags_at:at + flags_at + 2])[0]
      out[at + flags_at:at + flags_at + 2] = struct.pack("<H", flags | 1 << bit)
      at = out.find(signature, at + 4)
  return bytes(out)


def hostile_npz(rng: random.Random) -> tuple[str, bytes]:
  kind = rng.choice(["overlap", "deflated", "encrypted", "sizes", "names",
                     "npy header", "npy data", "zip64 overlap", "many members",
                     "comment"])
  array = random_array(rng).array
  member = npy(rng, array)
  if kind in ("overlap", "zip64 overlap"):
    big = npy(rng, np.zeros(log_uniform(rng, 1 << 20), np.uint8))
    base = npz_archive(rng, [("w0000000.npy", big)], zip64=kind == "zip64 overlap")
    return kind, overlapped(rng, base, rng.randint(2, 3000))
  if kind == "many members":
    n = log_uniform(rng, 5000)
    return kind, npz_archive(rng, [(f"{i}.npy", member) for i in range(n)])
  if kind == "comment":
    return kind, npz_archive(rng, [("w.npy", member)], comment=True)
  if kind == "deflated":
    return kind, npz_archive(rng, [("w.npy", member)], deflate=True)
  if kind == "encrypted":
    return kind, flagged(npz_archive(rng, [("w.npy", member)]),
                         rng.choice([0, 0, 3, 6, 13]))
  if kind == "names":
    name = rng.choice(["w.txt", "w.npy", "../w.npy", "/w.npy", "w", "a/b.npy",
                       "w.npy\x00x"])
    return kind, npz_archive(rng, [(name, member), ("w.npy", member)])
  if kind == "npy header":
    header = member.replace(b"'descr': '", b"'descr': '" + rng.choice(
        [b">", b"|O", b"V", b"U"]).ljust(1), 1)
    return kind, npz_archive(rng, [("w.npy", header)])
  if kind == "npy data":
    wrong = rng.choice([member[:-1], member + b"\0", member + b"\0" * 8])
    return kind, npz_archive(rng, [("w.npy", wrong)])
  data = bytearray(npz_archive(rng, [("w.npy", member)]))
  _, offset, _ = central_directory(bytes(data))
  field = rng.choice([20, 24])  # compressed or uncompressed size
  data[offset + field:offset + field + 4] = struct.pack(
      "<I", rng.choice([0, 1, 2**31, 0xFFFFFFFF]))
  return kind, bytes(data)


def generate(seed: int, index: int) -> tuple[str, str, bytes, Any]:
  """Input ``index`` of run ``seed``: (reader, kind, bytes, the value a
  well-formed file holds or ``ANY``)."""
  rng = random.Random(f"{seed}:{index}")
  reader = rng.choice(["states", "states", "states", "params", "npz"])
  style = rng.random()
  if reader == "states":
    if style < 0.5:
      grammar = ValueGrammar(rng, max_depth=rng.randint(1, 8),
                             sharing=rng.choice([0.0, 0.05, 0.2]))
      value = grammar.trainer_states()
      data = PickleWriter(rng, rng.choice([2, 3, 4])).dumps(value)
      # Shared references may expand past what the reader accepts per byte.
      within = tree_size(value) <= len(data) // 4
      return (reader, "well-formed" if within else "well-formed, shared",
              data, expected(value) if within else ANY)
    if style < 0.7:
      grammar = ValueGrammar(rng, max_depth=rng.randint(1, 40),
                             sharing=rng.choice([0.3, 0.6]))
      value = grammar.value(0) if rng.random() < 0.2 else grammar.trainer_states()
      data = PickleWriter(rng, rng.choice([2, 3, 4])).dumps(value)
      if rng.random() < 0.3:
        data = damage(rng, data)
      return reader, "random value", data, ANY
    kind, data = hostile_pickle(rng)
    return reader, kind, data, ANY
  if reader == "params":
    if style < 0.5:
      arrays = [random_array(rng) for _ in range(log_uniform(rng, 8))]
      arrays = [a for a in arrays if a.array.ndim or a.magic == MAGIC_V3]
      names = rng.sample(["0.weight", "0.bias", "arg:fc_weight", "\u00e9", "",
                          "3.0.bias", "aux:bn_moving_mean", "x" * 300,
                          "dense0_weight"], len(arrays)) if len(arrays) <= 9 and (
                              rng.random() < 0.7) else []
      data = params_file(rng, arrays, [n.encode() for n in names])
      model = ({n: a.array for n, a in zip(names, arrays, strict=True)} if names
               else [a.array for a in arrays])
      return reader, "well-formed params", data, model
    kind, data = hostile_params(rng)
    return reader, f"params {kind}", damage(rng, data) if style > 0.95 else data, ANY
  if style < 0.5:
    arrays = {f"{i}.{rng.choice(['weight', 'bias'])}": random_array(rng).array
              for i in range(log_uniform(rng, 6))}
    # NumPy's format has no bfloat16 (it would be a void dtype).
    arrays = {n: a for n, a in arrays.items() if a.dtype != ml_dtypes.bfloat16}
    data = npz_archive(rng, [(f"{n}.npy", npy(rng, a)) for n, a in arrays.items()],
                       zip64=rng.random() < 0.2)
    return "params", "well-formed npz", data, arrays
  kind, data = hostile_npz(rng)
  return "params", f"npz {kind}", damage(rng, data) if style > 0.95 else data, ANY


ANY = object()
READERS = {"states": mxnet.read_trainer_states, "params": mxnet.read_params}


# --- Running ------------------------------------------------------------------

def library_state() -> Any:
  """What reading must not change: the reader modules' globals' identities,
  the functions' defaults, the imported modules, the warning filters."""
  state = [sorted(sys.modules), list(warnings.filters)]
  for module in (_files, _pickle):
    state.append({name: (id(value), getattr(value, "__defaults__", None))
                  for name, value in vars(module).items()})
  return state


def resident_bytes(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise AssertionError(field)


def read_in_child(reader: str, data: bytes, model: Any) -> dict[str, Any]:
  """Runs in a forked child: the read, its outcome and its costs."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident set restarts from now
  start_resident = resident_bytes("VmRSS")
  before = library_state()
  start = time.process_time()  # the machine may be shared: CPU, not wall time
  try:
    result = READERS[reader](data)
    outcome, message = "read", ""
  except Exception as e:  # every outcome is recorded; the parent judges
    outcome, message = type(e).__name__, str(e)
    result = None
  # What a file says reaches a terminal escaped and short.
  safe_message = message.isascii() and message.isprintable() and len(
      message) < MAX_MESSAGE
  message = message[:300]
  seconds = time.process_time() - start
  growth = resident_bytes("VmHWM") - start_resident
  changed = library_state() != before
  if outcome == "read" and model is not ANY:
    got = result
    if isinstance(result, mxnet.TrainerStates):
      got = (result.states if result.optimizer is None
             else (result.states, result.optimizer))
    if not same(got, model):
      outcome, message = "wrong value", repr(got)[:300]
  elif model is not ANY:
    outcome = f"refused a well-formed file: {outcome}"
  return {"outcome": outcome, "message": message, "seconds": seconds,
          "resident_growth": growth, "library_changed": changed,
          "safe_message": safe_message}


def run_forked(reader: str, data: bytes, model: Any, seconds_limit: float
               ) -> dict[str, Any]:
  read_end, write_end = os.pipe()
  pid = os.fork()
  if pid == 0:  # the child: never returns
    os.close(read_end)
    code = 0
    try:
      limit = resident_bytes("VmSize") + ADDRESS_SPACE_HEADROOM
      resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
      signal.alarm(max(1, math.ceil(seconds_limit)))
      result = read_in_child(reader, data, model)
      os.write(write_end, json.dumps(result).encode())
    except BaseException as e:  # reported below as a crash
      os.write(write_end, f"{type(e).__name__}: {e}"[:300].encode())
      code = 3
    os._exit(code)
  os.close(write_end)
  chunks = []
  while chunk := os.read(read_end, 1 << 16):
    chunks.append(chunk)
  os.close(read_end)
  _, status = os.waitpid(pid, 0)
  if chunks and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
    return json.loads(b"".join(chunks))
  how = (f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
         if os.WIFSIGNALED(status) else
         f"exit {os.waitstatus_to_exitcode(status)}: {b''.join(chunks)[:300]!r}")
  return {"outcome": "crash", "message": how, "seconds": None,
          "resident_growth": None, "library_changed": None,
          "safe_message": None}


def judge(size: int, result: dict[str, Any]) -> list[str]:
  """The bounds an input broke."""
  problems = []
  if result["outcome"] not in ("read", "FileError"):
    problems.append(f"outcome {result['outcome']}")
  if result["library_changed"]:
    problems.append("process state changed")
  if result["safe_message"] is False:
    problems.append("message not printable ASCII of bounded length")
  if (result["seconds"] is not None
      and result["seconds"] > SECONDS_PER_BYTE * size + SECONDS_OVERHEAD):
    problems.append("time")
  if (result["resident_growth"] is not None and result["resident_growth"]
      > RESIDENT_BYTES_PER_BYTE * size + RESIDENT_OVERHEAD):
    problems.append("memory")
  return problems


def warm_up() -> None:
  """Lazy imports and caches filled before the first fork, so that a child
  that imports nothing new is what a file must leave."""
  for seed in range(40):
    reader, _, data, _ = generate(-1, seed)
    try:
      READERS[reader](data)
    except mxnet.FileError:
      pass


def run(seed: int, seconds: float, count: int | None, out: Any) -> int:
  warm_up()
  deadline = time.monotonic() + seconds
  tally: collections.Counter[str] = collections.Counter()
  escapes = 0
  index = 0
  while (count is None and time.monotonic() < deadline) or (
      count is not None and index < count):
    reader, kind, data, model = generate(seed, index)
    limit = SECONDS_PER_BYTE * len(data) + SECONDS_OVERHEAD
    result = run_forked(reader, data, model, 2 * limit + 5)
    problems = judge(len(data), result)
    escapes += bool(problems)
    tally[f"{reader} {'escape' if problems else result['outcome']}"] += 1
    out.write(json.dumps({
        "seed": seed, "index": index, "reader": reader, "kind": kind,
        "size": len(data), **result, "problems": problems}) + "\n")
    index += 1
  out.write(json.dumps({"inputs": index, "escapes": escapes,
                        "counts": dict(sorted(tally.items()))}) + "\n")
  return escapes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--seconds", type=float, default=30.0)
  parser.add_argument("--count", type=int, default=None,
                      help="run exactly this many inputs instead")
  parser.add_argument("--show", type=int, default=None, metavar="INDEX",
                      help="print input INDEX of --seed as a bytes literal")
  args = parser.parse_args()
  if args.show is not None:
    reader, kind, data, _ = generate(args.seed, args.show)
    print(reader, kind, len(data))
    print(repr(data) if len(data) < 4000 else repr(data[:4000]) + "...")
    return
  warnings.simplefilter("error")
  sys.exit(1 if run(args.seed, args.seconds, args.count, sys.stdout) else 0)


if __name__ == "__main__":
  main()
