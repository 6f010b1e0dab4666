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
from optax_ftml.mxnet import _unfused

# MXNet's default learning rate: FTML's own in 2.x, the base class's in 1.x.
_DEFAULT_LEARNING_RATE = {1: 0.01, 2: 0.0025}
_STATIC = ("under optax.inject_hyperparams, which passes numeric arguments"
           " as arrays, name it in static_args, e.g."
           " optax.inject_hyperparams(mxnet.ftml, static_args=({names}))")


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


def _static(value: Any, name: str, static_arg: str | None = None) -> float:
  """A hyperparameter that shapes the chain: a concrete number, not traced."""
  number = _validation.real_scalar(value, name, _CALLER)
  if number is None:
    raise TypeError(
        f"{_CALLER}: {name} must be a concrete number, not traced: "
        + _STATIC.format(names=repr(static_arg or name) + ",") + ".")
  return number


def _traceable(value: Any, name: str) -> Any:
  """``wd`` or ``rescale_grad``, which may be traced (``inject_hyperparams``):
  checked where concrete, rounded to float32 later (after ``wd_mult``)."""
  number = _validation.real_scalar(value, name, _CALLER)
  if number is None:
    return value
  if name == "wd":
    _validation.check_range(number, name, _CALLER, 0.0, float("inf"),
                            high_open=True)
  _validation.check_finite(number, name, _CALLER)
  return value if hasattr(value, "dtype") else number


_CALLER = "mxnet.ftml"


def _mxnet_clip(bound: float) -> optax.GradientTransformation:
  """``nd.clip(g, -bound, bound)``: MXNet's clip operator takes any bounds,
  ``x > a_max ? a_max : x < a_min ? a_min : x``, so 0 zeroes the gradient
  and a negative bound flips it to ``-bound`` below and ``bound`` above."""
  def clip(g):
    high = jnp.asarray(bound, g.dtype)
    return jnp.where(g > high, high, jnp.where(g < -high, -high, g))
  return optax.stateless(lambda updates, params: jax.tree.map(clip, updates))


def _gradient_preprocessing(rescale_grad: Any, clip_gradient: float | None,
                            wd: Any, mxnet_version: int, fused: bool
                            ) -> list[optax.GradientTransformation]:
  """MXNet's ``rescale -> clip -> + wd * w`` (2.x) or ``rescale + wd * w ->
  clip`` (1.x); identities (a rescale by 1, no decay, no clipping) are left
  out, and arrays (``inject_hyperparams``) always kept."""
  rescale_grad, wd = _as_operator_parameter(rescale_grad), _as_operator_parameter(wd)
  is_array = lambda x: hasattr(x, "dtype")
  rescale = ([optax.scale(rescale_grad)]
             if is_array(rescale_grad) or rescale_grad != 1 else [])
  decay = [optax.add_decayed_weights(wd)] if is_array(wd) or wd != 0 else []
  if not fused:  # FTML.step clips for any bound that is not None
    clip = ([] if clip_gradient is None
            else [_mxnet_clip(_as_operator_parameter(clip_gradient))])
  else:
    # The fused step gets a bound only if it is truthy (else -1), and the
    # kernel clips iff that bound, as a C++ float, is >= 0: None, 0 and
    # negatives disable clipping.
    bound = _as_operator_parameter(clip_gradient) if clip_gradient else -1.0
    clip = [optax.clip(bound)] if bound >= 0 else []
  if mxnet_version == 2:
    return rescale + clip + decay
  return rescale + decay + clip


def _check_version(mxnet_version: Any, use_fused_step: Any) -> None:
  if hasattr(mxnet_version, "shape") and not isinstance(
      mxnet_version, numbers.Integral):
    raise TypeError(
        f"{_CALLER}: mxnet_version must be the integer 1 or 2, not an array: "
        + _STATIC.format(names="'mxnet_version',") + ".")
  if (not isinstance(mxnet_version, numbers.Integral)
      or isinstance(mxnet_version, (bool, np.bool_)) or mxnet_version not in (1, 2)):
    raise ValueError(
        f"{_CALLER}: mxnet_version must be 1 or 2, got {mxnet_version!r}. 1:"
        " MXNet 1.x (weight decay, then clipping; 1.9.1 is the last stable"
        " release), 2: MXNet 2.0, a beta (clipping, then weight decay).")
  if not isinstance(use_fused_step, (bool, np.bool_)):
    raise TypeError(
        f"{_CALLER}: use_fused_step must be True or False, got"
        f" {use_fused_step!r}.")
  if not use_fused_step and mxnet_version != 2:
    raise ValueError(
        f"{_CALLER}: use_fused_step=False is MXNet 2's FTML.step; MXNet 1.x"
        " has only the fused kernel: pass mxnet_version=2 or leave"
        " use_fused_step at True.")


