"""A plain-NumPy transcription of Apache MXNet's FTML (``ftml_update``, and
MXNet 2's unfused ``FTML.step``: :func:`ftml_step`).

Written from MXNet's kernel (``src/operator/optimizer_op-inl.h``: FTMLParam,
FTMLKernel) and its Python optimizer, independently of ``optax_ftml``. The
operator's parameter struct holds ``lr``, ``beta1``, ``beta2``, ``wd``,
``rescale_grad`` and ``clip_grad`` as C++ ``float`` (``epsilon`` as
``double``); the kernel then casts every scalar to the weight dtype and
evaluates each line left to right with one rounding per operation.
Hyperparameters may be arrays that broadcast against the weight, so a whole
grid of settings runs in one call.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# FTMLParam's ``float`` fields. ``ftml`` itself keeps the caller's values:
# ``param_dtype=np.float64`` models the same kernel given them unrounded.
MXNET_PARAM_DTYPE = np.float32


@dataclasses.dataclass
class FTMLSlots:
  """MXNet's per-weight state: ``d`` (= d_{t-1}), ``v`` and ``z``."""

  d: np.ndarray
  v: np.ndarray
  z: np.ndarray

  @classmethod
  def zeros_like(cls, weight: np.ndarray) -> FTMLSlots:
    return cls(*(np.zeros_like(weight) for _ in range(3)))


def preprocess_gradient(grad, weight, *, rescale_grad=1.0, clip_gradient=None,
                        wd=0.0, mxnet_version=2, param_dtype=MXNET_PARAM_DTYPE):
  """MXNet's gradient pre-processing inside ``ftml_update``.

  ``clip_gradient`` follows the Python optimizer: it forwards only a truthy
  value (else -1), and the kernel clips iff the value, as a C++ float, is
  ``>= 0``. An array of clip values uses ``np.nan`` for "no clipping".
  """
  dtype = weight.dtype.type
  rescale_grad, wd = (np.asarray(np.asarray(x, param_dtype), dtype)
                      for x in (rescale_grad, wd))
  if clip_gradient is None or (np.ndim(clip_gradient) == 0 and not clip_gradient):
    clip = dtype(-1)
  else:
    clip = np.asarray(np.asarray(
        np.where(np.isnan(clip_gradient), -1, clip_gradient), param_dtype), dtype)

  def clipped(g):
    return np.where(clip >= 0, np.clip(g, -np.abs(clip), np.abs(clip)), g)

  if mxnet_version == 2:
    g = rescale_grad * grad
    g = clipped(g)
    return g + wd * weight
  return clipped(rescale_grad * grad + wd * weight)


def ftml_update(weight, grad, slots: FTMLSlots, *, lr, t, beta1=0.6,
                beta2=0.999, epsilon=1e-8, store=lambda x: x,
                param_dtype=MXNET_PARAM_DTYPE, **preprocessing):
  """One MXNet ``ftml_update`` call; returns the new weight, updates slots.

  ``lr``, ``beta1``, ``beta2`` (and the pre-processing's ``rescale_grad``,
  ``clip_gradient``, ``wd``) are first rounded to ``param_dtype``, the C++
  type that holds them in MXNet (``epsilon`` is a double there): for float64
  weights MXNet computes with ``1 - (double)0.999f``. ``store`` rounds a
  value as its slot stores it (the identity when slots and weight share a
  dtype, as in MXNet's kernel); like the kernel, later lines use the stored
  ``v`` and ``z``, and the local ``d_t``.
  """
  dtype = weight.dtype.type
  lr, beta1, beta2 = (np.asarray(np.asarray(x, param_dtype), dtype)
                      for x in (lr, beta1, beta2))
  epsilon, t = np.asarray(epsilon, dtype), np.asarray(t, dtype)
  one = dtype(1)
  g = preprocess_gradient(grad, weight, param_dtype=param_dtype, **preprocessing)
  slots.v = store(beta2 * slots.v + (one - beta2) * (g * g))
  d_t = ((one - np.power(beta1, t)) / lr) * (
      np.sqrt(slots.v / (one - np.power(beta2, t))) + epsilon)
  slots.z = store(
      (beta1 * slots.z + (one - beta1) * g) - (d_t - beta1 * slots.d) * weight)
  slots.d = store(d_t)
  return (-slots.z) / d_t


def ftml_step(weight, grad, slots: FTMLSlots, *, lr, t, beta1=0.6,
              beta2=0.999, epsilon=1e-8, wd=0.0, rescale_grad=1.0,
              clip_gradient=None, mxnet_version=2):
  """MXNet 2's ``FTML.step`` (``use_fused_step=False``); returns the new
  weight, updates slots.

  Transcribed from python/mxnet/optimizer/ftml.py (2.0.0b1): NDArray
  operations in the weight dtype, one rounding each, with Python scalars
  (doubles) rounded to the weight dtype where they meet an array; so
  ``1 - beta2``, ``1 - beta1``, ``1 - beta2**t`` and ``(1 - beta1**t) / lr``
  are computed in double first. ``nd.clip(g, -c, c)`` clips for any ``c``
  that is not None, as ``x > c ? c : x < -c ? -c : x``. ``lr`` and ``wd``
  are MXNet's ``lr * lr_mult`` and ``wd * wd_mult``, in double.
  """
  assert mxnet_version == 2, "FTML.step is MXNet 2's"
  s = weight.dtype.type  # a Python scalar meeting an array
  g = grad * s(rescale_grad)
  if clip_gradient is not None:
    high, low = s(clip_gradient), s(-clip_gradient)
    g = np.where(g > high, high, np.where(g < low, low, g))
  g = g + s(wd) * weight
  coef1 = 1. - beta1**t
  coef2 = 1. - beta2**t
  slots.v = slots.v * s(beta2)
  slots.v = slots.v + s(1. - beta2) * np.square(g)
  sigma = s(-beta1) * slots.d
  d = np.sqrt(slots.v / s(coef2)) + s(epsilon)
  d = d * s(coef1 / lr)
  sigma = sigma + d
  slots.z = slots.z * s(beta1)
  slots.z = slots.z + s(1. - beta1) * g
  slots.z = slots.z - sigma * weight
  slots.d = d
  return -slots.z / d


