"""Continuing an MXNet FTML run in Optax from MXNet's saved files."""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ftml._ftml import FTMLState
from optax_ftml._mxnet import mxnet_ftml
from optax_ftml._mxnet_files import MXNetObject
from optax_ftml._mxnet_files import MXNetTrainerStates
from optax_ftml._mxnet_files import read_mxnet_trainer_states

_FTML_KEYS = ("beta1", "beta2", "epsilon", "wd", "rescale_grad",
              "clip_gradient")
_HYPERPARAMETER_KEYS = frozenset(
    {"learning_rate", *_FTML_KEYS, "lr_mult", "wd_mult", "mxnet_version"})


def _warmup(s: Mapping[str, Any], n: jax.Array) -> jax.Array:
  """``LRScheduler.get_warmup_lr(n)``, for ``n < warmup_steps``."""
  begin = s["warmup_begin_lr"]
  if s["warmup_mode"] == "constant":
    return jnp.full_like(n, begin)
  if s["warmup_mode"] != "linear":
    raise ValueError(f"unknown MXNet warm-up mode {s['warmup_mode']!r}.")
  return begin + (s["warmup_final_lr"] - begin) * n / s["warmup_steps"]


# Factor schedules multiply by the factor again and again in Python floats;
# their successive values are tabulated in float64 (then rounded once, as
# MXNet's kernel rounds the learning rate to float32), up to this many.
_MAX_TABULATED_DECAYS = 10_000


def _decayed(table: list[float], decays: jax.Array) -> jax.Array:
  """``table[decays]``, the last entry for larger ``decays``."""
  values = jnp.asarray(np.asarray(table, np.float64).astype(float))
  return values[jnp.clip(decays, 0, len(table) - 1).astype(int)]


