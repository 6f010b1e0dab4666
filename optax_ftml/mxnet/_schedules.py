"""MXNet's learning-rate schedulers, continued from their pickled state.

MXNet's schedulers compute in Python floats and its kernel rounds the rate to
float32. To give the same float32 rates bit for bit, the rates are computed
here the same way, on the host, in MXNet's order of operations, and rounded
once: tabulated per update (warm-up, polynomial and cosine decay, up to
``_MAX_TABULATED_UPDATES`` updates) or per decay (factor schedules), and
looked up with the traced update count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ftml.mxnet._records import PickledObject
from optax_ftml.mxnet._records import RecordFields

# Beyond this many updates, warm-ups and polynomial and cosine decays are
# computed in float32 on the device (within a few float32 ulps of MXNet), by
# Optax's schedules where they compute the same (linear, exponential decay).
_MAX_TABULATED_UPDATES = 2**20
# Factor schedules are tabulated per decay, up to this many decays.
_MAX_TABULATED_DECAYS = 10_000
_MAX_LISTED_STEPS = 10_000


def _warmup(f: RecordFields) -> Callable[[Any], jax.Array]:
  """``LRScheduler.get_warmup_lr``, for ``n < warmup_steps``."""
  steps = f.count("warmup_steps")
  begin, final = f.real("warmup_begin_lr", 0.0), f.real("warmup_final_lr", 0.0)
  if begin > final:
    raise f.error("warmup_begin_lr", begin, f"at most warmup_final_lr ({final})")
  mode = f.get("warmup_mode")
  if type(mode) is not str or mode not in ("linear", "constant"):
    raise f.error("warmup_mode", mode, "'linear' or 'constant'")
  if mode == "constant":
    return lambda n: jnp.float32(begin)
  return tabulated(
      lambda n: begin + (final - begin) * float(n) / float(steps), 0, steps - 1,
      optax.linear_schedule(begin, final, steps))


def _factor(f: RecordFields) -> Callable[[Any], jax.Array]:
  """``FactorScheduler`` after the warm-up: the rates after 0, 1, ... decays,
  multiplied in Python floats as MXNet does and held at ``stop_factor_lr``,
  looked up by the number of decays at update ``n``; beyond the tabulated
  decays MXNet keeps multiplying (in float32 here)."""
  step, count = f.count("step", low=1), f.count("count")
  factor = f.real("factor", 0.0, 1.0, low_open=True)
  stop = f.real("stop_factor_lr", 0.0)
  rates = [f.real("base_lr", 0.0)]
  while len(rates) <= _MAX_TABULATED_DECAYS and factor != 1 and (
      rates[-1] != stop):
    rates.append(max(rates[-1] * factor, stop))
  table, last = _float32_table(rates), len(rates) - 1
  # Decay number k (k >= 1) applies from update count + k * step + 1 on.
  beyond = optax.exponential_decay(
      jnp.float32(table[-1]), step, jnp.float32(factor),
      transition_begin=count + 1 + last * step, staircase=True)

  def rate(n):
    decays = jnp.maximum(0, (n - count - 1) // step)
    return jnp.where(decays <= last, _lookup(table, decays),
                     jnp.maximum(beyond(n), jnp.float32(stop)))

  return rate


def _multi_factor(f: RecordFields) -> Callable[[Any], jax.Array]:
  """``MultiFactorScheduler`` after the warm-up: the rates after each
  remaining step, looked up by the steps passed at update ``n`` (one
  comparison for the whole list)."""
  steps = f.get("step")
  if not (isinstance(steps, list) and 1 <= len(steps) <= _MAX_LISTED_STEPS):
    raise f.error("step", steps, f"a list of 1 to {_MAX_LISTED_STEPS} steps")
  for i, s in enumerate(steps):
    f.count(f"step[{i}]", low=1 if i == 0 else steps[i - 1] + 1, value=s)
  done = f.count("cur_step_ind")
  if done > len(steps):
    raise f.error("cur_step_ind", done, f"at most len(step) = {len(steps)}")
  factor = f.real("factor", 0.0, 1.0, low_open=True)
  rates = [f.real("base_lr", 0.0)]
  for _ in steps[done:]:
    rates.append(rates[-1] * factor)
  table, boundaries = _float32_table(rates), np.asarray(steps, np.int32)
  return lambda n: _lookup(
      table, jnp.searchsorted(boundaries, n, side="left") - done)


def _decay(f: RecordFields) -> Callable[[Any], jax.Array]:
  """``PolyScheduler`` and ``CosineScheduler`` after the warm-up: MXNet's
  rates in Python floats, tabulated, and in float32 beyond the table."""
  max_update, warmup = f.count("max_update", low=1), f.count("warmup_steps")
  max_steps = f.count("max_steps", low=1)
  if max_steps != max_update - warmup:
    raise f.error("max_steps", max_steps,
                  f"max_update - warmup_steps = {max_update - warmup} > 0")
  start, final = f.real("base_lr_orig", 0.0), f.real("final_lr", 0.0)
  if f.name == "PolyScheduler":
    power = f.real("power", 0.0)
    exact = lambda n: final + (start - final) * pow(
        1 - float(n - warmup) / float(max_steps), power)
    shape = lambda remaining: remaining ** power
  else:
    exact = lambda n: final + (start - final) * (
        1 + math.cos(math.pi * (n - warmup) / max_steps)) / 2
    # (1 + cos(pi * done)) / 2 = sin(pi / 2 * (1 - done))**2, accurate near 0.
    shape = lambda remaining: jnp.sin(jnp.pi / 2 * remaining) ** 2

  # Not optax.polynomial_schedule and cosine_decay_schedule: compiled, their
  # 1 - count / steps can round below 0 at the end (XLA multiplies by
  # 1 / steps), and a power of 1.5 of it is NaN; 1 + cos(pi * done) loses all
  # relative precision near the end. The remaining fraction, exact, avoids
  # both.
  def approximate(n):
    remaining = (max_update - jnp.minimum(n, max_update)) / max_steps
    return final + (start - final) * shape(remaining)

  return tabulated(exact, warmup, max_update, approximate)


def _float32_table(rates: list[float]) -> np.ndarray:
  """MXNet's Python-float rates as its kernel sees them: rounded once."""
  return np.asarray(rates, np.float64).astype(np.float32)


