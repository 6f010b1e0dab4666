"""FTML against Adam, RMSprop, Adadelta and Nesterov SGD on Fashion-MNIST.

The FTML paper's comparison (Zheng & Kwok, ICML 2017), on a real
image data set that runs on a CPU: a small CNN and a small residual network in
Flax NNX, trained with

* FTML (beta1 0.6, beta2 0.999, eps 1e-8, the paper's values),
* Adam, RMSprop and Adadelta (Optax's defaults besides the learning rate),
* SGD with Nesterov momentum 0.9,

each at the learning rate, from a grid of half-decades (..., 1e-3, 3e-3, 1e-2,
...), with the lowest validation loss on images held out of the training set.
The grid is extended by a half-decade while the best rate is at one of its
ends (at most ``max_extensions`` times on each side, which the table flags).
The selected rate is then trained from several seeds (initial weights and
batch order), and training loss and test error are recorded after every epoch.

Every (model, optimizer, learning rate, seed) run is cached as a small JSON
file under ``--cache``: an interrupted run, started again, continues where it
stopped.

The data are Fashion-MNIST's original IDX files (gzipped or not), which
nothing here downloads; on Debian and Ubuntu ``apt-get install
dataset-fashion-mnist`` puts them in the default ``--data`` directory::

    python benchmarks/fashion_mnist.py            # the full run (under an hour)
    python benchmarks/fashion_mnist.py --quick    # a smoke run, 300 images

Writes ``fashion_mnist.md``, ``fashion_mnist.json`` and the plots
``fashion_mnist_<model>.png`` and ``fashion_mnist_sensitivity.png`` to
``--out`` (``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import math
import os
import pathlib
import platform
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import machine  # benchmarks/machine.py, beside this script
import optax_ftml

try:
  import flax
  from flax import nnx
except ImportError as error:
  raise ImportError(
      f"This benchmark needs {error.name}: pip install \"optax_ftml[bench]\""
  ) from error

RESULTS = pathlib.Path(__file__).parent / "results"
CACHE = pathlib.Path(__file__).parent / ".cache" / "fashion_mnist"
DEBIAN_DATA = pathlib.Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = ("install Fashion-MNIST's IDX files with `apt-get install"
                " dataset-fashion-mnist` (Debian, Ubuntu) or pass --data with"
                " a directory that holds them")

IMAGE_SIDE = 28
NUM_CLASSES = 10
# Fashion-MNIST has 70,000 images; a header declaring far more is not one of
# its files (and is refused before its payload is read).
MAX_EXAMPLES = 1_000_000

# The optimizers and the half-decade grids their search starts from (around
# their usual rates), extended where the best rate lands on an end.
OPTIMIZERS: dict[str, tuple[Callable[..., optax.GradientTransformation],
                            tuple[float, ...]]] = {
    "ftml": (lambda learning_rate: optax_ftml.ftml(
        learning_rate, b1=0.6, b2=0.999, eps=1e-8), (1e-3, 3e-3, 1e-2, 3e-2)),
    "adam": (optax.adam, (3e-4, 1e-3, 3e-3, 1e-2)),
    "rmsprop": (optax.rmsprop, (3e-4, 1e-3, 3e-3, 1e-2)),
    "adadelta": (optax.adadelta, (0.3, 1.0, 3.0, 10.0)),
    "nesterov sgd": (lambda learning_rate: optax.sgd(
        learning_rate, momentum=0.9, nesterov=True), (1e-2, 3e-2, 1e-1, 3e-1)),
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """How much of the data, and how many epochs and seeds, a run uses."""

  train_size: int  # images trained on, drawn from the training file
  validation_size: int  # held out of the training file to select rates
  batch_size: int
  grid_epochs: int  # per learning rate of the grid, one seed
  epochs: int  # at the selected rate, every seed
  seeds: int
  grid_points: int  # of each optimizer's starting grid, from its middle
  max_extensions: int  # half-decades added on each side, at most


FULL = Settings(train_size=8_000, validation_size=5_000, batch_size=128,
                grid_epochs=3, epochs=10, seeds=5, grid_points=4,
                max_extensions=2)
QUICK = Settings(train_size=200, validation_size=100, batch_size=50,
                 grid_epochs=1, epochs=2, seeds=2, grid_points=2,
                 max_extensions=1)


# ---------------------------------------------------------------------------
# The IDX files
# ---------------------------------------------------------------------------

class IdxError(ValueError):
  """A file that is not the IDX file it should be."""


def find_idx(directory: pathlib.Path, name: str) -> pathlib.Path:
  """directory/name, or its gzipped name.gz; a clear error if neither exists."""
  for path in (directory / name, directory / f"{name}.gz"):
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"{directory / name} (or {name}.gz) not found: {INSTALL_HINT}.")


def read_idx(path: pathlib.Path, dims: tuple[int | None, ...]) -> np.ndarray:
  """An IDX file of unsigned bytes whose dimensions match dims (None: any).

  Checks the magic number (two zero bytes, type 0x08 for unsigned bytes, the
  number of dimensions) and that the payload is exactly as long as the
  dimensions say.
  """
  opener = gzip.open if path.name.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      magic = f.read(4)
      if len(magic) < 4 or magic[:3] != b"\x00\x00\x08":
        raise IdxError(f"{path}: not an IDX file of unsigned bytes (magic"
                       f" number {magic.hex() or 'missing'}, expected"
                       f" 000008{len(dims):02x})")
      if magic[3] != len(dims):
        raise IdxError(f"{path}: {magic[3]} dimensions, expected {len(dims)}")
      header = f.read(4 * len(dims))
      if len(header) < 4 * len(dims):
        raise IdxError(f"{path}: truncated header")
      shape = tuple(int(d) for d in np.frombuffer(header, ">u4"))
      for got, want in zip(shape, dims, strict=True):
        if want is not None and got != want:
          raise IdxError(f"{path}: dimensions {shape}, expected"
                         f" {tuple('n' if d is None else d for d in dims)}")
      if not 0 < shape[0] <= MAX_EXAMPLES:
        raise IdxError(f"{path}: {shape[0]} examples; expected 1 to"
                       f" {MAX_EXAMPLES}")
      size = math.prod(shape)
      payload = f.read(size + 1)
  except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
    if isinstance(error, FileNotFoundError):
      raise
    raise IdxError(f"{path}: unreadable ({error})") from error
  if len(payload) != size:
    raise IdxError(f"{path}: {len(payload)}{'+' if len(payload) > size else ''}"
                   f" bytes of data, the header declares {size}")
  return np.frombuffer(payload, np.uint8).reshape(shape)


def load_split(directory: pathlib.Path, prefix: str):
  """Images (n, 28, 28) and labels (n,), both uint8, of 'train' or 't10k'."""
  images = read_idx(find_idx(directory, f"{prefix}-images-idx3-ubyte"),
                    (None, IMAGE_SIDE, IMAGE_SIDE))
  labels_path = find_idx(directory, f"{prefix}-labels-idx1-ubyte")
  labels = read_idx(labels_path, (None,))
  if len(labels) != len(images):
    raise IdxError(f"{labels_path}: {len(labels)} labels for {len(images)}"
                   " images")
  if labels.max() >= NUM_CLASSES:
    raise IdxError(f"{labels_path}: label {labels.max()}, expected 0 to"
                   f" {NUM_CLASSES - 1}")
  return images, labels


@dataclasses.dataclass(frozen=True)
class Data:
  """Standardized NHWC float32 images and int32 labels of each split."""

  train: tuple[jax.Array, jax.Array]
  validation: tuple[jax.Array, jax.Array]
  test: tuple[jax.Array, jax.Array]
  digest: str  # identifies the images drawn, for the cache


def load_data(directory: pathlib.Path, settings: Settings) -> Data:
  """Validation and training images drawn, disjoint, from the training file."""
  train_images, train_labels = load_split(directory, "train")
  test_images, test_labels = load_split(directory, "t10k")
  needed = settings.validation_size + settings.train_size
  if needed > len(train_labels):
    raise ValueError(f"{needed} training and validation images needed, the"
                     f" training file has {len(train_labels)}")
  order = np.random.default_rng(0).permutation(len(train_labels))
  validation = order[:settings.validation_size]
  train = order[settings.validation_size:needed]
  mean = train_images[train].mean() / 255
  std = train_images[train].std() / 255

  def split(images, labels, index):
    x = (images[index].astype(np.float32) / 255 - mean) / std
    return (jnp.asarray(x[..., None], jnp.float32),
            jnp.asarray(labels[index], jnp.int32))

  digest = hashlib.sha256()
  for array in (train_images[train], train_labels[train],
                train_labels[validation], test_labels):
    digest.update(np.ascontiguousarray(array).tobytes())
  return Data(split(train_images, train_labels, train),
              split(train_images, train_labels, validation),
              split(test_images, test_labels, np.arange(len(test_labels))),
              digest.hexdigest()[:16])


# ---------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------

class CNN(nnx.Module):
  """Two 3x3 convolutions (8, 16 channels) with 2x2 max pooling, two dense."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
    self.hidden = nnx.Linear(7 * 7 * 16, 64, rngs=rngs)
    self.head = nnx.Linear(64, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = pool(nnx.relu(self.conv1(x)))
    x = pool(nnx.relu(self.conv2(x)))
    x = nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))
    return self.head(x)


