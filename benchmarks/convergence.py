"""FTML next to Adam, RMSprop and SGD with momentum on small real tasks.

In the spirit of the FTML paper's experiments, on tasks that run on a laptop
CPU in minutes and need nothing downloaded:

* logistic regression on scikit-learn's digits (8x8 images, 10 classes);
* a small CNN on the same digits;
* a character-level LSTM language model on Python's own ``difflib`` and
  ``textwrap`` sources (from the standard library).

Every optimizer gets its learning rate tuned on a grid of half-decades: each
(learning rate, seed) pair trains independently (all of them at once, with
``jax.vmap``); the learning rate with the best mean validation loss over the
seeds is selected, and its test figures (mean and standard deviation over the
seeds) are reported. A selection at either end of the grid says only that the
best rate may lie beyond it, so the grid is then extended by a half-decade on
that side until the best rate is inside it (or ``MAX_EXTENSIONS`` is reached,
which the table flags).

    python benchmarks/convergence.py            # the full run (minutes)
    python benchmarks/convergence.py --quick    # a smoke run
    python benchmarks/convergence.py --plot-only  # the plots, from the JSON

Writes ``convergence.md``, ``convergence.json`` and one PNG of training
curves per task to ``--out`` (``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import math
import pathlib
import textwrap
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import machine  # benchmarks/machine.py, beside this script
import optax_ftml

RESULTS = pathlib.Path(__file__).parent / "results"

# Learning-rate grids of half-decades around each optimizer's usual values;
# extended automatically where the selection lands on an end.
OPTIMIZERS: dict[str, tuple[Callable[..., optax.GradientTransformation],
                            tuple[float, ...]]] = {
    "ftml": (optax_ftml.ftml, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
    "adam": (optax.adam, (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
    "rmsprop": (optax.rmsprop, (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)),
    "sgd (momentum 0.9)": (
        lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
        (1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)),
}
MAX_EXTENSIONS = 3  # half-decades added on each side, at most


def next_half_decade(rate: float, direction: int) -> float:
  """The grid's neighbour of rate (... 0.1, 0.3, 1, 3 ...): above (+1) or below (-1)."""
  exponent, upper_half = divmod(round(2 * math.log10(rate)) + direction, 2)
  return float(f"{(3 if upper_half else 1) * 10.0**exponent:.0e}")


@dataclasses.dataclass
class Task:
  """A model, its data and its metrics, all as JAX functions."""

  name: str
  init: Callable  # key -> params
  loss: Callable  # params, batch -> scalar
  sample: Callable  # key -> a training batch
  evaluate: Callable  # params -> {"validation loss", "test loss", ...}
  steps: int
  loss_unit: str


