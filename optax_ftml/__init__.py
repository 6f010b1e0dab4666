"""FTML (Follow the Moving Leader) for Optax, with MXNet's exact semantics."""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from optax_ftml._ftml import FTMLLeanState
  from optax_ftml._ftml import FTMLState
  from optax_ftml._ftml import ftml
  from optax_ftml._mxnet import module_wd_mult
  from optax_ftml._mxnet import mxnet_ftml
  from optax_ftml._mxnet import mxnet_to_flax_layout
  from optax_ftml._mxnet_files import MXNetFileError
  from optax_ftml._mxnet_files import MXNetObject
  from optax_ftml._mxnet_files import MXNetTrainerStates
  from optax_ftml._mxnet_files import read_mxnet_params
  from optax_ftml._mxnet_files import read_mxnet_trainer_states
  from optax_ftml._mxnet_resume import resume_mxnet_ftml
  from optax_ftml._mxnet_schedules import mxnet_lr_schedule

__all__ = (
    "FTMLLeanState",
    "FTMLState",
    "MXNetFileError",
    "MXNetObject",
    "MXNetTrainerStates",
    "ftml",
    "module_wd_mult",
    "mxnet_ftml",
    "mxnet_lr_schedule",
    "mxnet_to_flax_layout",
    "read_mxnet_params",
    "read_mxnet_trainer_states",
    "resume_mxnet_ftml",
)
__version__ = "0.1.0"

# The module defining each public name. They are imported on first use, so
# that `python -m optax_ftml.demo --help` answers without starting JAX.
_MODULES = {
    "FTMLLeanState": "_ftml",
    "FTMLState": "_ftml",
    "ftml": "_ftml",
    "module_wd_mult": "_mxnet",
    "mxnet_ftml": "_mxnet",
    "mxnet_to_flax_layout": "_mxnet",
    "MXNetFileError": "_mxnet_files",
    "MXNetObject": "_mxnet_files",
    "MXNetTrainerStates": "_mxnet_files",
    "read_mxnet_params": "_mxnet_files",
    "read_mxnet_trainer_states": "_mxnet_files",
    "resume_mxnet_ftml": "_mxnet_resume",
    "mxnet_lr_schedule": "_mxnet_schedules",
}


def __getattr__(name: str):
  if name not in _MODULES:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
  globals()[name] = value  # later lookups find it directly
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})
