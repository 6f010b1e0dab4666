"""Continuing an MXNet FTML run in Optax from MXNet's saved files."""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from optax_ftml._ftml import FTMLState
from optax_ftml.mxnet._files import FileError
from optax_ftml.mxnet._files import PickledObject
from optax_ftml.mxnet._files import TrainerStates
from optax_ftml.mxnet._files import read_trainer_states
from optax_ftml.mxnet._files import source_name
from optax_ftml.mxnet._optimizer import ftml
from optax_ftml.mxnet._records import RecordFields
from optax_ftml.mxnet._schedules import lr_schedule

_FTML_KEYS = ("beta1", "beta2", "epsilon", "wd", "rescale_grad",
              "clip_gradient")
# The largest multiplier a file may give (MXNet's kernel computes in float32).
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# What hyperparameters= may override: ftml's arguments.
_HYPERPARAMETER_KEYS = frozenset(inspect.signature(ftml).parameters)


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
          f"mxnet.resume: the file has states for {len(stateful)}"
          f" parameters (indices {stateful}) but params has {len(names)}"
          " leaves; pass indices={leaf name: trainer index} to map them.")
    return stateful
  unknown = sorted(set(indices) - set(names))
  missing = [name for name in names if name not in indices]
  if unknown or missing:
    raise ValueError(
        "mxnet.resume: indices must name every leaf of params exactly"
        f" once; not leaves: {unknown}, leaves without an index: {missing}."
        f" The leaves are {names}.")
  chosen = [indices[name] for name in names]
  without_state = [(n, i) for n, i in zip(names, chosen, strict=True)
                   if i not in states]
  if without_state:
    raise ValueError(
        "mxnet.resume: the file has no state for (leaf, index)"
        f" {without_state}; it has states for indices {stateful} (parameters"
        " with grad_req='null', e.g. BatchNorm's running statistics, have none).")
  if len(set(chosen)) != len(chosen):
    raise ValueError(f"mxnet.resume: indices repeat an index: {indices}.")
  unused = sorted(set(stateful) - set(chosen))
  if unused:
    raise ValueError(
        f"mxnet.resume: the file's states for indices {unused} are not"
        " mapped to any leaf of params; every updated parameter must be resumed.")
  return chosen


class _LeafState(NamedTuple):
  """A parameter's saved state: FTML's ``(d, v, z)`` and, with
  ``multi_precision=True`` and a float16 weight, the float32 master weight."""

  buffers: tuple[np.ndarray, np.ndarray, np.ndarray]
  master: np.ndarray | None


def _leaf_state(state: Any, index: int) -> _LeafState:
  master = None
  if (isinstance(state, tuple) and len(state) == 2
      and isinstance(state[0], np.ndarray) and isinstance(state[1], tuple)):
    master, state = state
  if not (isinstance(state, tuple) and len(state) == 3
          and all(isinstance(x, np.ndarray) for x in state)):
    raise FileError(
        f"the state of index {index} is not FTML's (d, v, z) arrays"
        f"{' with a master weight' if master is not None else ''}:"
        f" {type(state).__name__}"
        f"{f' of {len(state)}' if isinstance(state, (tuple, list)) else ''}.")
  return _LeafState(state, master)


@dataclasses.dataclass(frozen=True)
class _FileArray:
  """An array from the file and what it is, until it is cast to the dtype
  ``init`` gives its buffer (a leaf of JAX's trees)."""
  array: np.ndarray
  what: str


def _cast(file_array: _FileArray, dtype: Any) -> np.ndarray:
  """The file's array in ``dtype``: refused unless every value is finite
  there (a cast must not make infinities or keep NaN), and cast with NumPy's
  floating-point warnings raised."""
  values = np.asarray(file_array.array)
  wide = values.astype(np.float64)
  outside = ~(np.abs(wide) <= float(ml_dtypes.finfo(dtype).max))  # NaN too
  if outside.any():
    name = np.dtype(dtype).name
    raise FileError(
        f"{file_array.what} holds {wide[outside][0]!r}, which is not a finite"
        f" {name}: the state in {name} cannot hold it.")
  with np.errstate(all="raise"):
    return values.astype(dtype)