def _factor(s: Mapping[str, Any], n: jax.Array) -> jax.Array:
  # The scheduler multiplies base_lr by factor each time num_update passes
  # count + step (count and base_lr as pickled, possibly mid-run), and holds
  # it at stop_factor_lr once below.
  table = [s["base_lr"]]
  while (len(table) <= _MAX_TABULATED_DECAYS and s["factor"] != 1
         and table[-1] != s["stop_factor_lr"]):
    table.append(max(table[-1] * s["factor"], s["stop_factor_lr"]))
  decays = jnp.maximum(0, (n - s["count"] - 1) // s["step"])
  beyond = jnp.maximum(0, decays - (len(table) - 1))
  return jnp.maximum(_decayed(table, decays) * s["factor"] ** beyond,
                     s["stop_factor_lr"] if len(table) > 1 else 0)


def _multi_factor(s: Mapping[str, Any], n: jax.Array) -> jax.Array:
  table = [s["base_lr"]]
  for _ in s["step"][s["cur_step_ind"]:]:
    table.append(table[-1] * s["factor"])
  passed = sum(jnp.where(n > step, 1, 0) for step in s["step"])
  return _decayed(table, passed - s["cur_step_ind"])


def _remaining(s: Mapping[str, Any], n: jax.Array) -> jax.Array:
  """``1 - (n - warmup_steps) / max_steps``, the fraction of the decay left,
  0 past ``max_update`` (where the schedulers keep their last value). The
  integer difference first: no cancellation in float32."""
  return (s["max_update"] - jnp.minimum(n, s["max_update"])) / s["max_steps"]


def _polynomial(s: Mapping[str, Any], n: jax.Array) -> jax.Array:
  return s["final_lr"] + (s["base_lr_orig"] - s["final_lr"]) * _remaining(
      s, n) ** s["power"]


def _cosine(s: Mapping[str, Any], n: jax.Array) -> jax.Array:
  # (1 + cos(pi * done)) / 2 = sin(pi / 2 * (1 - done))**2, accurate near 0.
  return s["final_lr"] + (s["base_lr_orig"] - s["final_lr"]) * jnp.sin(
      jnp.pi / 2 * _remaining(s, n)) ** 2


_SCHEDULES = {"FactorScheduler": _factor,
              "MultiFactorScheduler": _multi_factor,
              "PolyScheduler": _polynomial,
              "CosineScheduler": _cosine}


def mxnet_lr_schedule(scheduler: MXNetObject) -> Callable[[Any], jax.Array]:
  """The Optax-traceable equivalent of a pickled MXNet learning-rate scheduler.

  Supports MXNet 1.9's ``FactorScheduler``, ``MultiFactorScheduler``,
  ``PolyScheduler`` and ``CosineScheduler``, with their linear or constant
  warm-up. MXNet's schedulers are stateful and pickled mid-run (e.g. a
  ``FactorScheduler``'s ``base_lr`` has already been decayed ``count /
  step`` times; the warm-up's target is kept in ``warmup_final_lr``, the
  polynomial and cosine schedules' start in ``base_lr_orig``): the returned
  schedule continues from the pickled state, giving the learning rates MXNet
  would use next.

  The schedule follows MXNet's convention, as :func:`mxnet_ftml` expects: it
  is called with the 1-based update count ``num_update``. It computes in
  JAX's default float precision, MXNet in Python floats: the rates agree to
  float32 rounding (MXNet's kernel rounds them to float32).

  Args:
    scheduler: the ``lr_scheduler`` record of a pickled MXNet optimizer (see
      :func:`read_mxnet_trainer_states`), or a pickled scheduler read with it.

  Returns:
    A function of the 1-based update count (an integer or an integer array)
    returning the learning rate.

  Raises:
    ValueError: for a scheduler class other than the four above (named in the
      message), or one missing attributes MXNet 1.9 pickles.

  Examples:
    >>> import importlib.resources
    >>> from optax_ftml import read_mxnet_trainer_states
    >>> example = importlib.resources.files("optax_ftml") / "mxnet_example"
    >>> saved = read_mxnet_trainer_states(example / "trainer.states")
    >>> scheduler = saved.optimizer.attributes["lr_scheduler"]
    >>> scheduler.class_name, scheduler.attributes["base_lr_orig"]
    ('CosineScheduler', 0.02)
    >>> schedule = mxnet_lr_schedule(scheduler)
    >>> print(f"{schedule(101):.6f}")  # the learning rate of MXNet's step 101
    0.016532
  """
  if not isinstance(scheduler, MXNetObject):
    raise TypeError(
        "mxnet_lr_schedule: scheduler must be a scheduler read from an MXNet"
        f" file (an MXNetObject), got {type(scheduler).__name__}.")
  after_warmup = _SCHEDULES.get(scheduler.class_name)
  if after_warmup is None:
    raise ValueError(
        f"mxnet_lr_schedule: unsupported MXNet scheduler {scheduler.mxnet_class}"
        f"; supported: {', '.join(sorted(_SCHEDULES))}. Pass the learning rate"
        " or an equivalent schedule yourself.")
  s = scheduler.attributes
  try:
    after_warmup(s, jnp.asarray(1.0))
    _warmup(s, jnp.asarray(1.0))
  except KeyError as e:
    raise ValueError(
        f"mxnet_lr_schedule: the pickled {scheduler.class_name} lacks the"
        f" attribute {e}; it was not written by MXNet 1.x.") from None

  def schedule(num_update):
    # Float arithmetic throughout (exact for counts below 2**24).
    n = jnp.asarray(num_update).astype(float)
    return jnp.where(n < s["warmup_steps"], _warmup(s, n), after_warmup(s, n))

  return schedule


def module_wd_mult(names: Any) -> Any:
  """The weight-decay multipliers MXNet 1.x's Module API gives its parameters.

  The Module API (``mx.mod.Module``) creates its optimizer with the symbol's
  parameter names, and the optimizer then sets ``wd_mult = 0`` for every
  parameter whose name ends neither in ``_weight`` nor in ``_gamma`` (biases,
  BatchNorm's ``beta``, ...): those are not decayed. Gluon does not do this
  (there every parameter has ``wd_mult = 1`` unless set). Pass the result to
  :func:`mxnet_ftml`'s ``wd_mult`` (or :func:`resume_mxnet_ftml`'s) to train
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
    >>> module_wd_mult({"w": "fc1_weight", "b": "fc1_bias"})
    {'b': 0.0, 'w': 1.0}
  """
  def multiplier(name):
    if not isinstance(name, str):
      raise TypeError(
          f"module_wd_mult: names must be strings, got {type(name).__name__}.")
    return 1.0 if name.endswith(("_weight", "_gamma")) else 0.0
  return jax.tree.map(multiplier, names)


def mxnet_to_flax_layout(name: str, array: np.ndarray) -> np.ndarray:
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
    >>> mxnet_to_flax_layout("0.weight", np.zeros((8, 1, 3, 3))).shape
    (3, 3, 1, 8)
  """
  del name
  if array.ndim < 2:
    return array
  return np.transpose(array, (*range(2, array.ndim), 1, 0))


def _leaf_names(params: Any) -> list[str]:
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return [jax.tree_util.keystr(path, simple=True, separator=".")
          for path, _ in paths]


def _indices_by_leaf(names: list[str], states: Mapping[int, Any],
                     indices: Mapping[str, int] | None) -> list[int]:
  stateful = sorted(states)
  if indices is None:
    if len(stateful) != len(names):
      raise ValueError(
          f"resume_mxnet_ftml: the file has states for {len(stateful)}"
          f" parameters (indices {stateful}) but params has {len(names)}"
          " leaves; pass indices={leaf name: trainer index} to map them.")
    return stateful
  unknown = sorted(set(indices) - set(names))
  missing = [name for name in names if name not in indices]
  if unknown or missing:
    raise ValueError(
        "resume_mxnet_ftml: indices must name every leaf of params exactly"
        f" once; not leaves: {unknown}, leaves without an index: {missing}."
        f" The leaves are {names}.")
  chosen = [indices[name] for name in names]
  without_state = [(n, i) for n, i in zip(names, chosen, strict=True)
                   if i not in states]
  if without_state:
    raise ValueError(
        "resume_mxnet_ftml: the file has no state for (leaf, index)"
        f" {without_state}; it has states for indices {stateful} (parameters"
        " with grad_req='null', e.g. BatchNorm's running statistics, have none).")
  if len(set(chosen)) != len(chosen):
    raise ValueError(f"resume_mxnet_ftml: indices repeat an index: {indices}.")
  unused = sorted(set(stateful) - set(chosen))
  if unused:
    raise ValueError(
        f"resume_mxnet_ftml: the file's states for indices {unused} are not"
        " mapped to any leaf of params; every updated parameter must be resumed.")
  return chosen


def _ftml_arrays(state: Any, index: int) -> tuple[np.ndarray, ...]:
  if (isinstance(state, tuple) and len(state) == 2
      and isinstance(state[0], np.ndarray) and isinstance(state[1], tuple)):
    raise ValueError(
        f"resume_mxnet_ftml: the state of index {index} is a multi-precision"
        " state (a float32 master weight and its FTML state), which is not"
        " supported: save it with multi_precision=False (float32 weights).")
  if not (isinstance(state, tuple) and len(state) == 3
          and all(isinstance(x, np.ndarray) for x in state)):
    raise ValueError(
        f"resume_mxnet_ftml: the state of index {index} is not FTML's"
        f" (d, v, z) arrays: {type(state).__name__}.")
  return state


def _per_leaf(indices: list[int], table: Mapping[Any, Any],
              idx2name: Mapping[int, str]) -> list[float]:
  """MXNet's per-index multiplier lookup (by index, then by name)."""
  def lookup(index):
    if index in table:
      return float(table[index])
    return float(table.get(idx2name.get(index), 1.0))
  return [lookup(index) for index in indices]


def _file_hyperparameters(optimizer: MXNetObject, indices: list[int]
                          ) -> tuple[dict[str, Any], int]:
  """mxnet_ftml's arguments and the step count from a pickled FTML."""
  if optimizer.class_name != "FTML":
    raise ValueError(
        f"resume_mxnet_ftml: the file holds an {optimizer.mxnet_class}"
        " optimizer, not FTML.")
  a = optimizer.attributes
  try:
    hyperparameters = {key: a[key] for key in _FTML_KEYS}
    counts = {index: a["_index_update_count"].get(index) for index in indices}
    num_update = a["num_update"]
    scheduler = a["lr_scheduler"]
    lr = a["lr"]
  except KeyError as e:
    raise ValueError(
        f"resume_mxnet_ftml: the pickled FTML lacks the attribute {e}.") from None
  if a.get("multi_precision"):
    raise ValueError(
        "resume_mxnet_ftml: the optimizer used multi_precision=True, which is"
        " not supported.")
  hyperparameters["learning_rate"] = (
      mxnet_lr_schedule(scheduler) if scheduler is not None else lr)
  hyperparameters["mxnet_version"] = (
      2 if optimizer.mxnet_class.startswith("mxnet.optimizer.ftml") else 1)
  idx2name = a.get("idx2name", {})
  for key in ("lr_mult", "wd_mult"):
    if a.get(key):
      hyperparameters[key] = _per_leaf(indices, a[key], idx2name)
  if None in counts.values():
    raise ValueError(
        "resume_mxnet_ftml: no step count for indices"
        f" {[i for i, c in counts.items() if c is None]}.")
  if len(set(counts.values())) != 1:
    raise ValueError(
        "resume_mxnet_ftml: the parameters were updated different numbers of"
        f" times ({counts} by index); one Optax state has one step count.")
  count = next(iter(counts.values()))
  if count != num_update:
    raise ValueError(
        f"resume_mxnet_ftml: the parameters were updated {count} times but the"
        f" optimizer's num_update (which its scheduler sees) is {num_update}.")
  return hyperparameters, count


def _replace_ftml_buffers(state: Any, count: int, buffers: Mapping[str, Any]
                          ) -> Any:
  """``state`` (from ``init``) with every FTMLState's count and buffers set.

  Inside ``optax.multi_transform`` each group's buffers are masked trees: the
  other groups' leaves are ``optax.MaskedNode``; they stay so. Each buffer is
  placed with the sharding ``init`` gave it (a sharded model's state stays
  sharded like its parameters).
  """
  def fill(masked, full):
    return jax.tree.map(
        lambda m, f: m if isinstance(m, optax.MaskedNode) else jax.device_put(
            np.asarray(f, m.dtype), m.sharding), masked, full,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))

  def replace(s):
    if not isinstance(s, FTMLState):
      return s
    return s._replace(count=jnp.asarray(count, s.count.dtype),
                      **{k: fill(getattr(s, k), v) for k, v in buffers.items()})

  return jax.tree.map(replace, state, is_leaf=lambda s: isinstance(s, FTMLState))