def trajectory(weights, xs, lrs, gradient_fn=None, *, update=ftml_update,
               slots=None, per_leaf=None, **kwargs):
  """The kernel's weights after each of ``len(lrs)`` steps, and its slots.

  Like :func:`helpers.run`: ``weights`` is an array or a dict of arrays,
  ``xs`` has its structure with a leading step axis and holds the gradients,
  or the inputs of ``gradient_fn(weights, x)`` (gradients computed from the
  current weights). ``lrs[t]`` is the learning rate of step ``t + 1`` (a
  scheduler's value, before ``lr_mult``); ``per_leaf`` optionally maps each
  leaf to keywords of its own, ``lr_mult`` among them (multiplied in double,
  as MXNet's optimizer does); ``kwargs`` go to ``update`` for every leaf.
  Returns the weights stacked along a leading step axis and the final slots,
  in the structure of ``weights``.
  """
  is_dict = isinstance(weights, dict)
  leaves = lambda tree: tree if is_dict else {None: tree}
  tree = lambda leaves: leaves if is_dict else leaves[None]
  w = dict(leaves(weights))
  slots = dict(leaves(slots)) if slots is not None else {
      k: FTMLSlots.zeros_like(np.asarray(x)) for k, x in w.items()}
  out = {k: [] for k in w}
  for step, lr in enumerate(lrs):
    x = tree({k: a[step] for k, a in leaves(xs).items()})
    grads = leaves(x if gradient_fn is None else gradient_fn(tree(w), x))
    for k in w:
      leaf = dict(kwargs, **(per_leaf or {}).get(k, {}))
      rate = lr * leaf.pop("lr_mult", 1.0)
      w[k] = update(w[k], grads[k], slots[k], lr=rate, t=step + 1, **leaf)
      out[k].append(w[k])
  return tree({k: np.stack(x) for k, x in out.items()}), tree(slots)


def collapsed_trajectory(weight0, grads, lrs, beta1, beta2, epsilon):
  """The spec's collapsed identity, in float64, for gradients fixed in advance.

  ``w_t = w_{t-1} - lr_t (1 - b1) / (1 - b1**t) g_t / (sqrt(v_t / (1 - b2**t)) + eps)``
  holds when nothing but FTML changes the weight.
  """
  w = np.asarray(weight0, np.float64)
  v = np.zeros_like(w)
  out = []
  for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
    g = np.asarray(g, np.float64)
    v = beta2 * v + (1 - beta2) * g * g
    w = w - lr * (1 - beta1) / (1 - beta1**t) * g / (
        np.sqrt(v / (1 - beta2**t)) + epsilon)
    out.append(w)
  return np.stack(out)


def ftml_update_multi_precision(weight, grad, master, slots: FTMLSlots, **kwargs):
  """MXNet's ``multi_precision=True`` path for a float16 weight.

  ``Optimizer.update_multi_precision``: the gradient is cast to float32, the
  float32 kernel (pre-processing included) runs on the float32 master copy
  with float32 slots, and the float16 weight becomes the cast of the master.
  Returns ``(new_weight, new_master)``; updates the (float32) slots.
  """
  master = ftml_update(master, grad.astype(np.float32), slots, **kwargs)
  return master.astype(weight.dtype), master


def ftml_update_low_precision(weight, grad, slots: FTMLSlots, **kwargs):
  """A half-precision weight updated by the float32 kernel, Optax-style.

  The weight, gradient and slots are widened to float32 (exactly), the
  kernel's arithmetic runs in float32 with ``v``, ``z`` and ``d`` rounded to
  the slots' dtype where the kernel stores them (later lines use the stored
  ``v`` and ``z``, as in the kernel), and the weight is moved by its update
  rounded to the weight dtype, as ``optax.apply_updates(w, updates)`` does:
  ``w + round(w_new - w)``, the sum rounded to the weight dtype. Returns the
  new weight; updates the slots.
  """
  f32 = np.float32
  state_dtype = slots.v.dtype
  wide = FTMLSlots(*(np.asarray(s, f32) for s in (slots.d, slots.v, slots.z)))
  w32 = np.asarray(weight, f32)
  new = ftml_update(w32, np.asarray(grad, f32), wide,
                    store=lambda x: x.astype(state_dtype).astype(f32), **kwargs)
  slots.d, slots.v, slots.z = (x.astype(s.dtype) for x, s in (
      (wide.d, slots.d), (wide.v, slots.v), (wide.z, slots.z)))
  step = (new - w32).astype(weight.dtype)
  return (w32 + step.astype(f32)).astype(weight.dtype)