def _lookup(table: np.ndarray, index: Any) -> jax.Array:
  """``table[index]``, the first or last entry outside it."""
  return jnp.asarray(table)[jnp.clip(index, 0, len(table) - 1)]


def tabulated(rate: Callable[[int], float], first: int, last: int,
              beyond: Callable[[Any], Any]) -> Callable[[Any], jax.Array]:
  """``rate(n)`` for ``first <= n <= last`` (the last rate after), tabulated
  while that is at most ``_MAX_TABULATED_UPDATES`` entries, ``beyond(n)``
  after those."""
  last_tabulated = min(last, first + _MAX_TABULATED_UPDATES - 1)
  table = _float32_table(
      [rate(n) for n in range(first, last_tabulated + 1)] or [0.0])
  if last_tabulated == last:
    return lambda n: _lookup(table, n - first)
  return lambda n: jnp.where(n <= last_tabulated, _lookup(table, n - first),
                             beyond(n.astype(jnp.float32)))


_AFTER_WARMUP = {"FactorScheduler": _factor,
                 "MultiFactorScheduler": _multi_factor,
                 "PolyScheduler": _decay,
                 "CosineScheduler": _decay}


def lr_schedule(scheduler: PickledObject) -> Callable[[Any], jax.Array]:
  """The Optax-traceable equivalent of a pickled MXNet learning-rate scheduler.

  Supports MXNet's ``FactorScheduler``, ``MultiFactorScheduler``,
  ``PolyScheduler`` and ``CosineScheduler`` (1.x and 2.x alike), with their
  linear or constant warm-up. MXNet's schedulers are stateful and pickled
  mid-run (e.g. a ``FactorScheduler``'s ``base_lr`` has already been decayed
  ``count / step`` times; the warm-up's target is kept in
  ``warmup_final_lr``, the polynomial and cosine schedules' start in
  ``base_lr_orig``): the returned schedule continues from the pickled state,
  giving the learning rates MXNet would use next.

  The schedule follows MXNet's convention, as :func:`~optax_ftml.mxnet.ftml` expects: it
  is called with the 1-based update count ``num_update``. Its float32 rates
  are MXNet's bit for bit (MXNet computes in Python floats and its kernel
  rounds to float32; so do these, on the host, then look the rate up): for
  the first 2**20 updates of a warm-up or a polynomial or cosine decay and
  the first 10,000 decays of a factor schedule; beyond those, rates are
  computed in float32 and agree to a few float32 ulps.

  The pickled attributes come from a file and are checked first: real numbers
  and integer counts in the ranges MXNet's constructors allow (``step >= 1``,
  ``0 < factor <= 1``, increasing step lists of at most 10,000 steps,
  ``max_steps = max_update - warmup_steps > 0``, counts below 2**31). A
  scheduler with ``warmup_steps == max_update``, on which MXNet divides by
  zero at update ``max_update``, is refused.

  Args:
    scheduler: the ``lr_scheduler`` record of a pickled MXNet optimizer (see
      :func:`read_trainer_states`), or a pickled scheduler read with it.

  Returns:
    A function of the 1-based update count (an integer or an integer array)
    returning the float32 learning rate.

  Raises:
    TypeError: if ``scheduler`` is not an :class:`PickledObject`.
    ValueError: for a scheduler class other than the four above (named in the
      message).
    FileError: (a ``ValueError``) if an attribute MXNet pickles is
      missing or outside MXNet's range (named in the message).

  Examples:
    >>> import importlib.resources
    >>> from optax_ftml import mxnet
    >>> example = importlib.resources.files("optax_ftml.mxnet") / "example"
    >>> saved = mxnet.read_trainer_states(example / "trainer.states")
    >>> scheduler = saved.optimizer.attributes["lr_scheduler"]
    >>> scheduler.class_name, scheduler.attributes["base_lr_orig"]
    ('CosineScheduler', 0.02)
    >>> schedule = mxnet.lr_schedule(scheduler)
    >>> print(f"{schedule(101):.6f}")  # the learning rate of MXNet's step 101
    0.016532
  """
  if not isinstance(scheduler, PickledObject):
    raise TypeError(
        "mxnet.lr_schedule: scheduler must be a scheduler read from an MXNet"
        f" file (an mxnet.PickledObject), got {type(scheduler).__name__}.")
  if scheduler.class_name not in _AFTER_WARMUP or not (
      scheduler.mxnet_class.startswith("mxnet.lr_scheduler.")):
    raise ValueError(
        f"mxnet.lr_schedule: unsupported MXNet scheduler {scheduler.mxnet_class}"
        f"; supported: {', '.join(sorted(_AFTER_WARMUP))}. Pass the learning rate"
        " or an equivalent schedule yourself.")
  fields = RecordFields(scheduler)
  warmup_steps, warmup = fields.count("warmup_steps"), _warmup(fields)
  after_warmup = _AFTER_WARMUP[fields.name](fields)

  def schedule(num_update):
    n = jnp.asarray(num_update).astype(jnp.int32)
    return jnp.where(n < warmup_steps, warmup(n), after_warmup(n))

  return schedule