def _per_leaf(f: RecordFields, key: str, indices: list[int],
              idx2name: Mapping[Any, Any]) -> list[float] | None:
  """The optimizer's ``lr_mult`` or ``wd_mult`` for each index, looked up as
  MXNet does: by index, then by the index's name, else 1."""
  table = f.of_type(key, dict, default={})
  if not table:
    return None
  def lookup(index):
    if index in table:
      return float(f.real(f"{key}[{index}]", 0.0, _FLOAT32_MAX,
                          value=table[index]))
    name = idx2name.get(index)
    if name is not None and type(name) is not str:
      raise f.error(f"idx2name[{index}]", name, "a string")
    return float(f.real(f"{key}[{name!r}]", 0.0, _FLOAT32_MAX,
                        value=table.get(name, 1.0)))
  return [lookup(index) for index in indices]


def _step_count(f: RecordFields, indices: list[int]) -> int:
  """The number of updates every resumed parameter had (one Optax count)."""
  counts = f.of_type("_index_update_count", dict)
  missing = [index for index in indices if index not in counts]
  if missing:
    raise FileError(f"no step count for indices {missing[:20]}.")
  by_index = {i: f.count(f"_index_update_count[{i}]", value=counts[i])
              for i in indices}
  if len(set(by_index.values())) != 1:
    raise FileError(
        "the parameters were updated different numbers of times"
        f" ({dict(list(by_index.items())[:20])} by index); one Optax state has"
        " one step count.")
  count = by_index[indices[0]]
  num_update = f.count("num_update")
  if count != num_update:
    raise FileError(
        f"the parameters were updated {count} times but the optimizer's"
        f" num_update (which its scheduler sees) is {num_update}.")
  return count


def _file_hyperparameters(optimizer: PickledObject, indices: list[int]
                          ) -> tuple[dict[str, Any], int]:
  """ftml's arguments and the step count from a pickled FTML, each
  checked to be what MXNet pickles (their ranges when ftml is built)."""
  if optimizer.class_name != "FTML":
    raise FileError(
        f"the file holds an {optimizer.mxnet_class} optimizer, not FTML.")
  f = RecordFields(optimizer)
  f.of_type("multi_precision", bool, default=False)  # per state: _leaf_state
  values: dict[str, Any] = {
      key: f.real(key) for key in _FTML_KEYS if key != "clip_gradient"}
  clip = f.get("clip_gradient")
  values["clip_gradient"] = None if clip is None else f.real("clip_gradient")
  scheduler = f.get("lr_scheduler")
  if scheduler is None:
    values["learning_rate"] = f.real("lr")
  elif not isinstance(scheduler, PickledObject):
    raise f.error("lr_scheduler", scheduler, "a learning-rate scheduler or None")
  else:
    try:
      values["learning_rate"] = lr_schedule(scheduler)
    except FileError:
      raise
    except ValueError as e:  # a scheduler lr_schedule does not support
      raise FileError(
          f"the pickled FTML's lr_scheduler: {e}".replace(
              "mxnet.lr_schedule: ", "")) from None
  # MXNet 2 moved FTML into its own module, and its step may be unfused.
  if optimizer.mxnet_class.startswith("mxnet.optimizer.ftml"):
    values["mxnet_version"] = 2
    values["use_fused_step"] = f.of_type("use_fused_step", bool, default=True)
  else:
    values["mxnet_version"] = 1
  idx2name = f.of_type("idx2name", dict, default={})
  for key in ("lr_mult", "wd_mult"):
    multipliers = _per_leaf(f, key, indices, idx2name)
    if multipliers is not None:
      values[key] = multipliers
  return values, _step_count(f, indices)


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
            _cast(f, m.dtype), m.sharding), masked, full,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))

  def replace(s):
    if not isinstance(s, FTMLState):
      return s
    return s._replace(count=jnp.asarray(count, s.count.dtype),
                      **{k: fill(getattr(s, k), v) for k, v in buffers.items()})

  return jax.tree.map(replace, state, is_leaf=lambda s: isinstance(s, FTMLState))


def _module_file_values(overrides: Mapping[str, Any], num_update: Any
                        ) -> tuple[dict[str, Any], int]:
  """A Module file holds no optimizer: what the caller must pass instead."""
  needed = [k for k in ("learning_rate", "rescale_grad") if k not in overrides]
  if needed or num_update is None:
    raise ValueError(
        "mxnet.resume: this file holds only the states (the Module"
        " API's save_optimizer_states): pass hyperparameters with"
        f" {needed or 'the values'} and num_update=<updates made so far>"
        f"{' (missing)' if num_update is None else ''}.")
  if isinstance(num_update, bool) or not isinstance(num_update, int) or not (
      1 <= num_update < 2**31):
    raise ValueError(
        f"mxnet.resume: num_update must be an integer in [1, 2**31), got"
        f" {num_update!r}.")
  if overrides.get("wd", 0) != 0 and "wd_mult" not in overrides:
    raise ValueError(
        "mxnet.resume: the Module API gives parameters whose names end"
        " neither in _weight nor in _gamma (biases, ...) wd_mult 0, and this"
        " file does not name the parameters: with wd, pass"
        " hyperparameters={..., 'wd_mult': mxnet.module_wd_mult(names)} (or the"
        " multipliers the run used).")
  return {"mxnet_version": 1}, num_update