def cross_entropy(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def digits_splits():
  """Digits standardized, split 60/20/20 into train, validation and test."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  x, y = load_digits(return_X_y=True)
  order = np.random.RandomState(0).permutation(len(x))
  x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
  n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
  mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-3
  x = (x - mean) / std
  cut = (slice(0, n_train), slice(n_train, n_train + n_val),
         slice(n_train + n_val, None))
  return [(jnp.asarray(x[c]), jnp.asarray(y[c])) for c in cut]


def classification_task(name, init, apply, steps, batch_size=64):
  train, val, test = digits_splits()

  def loss(params, batch):
    return cross_entropy(apply(params, batch[0]), batch[1])

  def sample(key):
    index = jax.random.randint(key, (batch_size,), 0, len(train[0]))
    return train[0][index], train[1][index]

  def evaluate(params):
    out = {}
    for split, (x, y) in (("validation", val), ("test", test)):
      logits = apply(params, x)
      out[f"{split} loss"] = cross_entropy(logits, y)
      out[f"{split} accuracy"] = jnp.mean(jnp.argmax(logits, -1) == y)
    return out

  return Task(name, init, loss, sample, evaluate, steps, "nats")


def logistic_regression(steps):
  def init(key):
    return {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

  def apply(params, x):
    return x @ params["w"] + params["b"]

  return classification_task("logistic regression, digits", init, apply, steps)


def small_cnn(steps):
  def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    he = lambda k, shape, fan_in: jax.random.normal(k, shape) * math.sqrt(
        2 / fan_in)
    # Kernels are (input channel, 3, 3, output channel): the patches'
    # feature order.
    return {"conv1": he(k1, (1, 3, 3, 16), 9), "b1": jnp.zeros(16),
            "conv2": he(k2, (16, 3, 3, 32), 144), "b2": jnp.zeros(32),
            "dense": he(k3, (4 * 4 * 32, 10), 512), "b3": jnp.zeros(10)}

  def conv(x, kernel, bias):
    # As a matrix product over 3x3 patches: fast on CPU, also under vmap.
    patches = jax.lax.conv_general_dilated_patches(
        x, (3, 3), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(patches @ kernel.reshape(-1, kernel.shape[-1]) + bias)

  def apply(params, x):
    x = x.reshape(-1, 8, 8, 1)
    x = conv(x, params["conv1"], params["b1"])
    x = conv(x, params["conv2"], params["b2"])
    x = x.reshape(-1, 4, 2, 4, 2, 32).mean((2, 4))  # 2x2 average pooling
    return x.reshape(len(x), -1) @ params["dense"] + params["b3"]

  return classification_task("small CNN, digits", init, apply, steps)


def char_lstm(steps, hidden=64, embed=16, length=32, batch_size=16):
  text = inspect.getsource(difflib) + inspect.getsource(textwrap)
  codes = np.frombuffer(text.encode("ascii", "replace"), np.uint8)
  vocab = np.unique(codes)
  data = np.searchsorted(vocab, codes).astype(np.int32)
  n = len(data)
  train, val, test = (jnp.asarray(data[:int(0.8 * n)]),
                      jnp.asarray(data[int(0.8 * n):int(0.9 * n)]),
                      jnp.asarray(data[int(0.9 * n):]))
  v = len(vocab)

  def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"embed": 0.1 * jax.random.normal(k1, (v, embed)),
            "lstm": jax.random.normal(k2, (embed + hidden, 4 * hidden))
                    / math.sqrt(embed + hidden),
            "lstm_b": jnp.zeros(4 * hidden).at[hidden:2 * hidden].set(1.0),
            "out": jax.random.normal(k3, (hidden, v)) / math.sqrt(hidden),
            "out_b": jnp.zeros(v)}

  def logits(params, tokens):
    """Next-token logits for each position of tokens (batch, time)."""
    x = params["embed"][tokens]

    def cell(carry, x_t):
      h, c = carry
      gates = jnp.concatenate([x_t, h], -1) @ params["lstm"] + params["lstm_b"]
      i, f, g, o = jnp.split(gates, 4, -1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h

    zeros = jnp.zeros((tokens.shape[0], hidden))
    _, hs = jax.lax.scan(cell, (zeros, zeros), jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(hs, 0, 1) @ params["out"] + params["out_b"]

  def sequence_loss(params, tokens):
    bits = cross_entropy(logits(params, tokens[:, :-1]), tokens[:, 1:])
    return bits / math.log(2)

  def windows(data, starts):
    return jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (length + 1,)))(
        starts)

  def sample(key):
    return windows(train, jax.random.randint(key, (batch_size,), 0,
                                             len(train) - length - 1))

  def evaluate(params):
    out = {}
    for split, data in (("validation", val), ("test", test)):
      starts = jnp.arange(0, len(data) - length - 1, length)
      out[f"{split} loss"] = sequence_loss(params, windows(data, starts))
    return out

  return Task(f"char LSTM, {n // 1000}k characters of stdlib source", init,
              sequence_loss, sample, evaluate, steps, "bits/char")


def run(task: Task, make: Callable, learning_rates, seeds):
  """Training-loss curves and evaluations for every (lr, seed) pair."""

  def one(learning_rate, seed):
    opt = optax.inject_hyperparams(make)(learning_rate=learning_rate)
    key_init, key_data = jax.random.split(jax.random.key(seed))
    params = task.init(key_init)

    def step(carry, key):
      params, state = carry
      loss, grads = jax.value_and_grad(task.loss)(params, task.sample(key))
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(
        step, (params, opt.init(params)), jax.random.split(key_data, task.steps))
    return losses, task.evaluate(params)

  over_seeds = jax.vmap(one, in_axes=(None, 0))
  return jax.jit(jax.vmap(over_seeds, in_axes=(0, None)))(
      jnp.asarray(learning_rates, jnp.float32), jnp.asarray(seeds))


def mean_validation_loss(evaluation):
  """Per learning rate, over the seeds; a diverged run counts as infinite."""
  loss = evaluation["validation loss"]
  return np.where(np.isfinite(loss), loss, np.inf).mean(1)


def tune(task: Task, make: Callable, grid: list[float], seeds,
         max_extensions: int):
  """Runs the grid, extending it while the best rate is at one of its ends.

  Returns the final grid, and the losses and evaluations of every rate in it
  (the learning rate along the leading axis).
  """
  losses, evaluation = jax.tree.map(np.asarray, run(task, make, grid, seeds))
  extensions = {-1: 0, 1: 0}
  while True:
    best = int(np.argmin(mean_validation_loss(evaluation)))
    direction = -1 if best == 0 else 1 if best == len(grid) - 1 else 0
    if not direction or extensions[direction] == max_extensions:
      return grid, losses, evaluation
    extensions[direction] += 1
    edge = grid[0] if direction < 0 else grid[-1]
    rate = next_half_decade(edge, direction)
    print(f"  {task.name}: best learning rate {edge:g} at the grid's end;"
          f" adding {rate:g}", flush=True)
    more = jax.tree.map(np.asarray, run(task, make, [rate], seeds))
    if direction < 0:
      grid, parts = [rate, *grid], (more, (losses, evaluation))
    else:
      grid, parts = [*grid, rate], ((losses, evaluation), more)
    losses, evaluation = jax.tree.map(lambda *a: np.concatenate(a), *parts)


def smooth(curve, window):
  kernel = np.ones(window) / window
  return np.convolve(curve, kernel, mode="valid")


def benchmark(quick: bool):
  steps = 30 if quick else 400
  seeds = list(range(1 if quick else 5))
  tasks = [logistic_regression(steps), small_cnn(steps),
           char_lstm(20 if quick else 600)]
  results = {}
  for task in tasks:
    results[task.name] = {"unit": task.loss_unit, "steps": task.steps,
                          "optimizers": {}}
    for name, (make, grid) in OPTIMIZERS.items():
      start = time.perf_counter()
      grid, losses, evaluation = tune(
          task, make, list(grid[2:4] if quick else grid), seeds,
          max_extensions=1 if quick else MAX_EXTENSIONS)
      validation = mean_validation_loss(evaluation)
      best = int(np.argmin(validation))
      summary = {
          "learning_rate": grid[best],
          "at_grid_edge": best in (0, len(grid) - 1),
          "validation_loss_by_learning_rate": dict(zip(
              map(str, grid), validation.tolist(), strict=True)),
          "final_train_loss": float(np.mean(losses[best, :, -max(1, steps // 20):])),
          "curve_mean": losses[best].mean(0).tolist(),
          "curve_std": losses[best].std(0).tolist(),
          "seconds": time.perf_counter() - start,
      }
      for metric, values in evaluation.items():
        summary[metric] = [float(np.mean(values[best])),
                           float(np.std(values[best]))]
      results[task.name]["optimizers"][name] = summary
      print(f"{task.name} / {name}: lr {grid[best]:g},"
            f" test loss {summary['test loss'][0]:.4f}"
            f" ({summary['seconds']:.0f} s)", flush=True)
  return results, seeds


def markdown(results, seeds, versions, on) -> str:
  lines = [f"Mean ± standard deviation over {len(seeds)} seeds, at the learning"
           " rate (from each optimizer's grid of half-decades, extended where"
           " the best rate was at an end) with the best mean validation"
           " loss. `*`: the selected learning rate is still at the edge of the"
           " grid.",
           "",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
           + f"; {on['cpu']}, {on['cpu_count']} cores.",
           "",
           "| task | optimizer | learning rate | final train loss | test loss"
           " | test accuracy |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
  for task, row in results.items():
    for name, r in row["optimizers"].items():
      accuracy = (f"{100 * r['test accuracy'][0]:.1f} ± "
                  f"{100 * r['test accuracy'][1]:.1f} %"
                  if "test accuracy" in r else "-")
      lines.append(
          f"| {task} | {name} | {r['learning_rate']:g}"
          f"{'*' if r['at_grid_edge'] else ''} | {r['final_train_loss']:.4f}"
          f" | {r['test loss'][0]:.4f} ± {r['test loss'][1]:.4f} {row['unit']}"
          f" | {accuracy} |")
  return "\n".join(lines) + "\n"


def geometric_band(mean, std):
  """Geometric centre and factor of the seeds' losses, from their mean and std.

  On a log axis, mean ± std runs below zero (off the axis) wherever a seed's
  spike makes std exceed the mean. The log-normal with this mean and standard
  deviation gives a centre and a multiplicative spread instead: the band
  ``centre / factor`` to ``centre * factor`` is positive, and close to
  mean ± std where the seeds agree.
  """
  log_variance = np.log1p((std / mean) ** 2)
  return mean * np.exp(-log_variance / 2), np.exp(np.sqrt(log_variance))


def plot(results, out: pathlib.Path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  paths = []
  for index, (task, row) in enumerate(results.items()):
    fig, ax = plt.subplots(figsize=(6, 4))
    window = max(1, row["steps"] // 40)
    for name, r in row["optimizers"].items():
      mean, std = np.asarray(r["curve_mean"]), np.asarray(r["curve_std"])
      centre, factor = geometric_band(smooth(mean, window), smooth(std, window))
      x = np.arange(len(centre)) + window
      ax.plot(x, centre, label=f"{name} (lr {r['learning_rate']:g})")
      ax.fill_between(x, centre / factor, centre * factor, alpha=0.2)
    ax.set(title=task, xlabel="step",
           ylabel=f"training loss ({row['unit']}, smoothed)", yscale="log")
    ax.legend(title="geometric mean and spread over the seeds",
              title_fontsize="small", fontsize="small")
    fig.tight_layout()
    path = out / f"convergence_{index + 1}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="few steps and seeds (a smoke run)")
  parser.add_argument("--plot-only", action="store_true",
                      help="redraw the plots from --out's convergence.json,"
                      " without training")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS,
                      help="directory for the table, the numbers and the plots")
  args = parser.parse_args(argv)
  if args.plot_only:
    recorded = json.loads((args.out / "convergence.json").read_text())
    for path in plot(recorded["results"], args.out):
      print(f"wrote {path}")
    return
  results, seeds = benchmark(args.quick)
  args.out.mkdir(parents=True, exist_ok=True)
  versions, on = machine.package_versions(), machine.description()
  table = markdown(results, seeds, versions, on)
  (args.out / "convergence.md").write_text(table)
  (args.out / "convergence.json").write_text(json.dumps(
      {"quick": args.quick, "seeds": seeds, "versions": versions,
       "machine": on, "results": results}) + "\n")
  plot(results, args.out)
  print(table)


if __name__ == "__main__":
  main()
