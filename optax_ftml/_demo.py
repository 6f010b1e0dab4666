"""The demo's training, evaluation and plotting (``optax_ftml.demo`` is its CLI).

Imported only once the command line has been parsed: JAX, Flax, scikit-learn
and matplotlib take seconds to import.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
  import sklearn.datasets
  import sklearn.model_selection
  import tqdm
  from flax import nnx
  from matplotlib.figure import Figure
except ImportError as error:
  missing = (error.name or "").partition(".")[0]
  raise ImportError(
      f"The demo needs {missing}, which optax_ftml's demo extra installs:"
      ' pip install ".[demo]" in a clone of the repository, or'
      ' pip install "dist/optax_ftml-<version>-py3-none-any.whl[demo]" with a'
      " wheel built there", name=missing) from error

from optax_ftml import ftml

# Each optimizer the demo offers, by name (their default learning rates are
# optax_ftml.demo.LEARNING_RATES).
OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "ftml": ftml,
    "adam": optax.adam,
    "adamw": optax.adamw,
    "nadam": optax.nadam,
    "adabelief": optax.adabelief,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
    "lion": optax.lion,
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
}

NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Digits:
  """The digits data set, split into training and test images and labels."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Digits:
  """scikit-learn's 1797 8x8 digits as NHWC float32 in [0, 1], stratified split."""
  pixels, digits = sklearn.datasets.load_digits(return_X_y=True)
  images = (np.asarray(pixels) / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  labels = np.asarray(digits, np.int32)
  train_images, test_images, train_labels, test_labels = (
      np.asarray(part) for part in sklearn.model_selection.train_test_split(
          images, labels, test_size=test_fraction, random_state=seed,
          stratify=labels))
  return Digits(train_images, train_labels, test_images, test_labels)


class CNN(nnx.Module):
  """Two 3x3 convolutions, max pooling and a linear classifier."""

  def __init__(self, rngs: nnx.Rngs, features: tuple[int, int] = (16, 32)):
    self.conv1 = nnx.Conv(1, features[0], kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(features[0], features[1], kernel_size=(3, 3),
                          rngs=rngs)
    self.head = nnx.Linear(4 * 4 * features[1], NUM_CLASSES, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.conv1(x))
    x = nnx.max_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2),
                     strides=(2, 2))
    return self.head(x.reshape(x.shape[0], -1))


