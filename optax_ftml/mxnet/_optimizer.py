"""The Optax chain that reproduces ``mxnet.optimizer.FTML``."""

from __future__ import annotations

import numbers
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ftml import _ftml
from optax_ftml import _validation


def _as_operator_parameter(value: Any) -> Any:
  """``value`` as MXNet's ``FTMLParam`` holds it: a C++ ``float``.

  The kernel casts it to the weight dtype afterwards, so float64 weights see
  ``(double)0.999f``, not 0.999; float32 weights see the same value either
  way. Arrays (traced by ``optax.inject_hyperparams``, or a schedule's value)
  are rounded to float32 too.
  """
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return float(np.float32(value))
  if hasattr(value, "dtype"):
    return jnp.asarray(value, jnp.float32)
  return value  # not a number: ftml's validation names it


def _gradient_preprocessing(rescale_grad: float, clip_gradient: Any,
                            wd: float, mxnet_version: int):
  """MXNet's ``rescale -> clip -> + wd * w`` (2.x) or ``rescale + wd * w -> clip``."""
  rescale_grad, wd = _as_operator_parameter(rescale_grad), _as_operator_parameter(wd)
  rescale = [optax.scale(rescale_grad)] if rescale_grad != 1 else []
  # MXNet's optimizer forwards only a truthy value (else -1), and the kernel
  # clips iff that value, as a C++ float, is >= 0: None, 0 and negatives
  # disable clipping.
  clip_grad = _as_operator_parameter(clip_gradient) if clip_gradient else -1.0
  clip = [optax.clip(clip_grad)] if clip_grad >= 0 else []
  decay = [optax.add_decayed_weights(wd)] if wd != 0 else []
  if mxnet_version == 2:
    return rescale + clip + decay
  return rescale + decay + clip


def ftml(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    beta1: float = 0.6,
    beta2: float = 0.999,
    epsilon: float = 1e-8,
    wd: float = 0.0,
    rescale_grad: float = 1.0,
    clip_gradient: float | None = None,
    lr_mult: Any = None,
    wd_mult: Any = None,
    mxnet_version: int = 2,
) -> optax.GradientTransformationExtraArgs:
  """``mxnet.optimizer.FTML(...)`` as an Optax chain, with MXNet's argument names.

  Builds ``optax.chain(<gradient pre-processing>, ftml(...))`` where the
  pre-processing is, as in MXNet 2.x,
  ``scale(rescale_grad) -> clip(clip_gradient) -> add_decayed_weights(wd)``,
  or, as in MXNet 1.x (``mxnet_version=1``), weight decay before clipping.
  Steps that are identities in MXNet (``rescale_grad=1``, ``wd=0``, no
  clipping) are left out.

  As MXNet's operator does, the learning rate (a schedule's value times
  ``lr_mult``), ``beta1``, ``beta2``, ``wd`` (times ``wd_mult``),
  ``rescale_grad`` and ``clip_gradient`` are rounded to float32 before they
  reach the per-element arithmetic (``epsilon`` is kept in double). This
  changes nothing for float32 parameters; float64 parameters get MXNet's
  float64 numbers, e.g. ``1 - float64(float32(0.999))`` = 0.000999987...
  rather than ``ftml``'s 0.001.

  Args:
    learning_rate: MXNet's ``learning_rate`` (2.x default 0.0025; 1.x used
      0.01), or a schedule following MXNet's convention: it is called with the
      1-based update count, as ``lr_scheduler(num_update)`` is in MXNet.
    beta1: MXNet's ``beta1``.
    beta2: MXNet's ``beta2``.
    epsilon: MXNet's ``epsilon``.
    wd: weight decay, added to the gradient as ``wd * weight``.
    rescale_grad: multiplies the raw gradient; Gluon's ``Trainer.step(bs)``
      sets it to ``1 / bs``.
    clip_gradient: clip the gradient to ``[-c, c]``; ``None``, 0 or a negative
      value disable clipping, as in MXNet.
    lr_mult: optional pytree of per-parameter learning-rate multipliers with
      the parameters' structure (MXNet's ``lr_mult``). A multiplier of 0
      freezes that parameter.
    wd_mult: optional pytree of per-parameter weight-decay multipliers with
      the parameters' structure (MXNet's ``wd_mult``).
    mxnet_version: 2 (clip, then weight decay) or 1 (weight decay, then clip).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from optax_ftml import mxnet
    >>> # mx.optimizer.FTML(learning_rate=0.01, wd=1e-4, clip_gradient=5,
    >>> #                   rescale_grad=1/32)
    >>> opt = mxnet.ftml(0.01, wd=1e-4, clip_gradient=5.0, rescale_grad=1 / 32)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)
  """
  if (not isinstance(mxnet_version, numbers.Integral)
      or isinstance(mxnet_version, (bool, np.bool_)) or mxnet_version not in (1, 2)):
    raise ValueError(
        f"mxnet.ftml: mxnet_version must be 1 or 2, got {mxnet_version!r}.")
  caller = "mxnet.ftml"

  def concrete(value, name):
    number = _validation.real_scalar_unless_traced(value, name, caller)
    if number is None:
      raise TypeError(f"{caller}: {name} must be a concrete number, not traced.")
    return number

  wd = concrete(wd, "wd")
  _validation.check_range(wd, "wd", caller, 0.0, float("inf"), high_open=True)
  rescale_grad = concrete(rescale_grad, "rescale_grad")
  _validation.check_finite(rescale_grad, "rescale_grad", caller)
  if clip_gradient is not None:
    clip_gradient = concrete(clip_gradient, "clip_gradient")
    _validation.check_finite(clip_gradient, "clip_gradient", caller)
  names = ("learning_rate", "beta1", "beta2", "epsilon")
  # The caller's values, so that errors quote them unrounded.
  _validation.check_hyperparameters(learning_rate, beta1, beta2, epsilon,
                                    caller=caller, names=names)

  def group(lr_multiplier: float,
            wd_multiplier: float) -> optax.GradientTransformationExtraArgs:
    if lr_multiplier == 0:
      return optax.with_extra_args_support(optax.set_to_zero())
    # MXNet multiplies by lr_mult (and wd_mult) in Python, in double, before
    # the operator rounds the product to float.
    if callable(learning_rate):
      schedule = learning_rate
      rate = lambda count: _as_operator_parameter(
          lr_multiplier * schedule(count + 1))
    else:
      rate = _as_operator_parameter(learning_rate * lr_multiplier)
    return optax.chain(
        *_gradient_preprocessing(rescale_grad, clip_gradient,
                                 wd * wd_multiplier, mxnet_version),
        _ftml.ftml(rate, _as_operator_parameter(beta1),
             _as_operator_parameter(beta2), epsilon))

  if lr_mult is None and wd_mult is None:
    return group(1.0, 1.0)

  def multipliers(tree, name):
    def checked(path, multiplier):
      leaf_name = f"{name}{jax.tree_util.keystr(path)}"
      multiplier = concrete(multiplier, leaf_name)
      _validation.check_range(multiplier, leaf_name, caller, 0.0,
                              float("inf"), high_open=True)
      return multiplier
    return jax.tree_util.tree_map_with_path(checked, tree)

  def pair(path, lr_multiplier, wd_multiplier):
    """The multipliers of one parameter, their products checked as the
    operator receives them."""
    where = jax.tree_util.keystr(path)
    if lr_multiplier and not callable(learning_rate):
      _validation.check_hyperparameters(
          learning_rate * lr_multiplier, beta1, beta2, epsilon, caller=caller,
          names=(f"learning_rate * lr_mult{where}", *names[1:]))
    _validation.check_finite(wd * wd_multiplier, f"wd * wd_mult{where}",
                             caller)
    return lr_multiplier, wd_multiplier

  ones = lambda tree: jax.tree.map(lambda _: 1.0, tree)
  lr_mults = multipliers(ones(wd_mult) if lr_mult is None else lr_mult,
                         "lr_mult")
  wd_mults = multipliers(ones(lr_mult) if wd_mult is None else wd_mult,
                         "wd_mult")
  pairs = jax.tree_util.tree_map_with_path(pair, lr_mults, wd_mults)
  is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and all(
      isinstance(m, float) for m in x)
  label = lambda p: f"lr_mult={p[0]},wd_mult={p[1]}"
  groups: dict[Hashable, optax.GradientTransformation] = {
      label(p): group(*p) for p in jax.tree.leaves(pairs, is_leaf=is_pair)}
  return optax.multi_transform(groups, jax.tree.map(label, pairs,
                                                    is_leaf=is_pair))