def _multipliers_like(key: str, multipliers: Any, params: Any,
                      names: list[str]) -> Any:
  """``multipliers`` with the structure of ``params``: a tree naming only
  some leaves gives the others 1, as MXNet does for parameters without one."""
  if jax.tree.structure(multipliers) == jax.tree.structure(params):
    return multipliers
  given = dict(zip(_leaf_names(multipliers), jax.tree.leaves(multipliers),
                   strict=True))
  unknown = sorted(set(given) - set(names))
  if unknown:
    raise ValueError(
        f"mxnet.resume: hyperparameters[{key!r}] names {unknown}, which"
        f" are not leaves of params; the leaves are {names}.")
  return jax.tree.structure(params).unflatten(
      [given.get(name, 1.0) for name in names])


def _leaf_states(states: Mapping[int, Any], params: Any, names: list[str],
                 leaf_indices: list[int], layout: Any, by_default_order: bool
                 ) -> list[_LeafState]:
  """Each leaf's saved state, in the leaf's layout, its shape checked."""
  out = []
  for name, index, leaf in zip(names, leaf_indices, jax.tree.leaves(params),
                               strict=True):
    saved = _leaf_state(states[index], index)
    converted = [a if layout is None else layout(name, a)
                 for a in (*saved.buffers, *[m for m in [saved.master]
                                             if m is not None])]
    buffers, master = tuple(converted[:3]), (converted[3] if len(converted) > 3
                                             else None)
    for array in converted:
      if np.shape(array) != np.shape(leaf):
        raise ValueError(
            f"mxnet.resume: the state of index {index} has shape"
            f" {np.shape(array)} for leaf {name!r} of shape"
            f" {np.shape(leaf)}" + ("" if layout else "; pass layout=... to"
                                    " convert MXNet's layout")
            + ("; the leaves took the file's indices in increasing order: if"
               " the trainer numbered them otherwise (the Module API: the"
               " symbol's order), pass indices={leaf name: trainer index}"
               if by_default_order else "") + ".")
    out.append(_LeafState(buffers, master))  # pyright: ignore[reportArgumentType]
  return out


def _read(trainer_states: str | os.PathLike | bytes | TrainerStates
          ) -> tuple[TrainerStates, str]:
  if isinstance(trainer_states, TrainerStates):
    return trainer_states, "the trainer states"
  return read_trainer_states(trainer_states), source_name(trainer_states)


