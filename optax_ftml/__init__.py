"""FTML (Follow the Moving Leader) for Optax, with MXNet's exact semantics."""

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
