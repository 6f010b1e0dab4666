"""FTML (Follow the Moving Leader) for Optax, with MXNet's exact semantics.

The optimizer is :func:`ftml`; :mod:`optax_ftml.mxnet` reproduces MXNet's
``FTML`` from its arguments and continues a run from MXNet's own files.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from optax_ftml import mxnet as mxnet
  from optax_ftml._ftml import FTMLLeanState
  from optax_ftml._ftml import FTMLState
  from optax_ftml._ftml import ftml

__all__ = ("FTMLLeanState", "FTMLState", "ftml")
__version__ = "0.1.0"


def __getattr__(name: str):
  # Imported on first use, so that `python -m optax_ftml.demo --help` answers
  # without starting JAX.
  if name == "mxnet":
    return importlib.import_module(f"{__name__}.mxnet")
  if name not in __all__:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}._ftml"), name)
  globals()[name] = value  # later lookups find it directly
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__, "mxnet"})