def master_weights(
    trainer_states: str | os.PathLike | bytes | TrainerStates,
    params: optax.Params,
    *,
    indices: Mapping[str, int] | None = None,
    layout: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> optax.Params:
  """The float32 master weights of a ``multi_precision=True`` MXNet run.

  With ``multi_precision=True`` and float16 weights, MXNet keeps a float32
  copy of each weight in the trainer's states and steps that copy; the
  float16 weight is its cast. To continue such a run, optimize these masters
  (pass them to :func:`resume` as ``params``) and run the float16 model on
  their cast: ``jax.tree.map(lambda m: m.astype(jnp.float16), masters)``;
  ``jax.grad`` through the cast gives the float16 gradients widened to
  float32, as MXNet feeds its master.

  Args:
    trainer_states: as for :func:`resume`.
    params: the parameters (the float16 weights of MXNet's parameter file, in
      JAX's layout), a pytree; ``indices`` and ``layout`` map them to the
      file's states as for :func:`resume`.
    indices: as for :func:`resume`.
    layout: as for :func:`resume`.

  Returns:
    ``params`` with each leaf that has a master weight replaced by it
    (float32); leaves without one (weights that were float32) are kept.

  Raises:
    FileError: (a ``ValueError``) for anything wrong with the file's
      content, naming the file: as :func:`resume` (states that are not
      FTML's, a master weight not finite in float32).
    ValueError: as :func:`resume`, for states that cannot be mapped onto
      ``params``.
  """
  saved, source = _read(trainer_states)
  names = _leaf_names(params)
  leaf_indices = _indices_by_leaf(names, saved.states, indices)
  try:
    states = _leaf_states(saved.states, params, names, leaf_indices, layout,
                          by_default_order=indices is None)
    return jax.tree.structure(params).unflatten([
        leaf if state.master is None else jnp.asarray(_cast(_FileArray(
            state.master, f"the master weight of index {index}"), np.float32))
        for leaf, state, index in zip(jax.tree.leaves(params), states,
                                      leaf_indices, strict=True)])
  except FileError as e:  # the file's content: named with the file
    raise FileError(f"mxnet.master_weights: {source}: {e}") from None


def _check_masters(params: Any, names: list[str], states: list[_LeafState]
                   ) -> None:
  """Multi-precision states step float32 masters: ``params`` must be them."""
  for name, leaf, state in zip(names, jax.tree.leaves(params), states,
                               strict=True):
    if state.master is not None and jnp.result_type(leaf) != jnp.float32:
      raise ValueError(
          f"mxnet.resume: the file was saved with multi_precision=True: leaf"
          f" {name!r} ({jnp.result_type(leaf)}) has a float32 master weight,"
          " which MXNet steps and casts to the float16 weight. Resume the"
          " masters: masters = mxnet.master_weights(file, params) (same"
          " indices and layout), then mxnet.resume(file, masters), and run"
          " the model on jax.tree.map(lambda m: m.astype(jnp.float16),"
          " masters).")


def resume(
    trainer_states: str | os.PathLike | bytes | TrainerStates,
    params: optax.Params,
    *,
    indices: Mapping[str, int] | None = None,
    layout: Callable[[str, np.ndarray], np.ndarray] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    num_update: int | None = None,
) -> tuple[optax.GradientTransformationExtraArgs, optax.OptState]:
  """The :func:`ftml` optimizer and state that continue an MXNet FTML run.

  Reads MXNet's trainer-state file (without MXNet; see
  :func:`read_trainer_states`) and returns the optimizer with the file's
  hyperparameters (learning rate or scheduler, ``beta1``, ``beta2``,
  ``epsilon``, ``wd``, ``rescale_grad``, ``clip_gradient``; MXNet's version,
  from the optimizer's class: ``mxnet.optimizer.ftml.FTML`` is MXNet 2's,
  whose ``use_fused_step`` the file records; Module files are MXNet 1.x's)
  and the state ``optimizer.init(params)`` would have after MXNet's updates:
  FTML's ``d``, ``v``, ``z`` and the step count. The next
  ``optimizer.update(grads, state, params)`` then computes the step MXNet
  would have computed next, to float32 rounding.

  Half precision: a run saved with ``multi_precision=True`` and float16
  weights keeps a float32 master copy of each weight in this file, and MXNet
  steps the master (the float16 weight is its cast). Continue it on the
  masters: ``masters = master_weights(file, params)`` (:func:`master_weights`),
  ``resume(file, masters)``, and the float16 model on their cast.

  The parameter values themselves are in MXNet's parameter file (see
  :func:`read_params`); ``params`` must already hold them.

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
      what :func:`read_trainer_states` returned.
    params: the parameters (MXNet's values, in JAX's layout), a pytree.
    indices: optional map from each leaf's name to its trainer index. A
      leaf's name is its path with ``.`` between keys
      (``jax.tree_util.keystr(path, simple=True, separator=".")``), e.g.
      ``"0.weight"`` for ``{"0.weight": w}`` or ``"conv.kernel"`` for a Flax
      NNX parameter state.
    layout: optional ``layout(leaf_name, array) -> array`` converting an array
      from MXNet's layout to the leaf's (e.g. :func:`to_flax_layout`);
      applied to ``d``, ``v`` and ``z`` alike.
    hyperparameters: :func:`~optax_ftml.mxnet.ftml` arguments overriding the file's (any
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
    (:func:`~optax_ftml.mxnet.ftml`) and its state for ``params``.

  Raises:
    FileError: (a ``ValueError``) for anything wrong with the file's content,
      in reading, checking or building the optimizer from it, the message
      naming the file and what is wrong: the file cannot be read safely
      (:func:`read_trainer_states`); it holds another optimizer, or states
      that are not FTML's ``(d, v, z)`` arrays (with a master weight); its
      ``lr_scheduler`` is not a scheduler MXNet ships (:func:`lr_schedule`)
      or has attributes outside MXNet's ranges; its hyperparameters are ones
      :func:`~optax_ftml.mxnet.ftml` refuses; a value is not finite in the
      dtype it is cast to (a float64 state of 1e300 is refused, not made a
      float32 infinity: values are checked before the cast, which raises on
      any floating-point warning); its parameters were updated different
      numbers of times.
    ValueError: for a wrong argument, naming it: ``indices`` that do not map
      each leaf to its own index with a state (or, without ``indices``, a
      number of leaves other than the file's states); ``params`` whose shapes
      do not match after ``layout``, or a leaf with a multi-precision state
      that is not float32 (its master); unknown or out-of-range
      ``hyperparameters``; ``num_update`` with a Gluon file, or a Module file
      without ``learning_rate``, ``rescale_grad`` or ``num_update``.
    TypeError: if ``trainer_states`` is neither a path, bytes nor a
      :class:`TrainerStates`.

  Examples:
    A Gluon network (``Conv2D`` then ``Dense``) saved after 100 FTML steps,
    shipped with this package:

    >>> import importlib.resources
    >>> import jax, jax.numpy as jnp
    >>> from optax_ftml import mxnet
    >>> example = importlib.resources.files("optax_ftml.mxnet") / "example"
    >>> weights = mxnet.read_params(example / "model.params")
    >>> params = {name: jnp.asarray(w) for name, w in weights.items()}
    >>> # The trainer's order: sorted full names, hybridsequential0_conv0_bias,
    >>> # ..._conv0_weight, ..._dense0_bias, ..._dense0_weight.
    >>> optimizer, state = mxnet.resume(
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
    with Flax's layouts: ``layout=to_flax_layout``.
  """
  saved, source = _read(trainer_states)
  overrides = dict(hyperparameters or {})
  if not set(overrides) <= _HYPERPARAMETER_KEYS:
    raise ValueError(
        "mxnet.resume: unknown hyperparameters"
        f" {sorted(set(overrides) - _HYPERPARAMETER_KEYS)}; allowed:"
        f" {sorted(_HYPERPARAMETER_KEYS)}.")
  try:
    return _resume(saved, params, indices, layout, overrides, num_update)
  except FileError as e:  # the file's content: named with the file
    raise FileError(f"mxnet.resume: {source}: {e}") from None


def _resume(saved: TrainerStates, params: Any,
            indices: Mapping[str, int] | None, layout: Any,
            overrides: dict[str, Any], num_update: int | None
            ) -> tuple[optax.GradientTransformationExtraArgs, optax.OptState]:
  """:func:`resume` once the file is read: a ``FileError`` here is about the
  file's content, any other error about an argument."""
  names = _leaf_names(params)
  leaf_indices = _indices_by_leaf(names, saved.states, indices)
  if saved.optimizer is None:
    file_values, count = _module_file_values(overrides, num_update)
  elif num_update is not None:
    raise ValueError(
        "mxnet.resume: num_update is read from the file; pass it only"
        " for Module files, which hold no optimizer.")
  else:
    file_values, count = _file_hyperparameters(saved.optimizer, leaf_indices)
  arguments = {**file_values, **overrides}
  treedef = jax.tree.structure(params)
  for key in ("lr_mult", "wd_mult"):
    if isinstance(file_values.get(key), list) and key not in overrides:
      arguments[key] = treedef.unflatten(file_values[key])  # per leaf
    elif arguments.get(key) is not None:
      arguments[key] = _multipliers_like(key, arguments[key], params, names)
  states = _leaf_states(saved.states, params, names, leaf_indices, layout,
                        by_default_order=indices is None)
  _check_masters(params, names, states)
  try:  # MXNet's ranges, as ftml checks them
    optimizer = ftml(**arguments)
  except (TypeError, ValueError) as e:
    if saved.optimizer is None or set(overrides) & {
        "learning_rate", *_FTML_KEYS}:
      raise
    raise FileError(f"the pickled FTML's hyperparameters: {e}") from None
  state = _replace_ftml_buffers(
      optimizer.init(params), count,
      {key: treedef.unflatten([
          _FileArray(state.buffers[i], f"the state of index {index} ({name})")
          for state, index in zip(states, leaf_indices, strict=True)])
       for i, (key, name) in enumerate((("d_prev", "d"), ("v", "v"),
                                        ("z", "z")))})
  return optimizer, state