def module_wd_mult(names: Any) -> Any:
  """The weight-decay multipliers MXNet 1.x's Module API gives its parameters.

  The Module API (``mx.mod.Module``) creates its optimizer with the symbol's
  parameter names, and the optimizer then sets ``wd_mult = 0`` for every
  parameter whose name ends neither in ``_weight`` nor in ``_gamma`` (biases,
  BatchNorm's ``beta``, ...): those are not decayed. Gluon does not do this
  (there every parameter has ``wd_mult = 1`` unless set). Pass the result to
  :func:`~optax_ftml.mxnet.ftml`'s ``wd_mult`` (or :func:`resume`'s) to train
  as a Module did.

  Args:
    names: a pytree whose leaves are the MXNet parameter names (e.g.
      ``"fc1_weight"``; a Module ``.params`` file's ``"arg:fc1_weight"`` works
      too), with the structure of the parameters.

  Returns:
    The same structure with ``1.0`` for names ending in ``_weight`` or
    ``_gamma`` and ``0.0`` for the others.

  Raises:
    TypeError: if a leaf is not a string.

  Examples:
    >>> from optax_ftml import mxnet
    >>> mxnet.module_wd_mult({"w": "fc1_weight", "b": "fc1_bias"})
    {'b': 0.0, 'w': 1.0}
  """
  def multiplier(name):
    if not isinstance(name, str):
      raise TypeError(
          f"mxnet.module_wd_mult: names must be strings, got {type(name).__name__}.")
    return 1.0 if name.endswith(("_weight", "_gamma")) else 0.0
  return jax.tree.map(multiplier, names)


def to_flax_layout(name: str, array: np.ndarray) -> np.ndarray:
  """An MXNet weight (or its FTML state) in Flax's layout.

  Dense weights ``(out, in)`` become Flax's ``(in, out)`` kernels, convolution
  weights ``(out, in, *window)`` Flax's ``(*window, in, out)``; other arrays
  (biases, BatchNorm's scale and bias) are unchanged. FTML's state is
  elementwise, so ``d``, ``v`` and ``z`` are converted exactly as their weight.

  Args:
    name: the parameter's name (unused: the layout follows from the rank).
    array: the array in MXNet's layout.

  Returns:
    The array in Flax's layout.

  Examples:
    >>> import numpy as np
    >>> from optax_ftml import mxnet
    >>> mxnet.to_flax_layout("0.weight", np.zeros((8, 1, 3, 3))).shape
    (3, 3, 1, 8)
  """
  del name
  if array.ndim < 2:
    return array
  return np.transpose(array, (*range(2, array.ndim), 1, 0))
