"""What reading MXNet's files yields: inert records of pickled MXNet objects,
the checked reading of their attributes, and the error every reader raises.
"""

from __future__ import annotations

import math
from typing import Any

_MAX_COUNT = 2**31  # MXNet's update counts and indices are int32
_MISSING = object()
# How much of a string from a file an error message quotes.
QUOTED_CHARACTERS = 60


class FileError(ValueError):
  """An MXNet file that cannot be read: corrupted, truncated, unsupported or
  (for pickles) holding something MXNet's files do not hold."""


def quoted(text: str | bytes) -> str:
  """``text`` from a file, for an error message: escaped to printable ASCII
  (no terminal escapes, newlines or lone surrogates) and at most
  ``QUOTED_CHARACTERS`` long."""
  if len(text) <= QUOTED_CHARACTERS:
    return ascii(text)
  return f"{text[:QUOTED_CHARACTERS]!a}... ({len(text)} in all)"


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
    return quoted(value)
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