def loss_fn(model: CNN, images: jax.Array, labels: jax.Array) -> jax.Array:
  logits = model(images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, images: jax.Array,
               labels: jax.Array) -> jax.Array:
  loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def evaluate(model: CNN, images: jax.Array,
             labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean loss and accuracy over the given images."""
  logits = model(images)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def batch_indices(num_examples: int, batch_size: int, steps: int,
                  seed: int) -> np.ndarray:
  """Indices of every batch, shape ``(steps, batch_size)``.

  Each epoch visits the examples in a fresh random order; the last incomplete
  batch of an epoch is dropped so that every step has the same shape.
  """
  rng = np.random.default_rng(seed)
  per_epoch = num_examples // batch_size
  epochs = -(-steps // per_epoch)
  orders = [rng.permutation(num_examples)[:per_epoch * batch_size]
            for _ in range(epochs)]
  return np.concatenate(orders).reshape(-1, batch_size)[:steps]


@dataclasses.dataclass
class RunResult:
  """What one optimizer's run produced."""

  name: str
  learning_rate: float
  losses: np.ndarray  # training loss of every batch
  eval_steps: np.ndarray
  test_accuracies: np.ndarray
  train_loss: float  # over the whole training set, after the last step
  test_accuracy: float
  steps_per_second: float  # NaN after one step: no step is timed


def train(name: str, learning_rate: float, data: Digits, steps: int,
          batch_size: int, seed: int, num_evals: int = 20,
          progress: bool = True) -> RunResult:
  """Trains a fresh :class:`CNN` with one optimizer; the seed fixes everything."""
  model = CNN(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, OPTIMIZERS[name](learning_rate),
                            wrt=nnx.Param)
  train_images = jnp.asarray(data.train_images)
  train_labels = jnp.asarray(data.train_labels)
  test = (jnp.asarray(data.test_images), jnp.asarray(data.test_labels))
  indices = batch_indices(len(data.train_labels), batch_size, steps, seed)
  eval_every = max(1, steps // num_evals)

  # Evaluating the initial model also compiles `evaluate` outside the timing.
  losses, eval_steps, accuracies = [], [0], [evaluate(model, *test)[1]]

  def train_one_step(step: int) -> bool:
    """Runs step ``step`` (0-based); says whether it evaluated the model."""
    batch = jnp.asarray(indices[step])
    losses.append(train_step(model, optimizer, train_images[batch],
                             train_labels[batch]))
    if (step + 1) % eval_every == 0 or step + 1 == steps:
      eval_steps.append(step + 1)
      accuracies.append(evaluate(model, *test)[1])
      return True
    return False

  # The first step compiles `train_step`. The progress bar and the timing
  # start after it, so that the bar's rate and remaining time are those of
  # the compiled step.
  train_one_step(0)
  losses[0].block_until_ready()
  first_step_done = time.perf_counter()
  with tqdm.tqdm(total=steps, initial=1, desc=f"{name:>9}", unit="step",
                 disable=not progress, file=sys.stderr) as bar:
    for step in range(1, steps):
      if train_one_step(step):
        bar.set_postfix(loss=f"{float(losses[-1]):.4f}",
                        test_acc=f"{float(accuracies[-1]):.3f}",
                        refresh=False)
      bar.update()
    # Waits for the last step: the timing ends when the losses are known.
    training_losses = np.asarray(jax.device_get(jnp.stack(losses)))
  elapsed = time.perf_counter() - first_step_done

  train_loss, _ = evaluate(model, train_images, train_labels)
  _, test_accuracy = evaluate(model, *test)
  return RunResult(
      name=name, learning_rate=learning_rate, losses=training_losses,
      eval_steps=np.asarray(eval_steps),
      test_accuracies=np.asarray(jax.device_get(jnp.stack(accuracies))),
      train_loss=float(train_loss), test_accuracy=float(test_accuracy),
      steps_per_second=(steps - 1) / elapsed if steps > 1 else math.nan)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Moving average over ``window`` steps (shorter at the start)."""
  cumulative = np.cumsum(np.insert(values, 0, 0.0))
  ends = np.arange(1, len(values) + 1)
  starts = np.maximum(ends - window, 0)
  return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def accuracy_axis_bottom(results: Sequence[RunResult]) -> float:
  """Bottom of the accuracy axis: a multiple of 0.05 below the later accuracies.

  Accuracies climb from chance (0.1) within the first evaluations; an axis
  from there to 1 would squash the differences between the optimizers.
  """
  later = np.concatenate([r.test_accuracies[len(r.test_accuracies) // 2:]
                          for r in results])
  return max(0.0, math.floor(20 * (float(later.min()) - 0.005)) / 20)


def plot(results: Sequence[RunResult], path: str, title: str) -> None:
  """Writes the smoothed training losses and the test accuracies as a PNG."""
  # A Figure without pyplot renders with Agg and leaves pyplot's backend alone.
  fig = Figure(figsize=(11, 4.5))
  loss_ax, acc_ax = fig.subplots(1, 2)
  for result in results:
    label = f"{result.name} (lr={result.learning_rate:g})"
    window = max(1, len(result.losses) // 50)
    steps = np.arange(1, len(result.losses) + 1)
    loss_ax.plot(steps, smooth(result.losses, window), label=label)
    acc_ax.plot(result.eval_steps, result.test_accuracies, marker=".",
                label=label)
  loss_ax.set(xlabel="step", ylabel="training loss (moving average)",
              yscale="log", title="Training loss")
  bottom = accuracy_axis_bottom(results)
  acc_ax.set(xlabel="step", ylabel="test accuracy", ylim=(bottom, 1),
             title="Test accuracy" if bottom == 0 else
             f"Test accuracy (axis from {bottom:.2f}; early points below)")
  for ax in (loss_ax, acc_ax):
    ax.grid(alpha=0.3)
  # One legend for both panels, below them, where it covers no curve.
  columns = min(len(results), 5)
  rows = -(-len(results) // columns)
  fig.legend(*loss_ax.get_legend_handles_labels(), loc="lower center",
             ncol=columns, frameon=False)
  fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.07 * rows, 1, 1))
  fig.savefig(path, format="png", dpi=120)


def format_table(results: Sequence[RunResult]) -> str:
  header = ("optimizer", "learning rate", "final train loss", "test accuracy",
            "steps/s")
  # A run of one step has no timed step: its speed is shown as "-".
  rows = [(r.name, f"{r.learning_rate:g}", f"{r.train_loss:.4f}",
           f"{100 * r.test_accuracy:.2f}%",
           f"{r.steps_per_second:.0f}" if math.isfinite(r.steps_per_second)
           else "-")
          for r in results]
  widths = [max(len(row[i]) for row in (header, *rows))
            for i in range(len(header))]
  line = lambda row: "  ".join(
      cell.ljust(w) if i == 0 else cell.rjust(w)
      for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
  return "\n".join([line(header), "  ".join("-" * w for w in widths),
                    *map(line, rows)])


def run(args: argparse.Namespace) -> list[RunResult]:
  """Trains and reports as ``optax_ftml.demo.main``'s parsed flags ask."""
  data = load_digits(seed=args.seed)
  steps_per_epoch = len(data.train_labels) // args.batch_size
  device = jax.devices()[0]
  print(f"JAX {jax.__version__}, backend {jax.default_backend()}"
        f" ({jax.device_count()} x {device.device_kind}); digits:"
        f" {len(data.train_labels)} training / {len(data.test_labels)} test"
        f" images; {args.steps} steps of batch {args.batch_size}"
        f" ({args.steps / steps_per_epoch:.1f} epochs), seed {args.seed}")

  results = [
      train(name, args.lr[name], data, args.steps, args.batch_size, args.seed,
            progress=not args.no_progress)
      for name in args.optimizers]

  print()
  print(format_table(results))
  plot(results, args.output,
       f"Flax NNX CNN on the digits data set, batch {args.batch_size},"
       f" seed {args.seed}")
  print(f"Loss curves written to {args.output}")
  return results
