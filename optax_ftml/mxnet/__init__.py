"""Apache MXNet interoperability: MXNet's ``FTML`` and its files, without MXNet.

* :func:`ftml` builds ``mxnet.optimizer.FTML(...)`` as an Optax chain, with
  MXNet's argument names and order of gradient pre-processing (1.x or 2.x);
  :func:`module_wd_mult` gives the Module API's weight-decay multipliers.
* :func:`read_params` and :func:`read_trainer_states` read MXNet's parameter
  and trainer-state files (no code in them is run); :func:`lr_schedule` turns
  a pickled learning-rate scheduler into a schedule.
* :func:`resume` continues an MXNet run from those files
  (:func:`master_weights`: a half-precision run's float32 master weights).
"""

from optax_ftml.mxnet._files import TrainerStates
from optax_ftml.mxnet._files import read_params
from optax_ftml.mxnet._files import read_trainer_states
from optax_ftml.mxnet._optimizer import ftml
from optax_ftml.mxnet._optimizer import module_wd_mult
from optax_ftml.mxnet._optimizer import to_flax_layout
from optax_ftml.mxnet._records import FileError
from optax_ftml.mxnet._records import PickledObject
from optax_ftml.mxnet._resume import master_weights
from optax_ftml.mxnet._resume import resume
from optax_ftml.mxnet._schedules import lr_schedule

__all__ = (
    "FileError",
    "PickledObject",
    "TrainerStates",
    "ftml",
    "lr_schedule",
    "master_weights",
    "module_wd_mult",
    "read_params",
    "read_trainer_states",
    "resume",
    "to_flax_layout",
)