def _multiplier_pairs(lr_mult: Any, wd_mult: Any, learning_rate: Any,
                      wd: Any, hyperparameters: tuple[Any, Any, Any]
                      ) -> tuple[list[tuple[float, float]], Any]:
  """Each leaf's ``(lr_mult, wd_mult)``, checked, in ``jax.tree.leaves``
  order, and the tree structure (the given multipliers', one of them 1
  where not given)."""
  given = lr_mult if lr_mult is not None else wd_mult
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(given)
  paths = [path for path, _ in leaves_with_paths]

  def checked(tree: Any, name: str) -> list[float]:
    if tree is None:
      return [1.0] * len(paths)
    values = treedef.flatten_up_to(tree)
    out = []
    for path, value in zip(paths, values, strict=True):
      leaf_name = f"{name}{jax.tree_util.keystr(path)}"
      number = _static(value, leaf_name, name)
      _validation.check_range(number, leaf_name, _CALLER, 0.0, float("inf"),
                              high_open=True)
      out.append(number)
    return out

  pairs = list(zip(checked(lr_mult, "lr_mult"), checked(wd_mult, "wd_mult"),
                   strict=True))
  beta1, beta2, epsilon = hyperparameters
  concrete_wd = _validation.real_scalar(wd, "wd", _CALLER)
  for path, (lr_multiplier, wd_multiplier) in zip(paths, pairs, strict=True):
    where = jax.tree_util.keystr(path)
    # The products, as the operator receives them.
    if lr_multiplier and not callable(learning_rate):
      _validation.check_hyperparameters(
          learning_rate * lr_multiplier, beta1, beta2, epsilon, caller=_CALLER,
          names=(f"learning_rate * lr_mult{where}", "beta1", "beta2",
                 "epsilon"))
    if concrete_wd is not None:
      _validation.check_finite(concrete_wd * wd_multiplier,
                               f"wd * wd_mult{where}", _CALLER)
  return pairs, treedef