def resume_mxnet_ftml(
    trainer_states: str | os.PathLike | bytes | MXNetTrainerStates,
    params: optax.Params,
    *,
    indices: Mapping[str, int] | None = None,
    layout: Callable[[str, np.ndarray], np.ndarray] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    num_update: int | None = None,
) -> tuple[optax.GradientTransformationExtraArgs, optax.OptState]:
  """The :func:`mxnet_ftml` optimizer and state that continue an MXNet FTML run.

  Reads MXNet's trainer-state file (without MXNet; see
  :func:`read_mxnet_trainer_states`) and returns the optimizer with the file's
  hyperparameters (learning rate or scheduler, ``beta1``, ``beta2``,
  ``epsilon``, ``wd``, ``rescale_grad``, ``clip_gradient``, MXNet's version)
  and the state ``optimizer.init(params)`` would have after MXNet's updates:
  FTML's ``d``, ``v``, ``z`` and the step count. The next
  ``optimizer.update(grads, state, params)`` then computes the step MXNet
  would have computed next, to float32 rounding.

  The parameter values themselves are in MXNet's parameter file (see
  :func:`read_mxnet_params`); ``params`` must already hold them.

  Mapping MXNet's parameters onto ``params``: the file keys states by the
  parameter's index in the trainer. Gluon's ``Trainer(net.collect_params())``
  numbers the parameters in the order of their sorted full names
  (``sorted(net.collect_params().keys())``, e.g. ``dense0_bias`` before
  ``dense0_weight``), and parameters with ``grad_req='null'`` (BatchNorm's
  running statistics) have an index but no state. The Module API numbers them
  in the order of ``mod._param_names`` (the symbol's arguments without its
  inputs). By default the leaves of ``params`` (in ``jax.tree.leaves`` order)
  take the indices that have a state in increasing order; otherwise
  ``indices`` names each leaf's index.

  Args:
    trainer_states: Gluon's ``trainer.save_states`` file, a Module
      ``save_optimizer_states`` (``.states``) file, as a path or bytes, or
      what :func:`read_mxnet_trainer_states` returned.
    params: the parameters (MXNet's values, in JAX's layout), a pytree.
    indices: optional map from each leaf's name to its trainer index. A
      leaf's name is its path with ``.`` between keys
      (``jax.tree_util.keystr(path, simple=True, separator=".")``), e.g.
      ``"0.weight"`` for ``{"0.weight": w}`` or ``"conv.kernel"`` for a Flax
      NNX parameter state.
    layout: optional ``layout(leaf_name, array) -> array`` converting an array
      from MXNet's layout to the leaf's (e.g. :func:`mxnet_to_flax_layout`);
      applied to ``d``, ``v`` and ``z`` alike.
    hyperparameters: :func:`mxnet_ftml` arguments overriding the file's (any
      of ``learning_rate``, ``beta1``, ``beta2``, ``epsilon``, ``wd``,
      ``rescale_grad``, ``clip_gradient``, ``lr_mult``, ``wd_mult``,
      ``mxnet_version``). Gluon keeps per-parameter ``lr_mult`` and
      ``wd_mult`` on its ``Parameter`` objects, not in the file: pass them
      here (pytrees like ``params``) if the run set any. Required for Module
      files, which hold no optimizer: then at least ``learning_rate`` and
      ``rescale_grad`` (the Module API sets it to ``1 / batch_size``); the
      others default to MXNet 1.x's values.
    num_update: the number of updates made, required for (and only allowed
      with) Module files, which do not record it.

  Returns:
    ``(optimizer, state)``: an :class:`optax.GradientTransformationExtraArgs`
    (:func:`mxnet_ftml`) and its state for ``params``.

  Raises:
    MXNetFileError: (a ``ValueError``) if the file cannot be read safely.
    ValueError: if the file holds another optimizer or multi-precision
      states; if a parameter has no state, the parameters were updated
      different numbers of times, or states are left unmapped; if shapes do
      not match after ``layout``; if a Module file comes without
      ``learning_rate``, ``rescale_grad`` or ``num_update``; if the scheduler
      is not one MXNet ships (:func:`mxnet_lr_schedule`).

  Examples:
    A Gluon network (``Conv2D`` then ``Dense``) saved after 100 FTML steps,
    shipped with this package:

    >>> import importlib.resources
    >>> import jax, jax.numpy as jnp
    >>> from optax_ftml import read_mxnet_params
    >>> example = importlib.resources.files("optax_ftml") / "mxnet_example"
    >>> weights = read_mxnet_params(example / "model.params")
    >>> params = {name: jnp.asarray(w) for name, w in weights.items()}
    >>> # The trainer's order: sorted full names, hybridsequential0_conv0_bias,
    >>> # ..._conv0_weight, ..._dense0_bias, ..._dense0_weight.
    >>> optimizer, state = resume_mxnet_ftml(
    ...     example / "trainer.states", params,
    ...     indices={"0.bias": 0, "0.weight": 1, "3.bias": 2, "3.weight": 3})
    >>> state  # rescale_grad and wd come before FTML in the chain
    (EmptyState(), EmptyState(), FTMLState(count=Array(100, dtype=int32), ...))
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = optimizer.update(grads, state, params)
    >>> int(state[-1].count)
    101

    With Gluon's per-parameter multipliers (not in the file), e.g. biases
    without weight decay:
    ``hyperparameters={"wd_mult": {"0.bias": 0.0, "0.weight": 1.0, ...}}``;
    with Flax's layouts: ``layout=mxnet_to_flax_layout``.
  """
  saved = (trainer_states if isinstance(trainer_states, MXNetTrainerStates)
           else read_mxnet_trainer_states(trainer_states))
  overrides = dict(hyperparameters or {})
  if not set(overrides) <= _HYPERPARAMETER_KEYS:
    raise ValueError(
        "resume_mxnet_ftml: unknown hyperparameters"
        f" {sorted(set(overrides) - _HYPERPARAMETER_KEYS)}; allowed:"
        f" {sorted(_HYPERPARAMETER_KEYS)}.")
  names = _leaf_names(params)
  leaf_indices = _indices_by_leaf(names, saved.states, indices)

  if saved.optimizer is None:
    needed = [k for k in ("learning_rate", "rescale_grad") if k not in overrides]
    if needed or num_update is None:
      raise ValueError(
          "resume_mxnet_ftml: this file holds only the states (the Module"
          " API's save_optimizer_states): pass hyperparameters with"
          f" {needed or 'the values'} and num_update=<updates made so far>"
          f"{' (missing)' if num_update is None else ''}.")
    if isinstance(num_update, bool) or not isinstance(num_update, int) or (
        num_update < 1):
      raise ValueError(
          f"resume_mxnet_ftml: num_update must be an integer >= 1, got"
          f" {num_update!r}.")
    if overrides.get("wd", 0) != 0 and "wd_mult" not in overrides:
      raise ValueError(
          "resume_mxnet_ftml: the Module API gives parameters whose names end"
          " neither in _weight nor in _gamma (biases, ...) wd_mult 0, and this"
          " file does not name the parameters: with wd, pass"
          " hyperparameters={..., 'wd_mult': module_wd_mult(names)} (or the"
          " multipliers the run used).")
    file_values, count = {"mxnet_version": 1}, num_update
  else:
    if num_update is not None:
      raise ValueError(
          "resume_mxnet_ftml: num_update is read from the file; pass it only"
          " for Module files, which hold no optimizer.")
    file_values, count = _file_hyperparameters(saved.optimizer, leaf_indices)
  arguments = {**file_values, **overrides}
  treedef = jax.tree.structure(params)
  for key in ("lr_mult", "wd_mult"):
    if isinstance(arguments.get(key), list):  # per leaf, from the file
      arguments[key] = treedef.unflatten(arguments[key])

  buffers: dict[str, list[np.ndarray]] = {"d_prev": [], "v": [], "z": []}
  for name, index, leaf in zip(names, leaf_indices, jax.tree.leaves(params),
                               strict=True):
    for key, array in zip(("d_prev", "v", "z"),
                          _ftml_arrays(saved.states[index], index),
                          strict=True):
      converted = layout(name, array) if layout is not None else array
      if np.shape(converted) != np.shape(leaf):
        raise ValueError(
            f"resume_mxnet_ftml: the state of index {index} has shape"
            f" {np.shape(converted)} for leaf {name!r} of shape"
            f" {np.shape(leaf)}" + ("" if layout else "; pass layout=... to"
                                    " convert MXNet's layout")
            + ("" if indices else "; the leaves took the file's indices in"
               " increasing order: if the trainer numbered them otherwise"
               " (the Module API: the symbol's order), pass indices={leaf"
               " name: trainer index}") + ".")
      buffers[key].append(converted)

  optimizer = mxnet_ftml(**arguments)
  state = _replace_ftml_buffers(
      optimizer.init(params), count,
      {k: treedef.unflatten(v) for k, v in buffers.items()})
  return optimizer, state