class ResidualBlock(nnx.Module):
  """x + conv(relu(conv(relu(x)))), pre-activation, channels unchanged."""

  def __init__(self, channels: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(channels, channels, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, kernel_size=(3, 3), rngs=rngs)

  def __call__(self, x):
    return x + self.conv2(nnx.relu(self.conv1(nnx.relu(x))))


class ResNet(nnx.Module):
  """A 3x3 convolution, pooling, two residual blocks of 8 channels, pooling."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
    self.blocks = nnx.List([ResidualBlock(8, rngs) for _ in range(2)])
    self.head = nnx.Linear(7 * 7 * 8, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = pool(self.stem(x))
    for block in self.blocks:
      x = block(x)
    x = pool(nnx.relu(x))
    return self.head(x.reshape(x.shape[0], -1))


def pool(x):
  return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


MODELS: dict[str, type[nnx.Module]] = {"cnn": CNN, "resnet": ResNet}
MODEL_TITLES = {"cnn": "CNN: " + CNN.__doc__, "resnet": "ResNet: " + ResNet.__doc__}


# ---------------------------------------------------------------------------
# Training, one compiled step at a time
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything one cached run depends on.

  And nothing more: with more seeds, or a wider grid, the runs already done
  are found in the cache.
  """

  model: str
  optimizer: str
  learning_rate: float
  seed: int
  epochs: int
  test_every_epoch: bool  # else the test set is evaluated after the last
  batch_size: int
  data_digest: str  # the images drawn for training, validation and test

  def cache_name(self) -> str:
    fingerprint = hashlib.sha256(json.dumps(
        dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]
    return (f"{self.model}-{self.optimizer.replace(' ', '_')}"
            f"-lr{self.learning_rate:g}-seed{self.seed}-{self.epochs}ep"
            f"-{fingerprint}.json")


class Trainer:
  """One model's compiled training steps (one per optimizer) and evaluation."""

  EVAL_CHUNK = 1000  # images per evaluation step: bounds the memory

  def __init__(self, model: str):
    self.graphdef, _ = nnx.split(MODELS[model](nnx.Rngs(0)))
    self.model = model
    self.steps: dict[str, tuple] = {}
    self.evaluate = jax.jit(self._evaluate)

  def init(self, seed: int):
    return nnx.split(MODELS[self.model](nnx.Rngs(seed)))[1]

  def logits(self, params, images):
    return nnx.merge(self.graphdef, params)(images)

  def loss(self, params, images, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        self.logits(params, images), labels).mean()

  def step(self, optimizer: str):
    """The optimizer's transform, and its jitted training step.

    (params, state, images, labels, batch) -> (params, state, loss), batch
    the indices of the step's images. Epochs are Python loops of steps: on
    XLA:CPU an epoch as one ``lax.scan`` ran these convolutions 2 to 5 times
    slower per step than separate calls.
    """
    if optimizer not in self.steps:
      # The learning rate is part of the state: one compilation serves the grid.
      transform = optax.inject_hyperparams(OPTIMIZERS[optimizer][0])(
          learning_rate=1.0)

      def one_step(params, state, images, labels, batch):
        loss, grads = jax.value_and_grad(self.loss)(
            params, images[batch], labels[batch])
        updates, state = transform.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

      self.steps[optimizer] = (transform,
                               jax.jit(one_step, donate_argnums=(0, 1)))
    return self.steps[optimizer]

  def _evaluate(self, params, images, labels):
    """Mean loss and error rate, in chunks (zero-padded, then masked)."""
    n = len(labels)
    size = min(n, self.EVAL_CHUNK)
    pad = -n % size
    images = jnp.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)))
    labels = jnp.pad(labels, (0, pad))
    mask = jnp.arange(n + pad) < n

    def chunk(arrays):
      x, y, m = arrays
      logits = self.logits(params, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return (jnp.sum(jnp.where(m, loss, 0.0)),
              jnp.sum(m & (jnp.argmax(logits, -1) != y)))

    shape = lambda a: a.reshape(-1, size, *a.shape[1:])
    losses, errors = jax.lax.map(chunk, (shape(images), shape(labels),
                                         shape(mask)))
    return jnp.sum(losses) / n, jnp.sum(errors) / n


def batch_order(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
  """The epoch's batches: a fresh permutation, the incomplete batch dropped."""
  order = np.random.default_rng([seed, epoch]).permutation(n)
  steps = n // batch_size
  return order[:steps * batch_size].reshape(steps, batch_size)


def finite_or_none(value) -> float | None:
  """JSON has no NaN or infinity: a diverged run's figures are null."""
  value = float(value)
  return value if math.isfinite(value) else None


def train(spec: RunSpec, trainer: Trainer, data: Data) -> dict:
  """Trains one run; stops at the first non-finite training loss."""
  transform, step = trainer.step(spec.optimizer)
  params = trainer.init(spec.seed)
  state = transform.init(params)
  state.hyperparams["learning_rate"] = jnp.asarray(spec.learning_rate,
                                                   jnp.float32)
  images, labels = data.train
  record: dict[str, Any] = {
      "train_loss": [], "test_loss": [], "test_error": [], "epoch_seconds": []}
  for epoch in range(spec.epochs):
    batches = jnp.asarray(batch_order(spec.seed, epoch, len(labels),
                                      spec.batch_size))
    start = time.perf_counter()
    losses = []
    for batch in batches:
      params, state, loss = step(params, state, images, labels, batch)
      losses.append(loss)
    loss = float(jnp.mean(jnp.stack(losses)))  # waits for the epoch
    record["epoch_seconds"].append(time.perf_counter() - start)
    record["train_loss"].append(finite_or_none(loss))
    if spec.test_every_epoch or epoch == spec.epochs - 1 or not math.isfinite(
        loss):
      test = trainer.evaluate(params, *data.test)
      record["test_loss"].append(finite_or_none(test[0]))
      record["test_error"].append(finite_or_none(test[1]))
    if not math.isfinite(loss):
      break
  validation = trainer.evaluate(params, *data.validation)
  record["validation_loss"] = finite_or_none(validation[0])
  record["validation_error"] = finite_or_none(validation[1])
  return record


def cached_run(spec: RunSpec, trainer: Trainer, data: Data,
               cache: pathlib.Path) -> dict:
  """The run's record, from the cache where it was run before."""
  path = cache / spec.cache_name()
  if path.is_file():
    try:
      saved = json.loads(path.read_text())
      if saved["spec"] == json.loads(json.dumps(dataclasses.asdict(spec))):
        return saved["record"]
    except (ValueError, KeyError):
      pass  # a damaged entry is run again
  start = time.perf_counter()
  record = train(spec, trainer, data)
  record["seconds"] = time.perf_counter() - start
  cache.mkdir(parents=True, exist_ok=True)
  partial = path.with_suffix(".part")
  partial.write_text(json.dumps({"spec": dataclasses.asdict(spec),
                                 "record": record}) + "\n")
  os.replace(partial, path)  # an interruption leaves no half-written entry
  print(f"  {spec.model} / {spec.optimizer} lr {spec.learning_rate:g}"
        f" seed {spec.seed}: validation loss {record['validation_loss']},"
        f" test error {record['test_error'][-1]}"
        f" ({record['seconds']:.0f} s)", flush=True)
  return record


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------

def next_half_decade(rate: float, direction: int) -> float:
  """The grid's neighbour of rate (... 0.1, 0.3, 1, 3 ...): above (+1) or below (-1)."""
  exponent, upper_half = divmod(round(2 * math.log10(rate)) + direction, 2)
  return float(f"{(3 if upper_half else 1) * 10.0**exponent:.0e}")


def validation_loss(record: dict) -> float:
  """A diverged run ranks last."""
  loss = record["validation_loss"]
  return math.inf if loss is None else loss


def search(run: Callable[[float], dict], grid: list[float],
           max_extensions: int) -> tuple[dict[float, dict], float]:
  """Every rate's record, extending the grid while the best is at an end."""
  records = {rate: run(rate) for rate in grid}
  extensions = {-1: 0, 1: 0}
  while True:
    rates = sorted(records)
    best = min(rates, key=lambda rate: validation_loss(records[rate]))
    direction = -1 if best == rates[0] else 1 if best == rates[-1] else 0
    if not direction or extensions[direction] == max_extensions:
      return records, best
    extensions[direction] += 1
    rate = next_half_decade(best, direction)
    records[rate] = run(rate)


def geometric_summary(values) -> dict[str, float | None]:
  """Geometric mean, minimum and maximum over the seeds (None if any diverged)."""
  if any(v is None for v in values):
    return {"geometric_mean": None, "min": None, "max": None}
  values = np.asarray(values, np.float64)
  return {"geometric_mean": float(np.exp(np.mean(np.log(values)))),
          "min": float(values.min()), "max": float(values.max())}


def curve_summary(curves: list[list]) -> dict[str, list]:
  """Per epoch, over the seeds; a curve cut short by divergence is padded."""
  length = max(map(len, curves))
  padded = [c + [None] * (length - len(c)) for c in curves]
  per_epoch = [geometric_summary(column) for column in zip(*padded, strict=True)]
  return {key: [e[key] for e in per_epoch]
          for key in ("geometric_mean", "min", "max")}


def compare(model: str, optimizer: str, trainer: Trainer, data: Data,
            settings: Settings, cache: pathlib.Path) -> dict:
  """One optimizer on one model: its grid, then its selected rate's seeds."""

  def run(rate, seed, epochs, test_every_epoch):
    return cached_run(RunSpec(model, optimizer, rate, seed, epochs,
                              test_every_epoch, settings.batch_size,
                              data.digest),
                      trainer, data, cache)

  start = OPTIMIZERS[optimizer][1]
  middle = (len(start) - settings.grid_points) // 2
  records, best = search(
      lambda rate: run(rate, 0, settings.grid_epochs, False),
      list(start[middle:middle + settings.grid_points]),
      settings.max_extensions)
  runs = [run(best, seed, settings.epochs, True)
          for seed in range(settings.seeds)]
  rates = sorted(records)
  return {
      "learning_rate": best,
      "at_grid_edge": best in (rates[0], rates[-1]),
      "grid": {f"{rate:g}": {
          "validation_loss": records[rate]["validation_loss"],
          "validation_error": records[rate]["validation_error"]}
               for rate in rates},
      "train_loss": curve_summary([r["train_loss"] for r in runs]),
      "test_error": curve_summary([r["test_error"] for r in runs]),
      "final_train_loss": geometric_summary(
          [r["train_loss"][-1] for r in runs]),
      "final_test_error": mean_and_std([r["test_error"][-1] for r in runs]),
      "final_test_loss": mean_and_std([r["test_loss"][-1] for r in runs]),
      # The median leaves out the epochs that waited for a compilation.
      "epoch_seconds": float(np.median(
          [s for r in runs for s in r["epoch_seconds"]])),
      "compute_seconds": sum(r["seconds"] for r in runs) + sum(
          r["seconds"] for r in records.values()),
  }


def experiment(data: Data, settings: Settings, cache: pathlib.Path,
               models: list[str], optimizers: list[str]) -> dict:
  results = {}
  for model in models:
    trainer = Trainer(model)
    results[model] = {}
    for name in optimizers:
      summary = compare(model, name, trainer, data, settings, cache)
      results[model][name] = summary
      print(f"{model} / {name}: lr {summary['learning_rate']:g}, final test"
            f" error {summary['final_test_error']}", flush=True)
  return results


def mean_and_std(values) -> list[float | None]:
  if any(v is None for v in values):
    return [None, None]
  return [float(np.mean(values)), float(np.std(values))]


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def package_versions() -> dict[str, str]:
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "optax": optax.__version__,
          "flax": flax.__version__, "numpy": np.__version__,
          "optax_ftml": optax_ftml.__version__}


def percent(value: float | None, digits: int = 2) -> str:
  return "diverged" if value is None else f"{100 * value:.{digits}f}"


def markdown(output: dict) -> str:
  settings, on = output["settings"], output["machine"]
  lines = [
      f"Fashion-MNIST: {settings['train_size']:,} training images (drawn from"
      f" the 60,000 of the training file), {settings['validation_size']:,}"
      " validation images (held out of the same file, disjoint) to select the"
      " learning rates, and the full 10,000-image test set. Batch"
      f" {settings['batch_size']}; {settings['epochs']} epochs and"
      f" {settings['seeds']} seeds (initial weights and batch order) at each"
      " optimizer's selected rate; the grid's runs take"
      f" {settings['grid_epochs']} epochs and one seed. Compute:"
      f" {output['compute_seconds'] / 60:.0f} minutes in all.",
      "",
      "Versions: " + ", ".join(f"{k} {v}" for k, v in output["versions"].items())
      + f"; {on['cpu']}, {on['cpu_count']} cores.",
      "",
      "Training loss: the mean of the epoch's batch losses. Final train loss:"
      " geometric mean over the seeds [min, max]; test error: mean ± standard"
      " deviation over the seeds. Time: median seconds per epoch (compiled,"
      " machine shared with other work). `*`: the selected rate is still at"
      " an end of the grid.",
      "",
      "| model | optimizer | learning rate | final train loss | test error (%)"
      " | test loss | s / epoch |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for model, row in output["results"].items():
    for name, r in row.items():
      loss, error = r["final_train_loss"], r["final_test_error"]
      train_loss = ("diverged" if loss["geometric_mean"] is None else
                    f"{loss['geometric_mean']:.4f} [{loss['min']:.4f},"
                    f" {loss['max']:.4f}]")
      test_error = ("diverged" if error[0] is None else
                    f"{percent(error[0])} ± {percent(error[1])}")
      test_loss = ("diverged" if r["final_test_loss"][0] is None else
                   f"{r['final_test_loss'][0]:.4f}")
      lines.append(
          f"| {model} | {name} | {r['learning_rate']:g}"
          f"{'*' if r['at_grid_edge'] else ''} | {train_loss} | {test_error}"
          f" | {test_loss} | {r['epoch_seconds']:.2f} |")
  lines += ["", "Learning-rate sensitivity: validation loss after"
            f" {settings['grid_epochs']} epochs (one seed) at each rate of the"
            " grid; the selected rate in bold.", ""]
  for model, row in output["results"].items():
    rates = sorted({float(rate) for r in row.values() for rate in r["grid"]})
    lines += [f"| {model} | " + " | ".join(f"{rate:g}" for rate in rates) + " |",
              "| --- |" + " ---: |" * len(rates)]
    for name, r in row.items():
      cells = []
      for rate in rates:
        entry = r["grid"].get(f"{rate:g}")
        if entry is None:
          cells.append("")
          continue
        loss = entry["validation_loss"]
        cell = "diverged" if loss is None else f"{loss:.3f}"
        cells.append(f"**{cell}**" if rate == r["learning_rate"] else cell)
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def plot(output: dict, out: pathlib.Path) -> list[pathlib.Path]:
  """Per model, training loss and test error against epochs; the grids."""
  # pylint: disable=import-outside-toplevel
  from matplotlib import ticker
  from matplotlib.figure import Figure

  def plain_log_labels(ax):
    """0.2, 0.3 rather than 2 x 10^-1, and on enough minor ticks to read.

    Within a decade the ticks at 1, 1.2, 1.5, 2, 2.5, 3, 4, ..., 9 times a
    power of ten are labelled; within two decades, 1, 2, 3 and 5 times;
    beyond, the powers of ten only.
    """
    low, high = ax.get_ylim()
    if high < 10 * low:  # also 1.2, 1.5 and 2.5 times a power of ten
      ax.yaxis.set_minor_locator(ticker.LogLocator(
          subs=(1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)))
    leading = lambda value: round(value / 10**math.floor(math.log10(value)), 1)
    shown = ((1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9) if high < 10 * low else
             (1, 2, 3, 5) if high < 100 * low else (1,))
    for set_formatter in (ax.yaxis.set_major_formatter,
                          ax.yaxis.set_minor_formatter):
      set_formatter(ticker.FuncFormatter(
          lambda value, _: f"{value:g}" if leading(value) in shown else ""))

  paths = []
  for model, row in output["results"].items():
    fig = Figure(figsize=(11, 4.2))
    loss_ax, error_ax = fig.subplots(1, 2)
    for name, r in row.items():
      label = f"{name} (lr {r['learning_rate']:g})"
      for ax, key in ((loss_ax, "train_loss"), (error_ax, "test_error")):
        curve = {k: np.asarray([np.nan if v is None else v for v in values])
                 for k, values in r[key].items()}
        epochs = np.arange(1, len(curve["geometric_mean"]) + 1)
        scale = 100 if key == "test_error" else 1
        line, = ax.plot(epochs, scale * curve["geometric_mean"], marker=".",
                        label=label, lw=2.2 if name == "ftml" else 1.2,
                        zorder=3 if name == "ftml" else 2)
        ax.fill_between(epochs, scale * curve["min"], scale * curve["max"],
                        color=line.get_color(), alpha=0.18, lw=0)
    seeds = output["settings"]["seeds"]
    loss_ax.set(xlabel="epoch", ylabel="training loss (mean over the epoch)",
                yscale="log", title="Training loss")
    error_ax.set(xlabel="epoch", ylabel="test error (%)", yscale="log",
                 title="Test error")
    for ax in (loss_ax, error_ax):
      ax.grid(alpha=0.3, which="both")
      ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
      plain_log_labels(ax)
    loss_ax.legend(fontsize=8)
    fig.suptitle(f"Fashion-MNIST, {MODEL_TITLES[model]} Lines: geometric mean"
                 f" over {seeds} seeds; bands: min to max", fontsize=9)
    fig.tight_layout()
    path = out / f"fashion_mnist_{model}.png"
    fig.savefig(path, dpi=100)
    paths.append(path)

  models = list(output["results"])
  fig = Figure(figsize=(5.5 * len(models), 4.2))
  axes = np.atleast_1d(fig.subplots(1, len(models)))
  for ax, model in zip(axes, models, strict=True):
    row = output["results"][model]
    finite = [e["validation_loss"] for r in row.values()
              for e in r["grid"].values() if e["validation_loss"] is not None]
    # The axis spans twice the best loss: the differences near the optimum
    # stay readable; worse points (chance level is ln 10 = 2.30) sit on the
    # top edge as triangles.
    top = 2 * min(finite) if finite else 1.0
    for name, r in row.items():
      rates = np.asarray(sorted(map(float, r["grid"])))
      losses = np.asarray([np.nan if v is None else v for v in (
          r["grid"][f"{rate:g}"]["validation_loss"] for rate in rates)])
      emphasis = name in ("ftml", "adam")
      style = {"lw": 2.2 if emphasis else 0.9, "alpha": 1 if emphasis else 0.55}
      line, = ax.plot(rates, np.minimum(losses, top), marker="o", label=name,
                      **style)
      above = losses > top
      ax.plot(rates[above], np.full(above.sum(), top), marker="^", ms=9,
              ls="", color=line.get_color(), alpha=style["alpha"])
      best = r["grid"][f"{r['learning_rate']:g}"]["validation_loss"]
      ax.plot([r["learning_rate"]], [best], marker="*", ms=14,
              color=line.get_color(), lw=0)
    ax.set(xscale="log", yscale="log", xlabel="learning rate",
           ylabel=f"validation loss after {output['settings']['grid_epochs']}"
           " epoch(s)", title=f"{model}: learning-rate sensitivity",
           ylim=(None, top * 1.04))
    ax.grid(alpha=0.3, which="both")
    plain_log_labels(ax)
    ax.legend(fontsize=8)
  fig.suptitle("Each optimizer's grid (one seed). Star: the selected rate;"
               " triangle: off the scale (above twice the best loss);"
               " a missing point diverged", fontsize=9)
  fig.tight_layout()
  path = out / "fashion_mnist_sensitivity.png"
  fig.savefig(path, dpi=100)
  paths.append(path)
  return paths


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", type=pathlib.Path, default=DEBIAN_DATA,
                      help="directory of the IDX files (gzipped or not)")
  parser.add_argument("--quick", action="store_true",
                      help="a few hundred images, few epochs (a smoke run)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS,
                      help="directory for the table, the numbers and the plots")
  parser.add_argument("--cache", type=pathlib.Path, default=CACHE,
                      help="directory of the finished runs' records")
  parser.add_argument("--models", nargs="+", choices=list(MODELS),
                      default=list(MODELS))
  parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS),
                      default=list(OPTIMIZERS))
  args = parser.parse_args(argv)
  settings = QUICK if args.quick else FULL
  try:
    data = load_data(args.data, settings)
  except (FileNotFoundError, IdxError) as error:
    parser.exit(2, f"{parser.prog}: error: {error}\n")
  start = time.perf_counter()
  results = experiment(data, settings, args.cache, args.models, args.optimizers)
  output = {
      "quick": args.quick, "settings": dataclasses.asdict(settings),
      "versions": package_versions(), "machine": machine.description(),
      "compute_seconds": sum(r["compute_seconds"] for row in results.values()
                             for r in row.values()),
      "wall_seconds_this_invocation": time.perf_counter() - start,
      "results": results}
  args.out.mkdir(parents=True, exist_ok=True)
  table = markdown(output)
  (args.out / "fashion_mnist.md").write_text(table)
  (args.out / "fashion_mnist.json").write_text(json.dumps(output) + "\n")
  plot(output, args.out)
  print(table)


if __name__ == "__main__":
  main()
