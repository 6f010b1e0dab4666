"""FTML (Follow the Moving Leader) for Optax, with MXNet's exact semantics."""

from optax_ftml._ftml import FTMLLeanState
from optax_ftml._ftml import FTMLState
from optax_ftml._ftml import ftml
from optax_ftml._mxnet import mxnet_ftml

__all__ = ("FTMLLeanState", "FTMLState", "ftml", "mxnet_ftml")
__version__ = "0.1.0"