def ftml(
    learning_rate: optax.ScalarOrSchedule | None = None,
    beta1: float = 0.6,
    beta2: float = 0.999,
    epsilon: float = 1e-8,
    wd: float = 0.0,
    rescale_grad: float = 1.0,
    clip_gradient: float | None = None,
    lr_mult: Any = None,
    wd_mult: Any = None,
    *,
    mxnet_version: int,
    use_fused_step: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """``mxnet.optimizer.FTML(...)`` as an Optax chain, with MXNet's argument names.

  ``mxnet_version`` is required: MXNet 1.x and 2.x pre-process the gradient
  in different orders, and their results differ as soon as both ``wd`` and
  ``clip_gradient`` are set. Builds ``optax.chain(<gradient
  pre-processing>, <FTML>)`` where the pre-processing is, as in MXNet 2.x
  (``mxnet_version=2``),
  ``scale(rescale_grad) -> clip(clip_gradient) -> add_decayed_weights(wd)``,
  or, as in MXNet 1.x (``mxnet_version=1``, up to 1.9.1, the last stable
  release), weight decay before clipping. Steps that are identities in MXNet
  (``rescale_grad=1``, ``wd=0``, no clipping) are left out.

  As MXNet's operator does, the learning rate (a schedule's value times
  ``lr_mult``), ``beta1``, ``beta2``, ``wd`` (times ``wd_mult``),
  ``rescale_grad`` and ``clip_gradient`` are rounded to float32 before they
  reach the per-element arithmetic (``epsilon`` is kept in double). This
  changes nothing for float32 parameters; float64 parameters get MXNet's
  float64 numbers, e.g. ``1 - float64(float32(0.999))`` = 0.000999987...
  rather than ``ftml``'s 0.001.

  ``use_fused_step=False`` (MXNet 2 only) computes ``FTML.step``, MXNet 2's
  optimizer in NDArray operations, instead of the fused kernel: its
  ``1 - beta1``, ``1 - beta2``, ``1 - beta2**t`` and ``(1 - beta1**t) / lr``
  are computed in double and rounded once (about 1.3e-5 relative from the
  kernel's at ``beta2 = 0.999``; with a schedule, the rate is float32 and
  ``d`` may differ from MXNet's by an ulp), and it clips whenever
  ``clip_gradient`` is not None, as ``nd.clip(g, -c, c)``: ``c = 0`` zeroes
  the gradient, a negative ``c`` sets it to ``c`` where ``g > c`` and to
  ``-c`` elsewhere. (MXNet raises ZeroDivisionError there for a learning rate
  of 0, which is refused here as a constant; a schedule reaching 0, or
  ``lr_mult = 0``, leaves the parameters unchanged.)

  Half precision as MXNet's ``multi_precision=True``: optimize the float32
  master weights (the float16 model runs on their cast); see the numerics
  guide's "Mixed precision" and :func:`~optax_ftml.mxnet.resume`.

  Args:
    learning_rate: MXNet's ``learning_rate``; by default MXNet's, 0.01 in 1.x
      and 0.0025 in 2.x. Or a schedule following MXNet's convention: it is
      called with the 1-based update count, as ``lr_scheduler(num_update)``
      is in MXNet.
    beta1: MXNet's ``beta1``.
    beta2: MXNet's ``beta2``.
    epsilon: MXNet's ``epsilon``.
    wd: weight decay, added to the gradient as ``wd * weight``.
    rescale_grad: multiplies the raw gradient; Gluon's ``Trainer.step(bs)``
      sets it to ``1 / bs``.
    clip_gradient: clip the gradient to ``[-c, c]``; ``None``, 0 or a negative
      value disable clipping in the fused step, as in MXNet (see above for
      ``use_fused_step=False``).
    lr_mult: optional pytree of per-parameter learning-rate multipliers with
      the parameters' structure (MXNet's ``lr_mult``). A multiplier of 0
      freezes that parameter.
    wd_mult: optional pytree of per-parameter weight-decay multipliers with
      the parameters' structure (MXNet's ``wd_mult``).
    mxnet_version: keyword only, required: 1 (MXNet 1.x: weight decay, then
      clipping) or 2 (MXNet 2.0: clipping, then weight decay).
    use_fused_step: keyword only; MXNet 2's ``use_fused_step``: True (the
      default) for the fused kernel, False for ``FTML.step``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    TypeError: for a hyperparameter of the wrong type; under
      ``optax.inject_hyperparams``, for the arguments that shape the chain
      (``mxnet_version``, ``clip_gradient``, the multipliers, and ``beta1``,
      ``beta2`` with ``use_fused_step=False``) unless named in
      ``static_args``. ``learning_rate``, ``beta1``, ``beta2``, ``epsilon``,
      ``wd`` and ``rescale_grad`` may be injected.
    ValueError: for a value outside MXNet's range (named in the message).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from optax_ftml import mxnet
    >>> # MXNet 1.9.1: mx.optimizer.FTML(learning_rate=0.01, wd=1e-4,
    >>> #                                clip_gradient=5, rescale_grad=1/32)
    >>> opt = mxnet.ftml(0.01, wd=1e-4, clip_gradient=5.0, rescale_grad=1 / 32,
    ...                  mxnet_version=1)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)
  """
  _check_version(mxnet_version, use_fused_step)
  if learning_rate is None:
    learning_rate = _DEFAULT_LEARNING_RATE[mxnet_version]
  wd, rescale_grad = _traceable(wd, "wd"), _traceable(rescale_grad, "rescale_grad")
  if clip_gradient is not None:
    clip_gradient = _static(clip_gradient, "clip_gradient")
    _validation.check_finite(clip_gradient, "clip_gradient", _CALLER)
  if not use_fused_step:  # tabulated on the host
    beta1, beta2 = _static(beta1, "beta1"), _static(beta2, "beta2")
  hyperparameters = (beta1, beta2, epsilon)
  # The caller's values, so that errors quote them unrounded.
  _validation.check_hyperparameters(
      learning_rate, *hyperparameters, caller=_CALLER,
      names=("learning_rate", "beta1", "beta2", "epsilon"))

  def group(lr_multiplier: float, wd_multiplier: float
            ) -> optax.GradientTransformationExtraArgs:
    """The chain of the parameters with these multipliers."""
    if lr_multiplier == 0:
      return optax.with_extra_args_support(optax.set_to_zero())
    # MXNet multiplies by lr_mult (and wd_mult) in Python, in double, before
    # the operator rounds the product to float (FTML.step keeps it double).
    if callable(learning_rate):
      schedule = learning_rate
      rate = lambda count: _as_operator_parameter(
          lr_multiplier * schedule(count + 1))
    elif use_fused_step or not isinstance(learning_rate, numbers.Real):
      rate = _as_operator_parameter(learning_rate * lr_multiplier)
    else:
      rate = float(learning_rate) * lr_multiplier
    preprocessing = _gradient_preprocessing(
        rescale_grad, clip_gradient, wd * wd_multiplier, mxnet_version,
        use_fused_step)
    inner = _ftml.ftml(rate, _as_operator_parameter(beta1),
                       _as_operator_parameter(beta2), epsilon)
    if not use_fused_step:
      inner = _unfused.ftml_step(rate, beta1, beta2, epsilon, inner.init)
    return optax.chain(*preprocessing, inner)

  if lr_mult is None and wd_mult is None:
    return group(1.0, 1.0)
  pairs, treedef = _multiplier_pairs(lr_mult, wd_mult, learning_rate, wd,
                                     hyperparameters)
  labels = [f"lr_mult={lr},wd_mult={wd}" for lr, wd in pairs]
  groups: dict[Hashable, optax.GradientTransformation] = {
      label: group(*pair) for label, pair in zip(labels, pairs, strict=True)}
  return optax.multi_transform(groups, treedef.unflatten(labels))


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
