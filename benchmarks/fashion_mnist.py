"""FTML against Adam, RMSprop, Adadelta and Nesterov SGD on Fashion-MNIST.

Fashion-MNIST (Xiao, Rasul & Vollgraf, arXiv 1708.07747, August 2017) came out
after the FTML paper (Zheng & Kwok, ICML 2017) and is not one of its data
sets. Three Flax NNX networks:

* ``keras``: the Keras CIFAR-10 example CNN (four 3x3 convolutions of 32, 32,
  64 and 64 channels, max pooling and dropout 0.25 after each pair, a dense
  layer of 512 with dropout 0.5; about 0.89M parameters on 28x28x1 inputs,
  1.25M on CIFAR-10's 32x32x3), the network FTML's first author checked his
  Keras implementation on;
* ``cnn``: two 3x3 convolutions (8, 16 channels), a dense layer of 64 (52k);
* ``resnet``: a 3x3 convolution and two residual blocks of 8 channels (6k).

The protocol: all 60,000 training images, batch 128, 10 epochs at a constant
learning rate; after every epoch the training loss on the whole training set
(dropout off) beside the mean of the epoch's batch losses, and loss and error
on a validation half and a test half of the 10,000 test images (disjoint,
drawn once). Every rate of a fixed grid, with seeds (initial weights, batch
order and dropout) shared by the optimizers:

* FTML (beta1 0.6, beta2 0.999, eps 1e-8, the paper's values) at 0.0025 (its
  default), 0.003, 0.01 and 0.03; Adam at 0.001, 0.003 and 0.01;
* RMSprop, Adadelta (Optax's defaults besides the rate) and SGD with Nesterov
  momentum 0.9, each at the rate an earlier search picked (0.01, 3, 0.03) and
  one half-decade on each side;
* 3 seeds each on ``cnn`` and ``resnet``; fewer rates and seeds on ``keras``
  (``REDUCED``), whose epoch costs about 10 times the small CNN's.

No rate is selected in advance: the report shows the whole grid, and each
optimizer's best rate by the final full-set training loss (how fast it
trains) and by the final validation loss (how well it generalises), among
the rates whose seeds have all finished.

Every (model, optimizer, rate, seed) run is written, when it finishes, as a
JSON file to ``--cache`` (``benchmarks/results/fashion_mnist_runs/``, kept in
the repository), and the report is rewritten from every finished run: the
same command, started again, continues where the last one stopped, most
important runs first (``PRIORITY``). A part of the grid (``--models``,
``--optimizers``) can run beside it, with its partial report written
elsewhere: neither runs what the other has finished::

    nice -n 19 python benchmarks/fashion_mnist.py            # resumes the grid
    nice -n 19 python benchmarks/fashion_mnist.py --models resnet \
        --optimizers ftml adam --out /tmp/resnet  # beside it: a part of it
    python benchmarks/fashion_mnist.py --report-only         # tables and plots
    python benchmarks/fashion_mnist.py --quick               # a smoke run

The data are Fashion-MNIST's original IDX files (gzipped or not), which
nothing here downloads; on Debian and Ubuntu ``apt-get install
dataset-fashion-mnist`` puts them in the default ``--data`` directory.

Writes ``fashion_mnist.md``, ``fashion_mnist.json`` (every run's per-epoch
curves) and the plots ``fashion_mnist_<model>.png`` and
``fashion_mnist_rates.png`` to ``--out`` (``benchmarks/results``; a
``--quick`` run writes to ``benchmarks/.cache/fashion_mnist_quick``).
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
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import machine  # benchmarks/machine.py, beside this script
import optax_ftml

try:
  import flax
  from flax import nnx
except ImportError as error:
  raise ImportError(
      f"This benchmark needs {error.name}: pip install \".[bench]\" in a clone"
  ) from error

RESULTS = pathlib.Path(__file__).parent / "results"
RUNS = RESULTS / "fashion_mnist_runs"
QUICK_OUT = pathlib.Path(__file__).parent / ".cache" / "fashion_mnist_quick"
DEBIAN_DATA = pathlib.Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = ("install Fashion-MNIST's IDX files with `apt-get install"
                " dataset-fashion-mnist` (Debian, Ubuntu) or pass --data with"
                " a directory that holds them")

IMAGE_SIDE = 28
NUM_CLASSES = 10
# Fashion-MNIST has 70,000 images; a header declaring far more is not one of
# its files (and is refused before its payload is read).
MAX_EXAMPLES = 1_000_000

# The optimizers and the rates each is run at.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "ftml": lambda learning_rate: optax_ftml.ftml(
        learning_rate, b1=0.6, b2=0.999, eps=1e-8),
    "adam": optax.adam,
    "rmsprop": optax.rmsprop,
    "adadelta": optax.adadelta,
    "nesterov sgd": lambda learning_rate: optax.sgd(
        learning_rate, momentum=0.9, nesterov=True),
}
RATES: dict[str, tuple[float, ...]] = {
    "ftml": (0.0025, 0.003, 0.01, 0.03),
    "adam": (0.001, 0.003, 0.01),
    "rmsprop": (0.003, 0.01, 0.03),
    "adadelta": (1.0, 3.0, 10.0),
    "nesterov sgd": (0.01, 0.03, 0.1),
}
# The Keras network's grid, smaller for its cost: (rates, seeds).
REDUCED: dict[str, tuple[tuple[float, ...], int]] = {
    "ftml": ((0.0025, 0.01), 2),
    "adam": ((0.001, 0.003), 2),
    "rmsprop": ((0.01,), 1),
    "adadelta": ((3.0,), 1),
    "nesterov sgd": ((0.03,), 1),
}
LEADS = ("ftml", "adam")
OTHERS = ("rmsprop", "adadelta", "nesterov sgd")
# The order the grid is run in: (model, optimizers), each block seed by seed
# (every rate's first seed, then every rate's second ...).
PRIORITY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cnn", LEADS), ("keras", LEADS), ("resnet", LEADS),
    ("cnn", OTHERS), ("resnet", OTHERS), ("keras", OTHERS))


@dataclasses.dataclass(frozen=True)
class Settings:
  """How much of the data, and how many epochs and seeds, a run uses."""

  train_size: int | None  # images of the training file (None: all 60,000)
  validation_size: int  # of the test file; the rest of it is the test set
  batch_size: int
  epochs: int
  seeds: int  # at each rate (the Keras network: REDUCED's)
  rates_per_optimizer: int | None  # the first of RATES (None: all)


FULL = Settings(train_size=None, validation_size=5_000, batch_size=128,
                epochs=10, seeds=3, rates_per_optimizer=None)
QUICK = Settings(train_size=200, validation_size=30, batch_size=50, epochs=2,
                 seeds=2, rates_per_optimizer=2)


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
  digest: str  # identifies the images of each split, for the cache


def load_data(directory: pathlib.Path, settings: Settings) -> Data:
  """The training images; validation and test halves of the test file."""
  train_images, train_labels = load_split(directory, "train")
  test_images, test_labels = load_split(directory, "t10k")
  train_size = settings.train_size or len(train_labels)
  if train_size > len(train_labels):
    raise ValueError(f"{train_size} training images needed, the training"
                     f" file has {len(train_labels)}")
  if not 0 < settings.validation_size < len(test_labels):
    raise ValueError(f"{settings.validation_size} validation images drawn"
                     f" from a test file of {len(test_labels)}")
  train = np.sort(np.random.default_rng(0).permutation(
      len(train_labels))[:train_size])
  order = np.random.default_rng(1).permutation(len(test_labels))
  validation, test = order[:settings.validation_size], order[
      settings.validation_size:]
  mean = train_images[train].mean() / 255
  std = train_images[train].std() / 255

  def split(images, labels, index):
    x = (images[index].astype(np.float32) / 255 - mean) / std
    return (jnp.asarray(x[..., None], jnp.float32),
            jnp.asarray(labels[index], jnp.int32))

  digest = hashlib.sha256()
  for array in (train_images[train], train_labels[train], validation,
                test_labels):
    digest.update(np.ascontiguousarray(array).tobytes())
  return Data(split(train_images, train_labels, train),
              split(test_images, test_labels, validation),
              split(test_images, test_labels, test),
              digest.hexdigest()[:16])


# ---------------------------------------------------------------------------
# The models: called with a key, dropout is on; without, off
# ---------------------------------------------------------------------------

class KerasCNN(nnx.Module):
  """Keras's CIFAR-10 example CNN: convolutions 32-32-64-64, dense 512, dropout.

  As keras/examples/cifar10_cnn.py builds it (each pair of convolutions: the
  first 'same', the second 'valid', then 2x2 max pooling and dropout 0.25;
  a dense layer of 512 and dropout 0.5), on 28x28x1 images.
  """

  def __init__(self, rngs: nnx.Rngs):
    self.convs = nnx.List([
        nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs),
        nnx.Conv(32, 32, kernel_size=(3, 3), padding="VALID", rngs=rngs),
        nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs),
        nnx.Conv(64, 64, kernel_size=(3, 3), padding="VALID", rngs=rngs)])
    # 28 -> 26 -> 13 -> 11 -> 5: 5x5x64 features.
    self.hidden = nnx.Linear(5 * 5 * 64, 512, rngs=rngs)
    self.head = nnx.Linear(512, NUM_CLASSES, rngs=rngs)
    self.conv_dropout = nnx.Dropout(0.25)
    self.dense_dropout = nnx.Dropout(0.5)

  def __call__(self, x, key=None):
    keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
    for pair in range(2):
      x = nnx.relu(self.convs[2 * pair](x))
      x = pool(nnx.relu(self.convs[2 * pair + 1](x)))
      x = self.conv_dropout(x, deterministic=key is None, rngs=keys[pair])
    x = nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))
    x = self.dense_dropout(x, deterministic=key is None, rngs=keys[2])
    return self.head(x)


class CNN(nnx.Module):
  """Two 3x3 convolutions (8, 16 channels) with 2x2 max pooling, two dense."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
    self.hidden = nnx.Linear(7 * 7 * 16, 64, rngs=rngs)
    self.head = nnx.Linear(64, NUM_CLASSES, rngs=rngs)

  def __call__(self, x, key=None):
    del key  # no dropout
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

  def __call__(self, x, key=None):
    del key  # no dropout
    x = pool(self.stem(x))
    for block in self.blocks:
      x = block(x)
    x = pool(nnx.relu(x))
    return self.head(x.reshape(x.shape[0], -1))


def pool(x):
  return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


MODELS: dict[str, type[nnx.Module]] = {
    "cnn": CNN, "keras": KerasCNN, "resnet": ResNet}
MODEL_TITLES = {
    "cnn": "small CNN: " + CNN.__doc__,
    "keras": KerasCNN.__doc__.splitlines()[0],
    "resnet": "small ResNet: " + ResNet.__doc__}


def parameter_count(model: str) -> int:
  params = nnx.state(MODELS[model](nnx.Rngs(0)), nnx.Param)
  return sum(leaf.size for leaf in jax.tree.leaves(params))


def grid(model: str, optimizer: str,
         settings: Settings) -> tuple[tuple[float, ...], int]:
  """The rates an optimizer runs at on a model, and the seeds at each."""
  if model == "keras" and settings.rates_per_optimizer is None:
    return REDUCED[optimizer]
  return RATES[optimizer][:settings.rates_per_optimizer], settings.seeds


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
  batch_size: int
  data_digest: str  # the images of training, validation and test

  def cache_name(self) -> str:
    fingerprint = hashlib.sha256(json.dumps(
        dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]
    return (f"{self.model}-{self.optimizer.replace(' ', '_')}"
            f"-lr{self.learning_rate:g}-seed{self.seed}-{self.epochs}ep"
            f"-{fingerprint}.json")


# The curves a run records, one value per epoch.
CURVES = ("train_loss", "train_error", "train_batch_loss", "validation_loss",
          "validation_error", "test_loss", "test_error", "epoch_seconds",
          "evaluation_seconds")


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

  def logits(self, params, images, key=None):
    return nnx.merge(self.graphdef, params)(images, key)

  def loss(self, params, images, labels, key):
    return optax.softmax_cross_entropy_with_integer_labels(
        self.logits(params, images, key), labels).mean()

  def step(self, optimizer: str):
    """The optimizer's transform, and its jitted training step.

    (params, state, images, labels, batch, epoch_key, index) -> (params,
    state, loss), batch the indices of the step's images, the dropout key
    epoch_key folded with the step's index. Epochs are Python loops of steps:
    on XLA:CPU an epoch as one ``lax.scan`` ran these convolutions 2 to 5
    times slower per step than separate calls.
    """
    if optimizer not in self.steps:
      # The learning rate is part of the state: one compilation serves the grid.
      transform = optax.inject_hyperparams(OPTIMIZERS[optimizer])(
          learning_rate=1.0)

      def one_step(params, state, images, labels, batch, epoch_key, index):
        loss, grads = jax.value_and_grad(self.loss)(
            params, images[batch], labels[batch],
            jax.random.fold_in(epoch_key, index))
        updates, state = transform.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

      self.steps[optimizer] = (transform,
                               jax.jit(one_step, donate_argnums=(0, 1)))
    return self.steps[optimizer]

  def _evaluate(self, params, images, labels):
    """Mean loss and error rate, dropout off, in chunks (padded, masked)."""
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


DROPOUT_STREAM = 1  # folded into the seed's key: dropout's own random stream


def train(spec: RunSpec, trainer: Trainer, data: Data) -> dict:
  """Trains one run; stops after the first epoch with a non-finite loss."""
  transform, step = trainer.step(spec.optimizer)
  params = trainer.init(spec.seed)
  state = transform.init(params)
  state.hyperparams["learning_rate"] = jnp.asarray(spec.learning_rate,
                                                   jnp.float32)
  images, labels = data.train
  dropout = jax.random.fold_in(jax.random.key(spec.seed), DROPOUT_STREAM)
  record: dict[str, Any] = {curve: [] for curve in CURVES}
  for epoch in range(spec.epochs):
    batches = jnp.asarray(batch_order(spec.seed, epoch, len(labels),
                                      spec.batch_size))
    epoch_key = jax.random.fold_in(dropout, epoch)
    start = time.perf_counter()
    losses = []
    for index, batch in enumerate(batches):
      params, state, loss = step(params, state, images, labels, batch,
                                 epoch_key, index)
      losses.append(loss)
    batch_loss = float(jnp.mean(jnp.stack(losses)))  # waits for the epoch
    record["epoch_seconds"].append(time.perf_counter() - start)
    start = time.perf_counter()
    for split in ("train", "validation", "test"):
      loss, error = trainer.evaluate(params, *getattr(data, split))
      record[f"{split}_loss"].append(finite_or_none(loss))
      record[f"{split}_error"].append(finite_or_none(error))
    record["evaluation_seconds"].append(time.perf_counter() - start)
    record["train_batch_loss"].append(finite_or_none(batch_loss))
    if record["train_loss"][-1] is None or not math.isfinite(batch_loss):
      break
  return record


def read_run(spec: RunSpec, cache: pathlib.Path) -> dict | None:
  """The run's record, where a finished run of this spec is in the cache."""
  path = cache / spec.cache_name()
  if not path.is_file():
    return None
  try:
    saved = json.loads(path.read_text())
    if saved["spec"] == json.loads(json.dumps(dataclasses.asdict(spec))):
      return saved["record"]
  except (ValueError, KeyError):
    pass  # a damaged entry is run again
  return None


def write_whole(path: pathlib.Path, content: str | Callable[[Any], None]):
  """Writes text, or calls content(file), into path in one step.

  Through a temporary file renamed over path: an interruption, or a commit
  taken while the grid runs, finds the old file or the new, never half of one.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + ".part")
  if isinstance(content, str):
    partial.write_text(content)
  else:
    with open(partial, "wb") as f:
      content(f)
  os.replace(partial, path)


def run_and_save(spec: RunSpec, trainer: Trainer, data: Data,
                 cache: pathlib.Path) -> dict:
  """Trains the run and writes its record, with what it ran on."""
  start = time.perf_counter()
  record = train(spec, trainer, data)
  record["seconds"] = time.perf_counter() - start
  record["versions"] = {**machine.package_versions(), "flax": flax.__version__}
  record["machine"] = machine.description()
  record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  write_whole(cache / spec.cache_name(), json.dumps(
      {"spec": dataclasses.asdict(spec), "record": record}) + "\n")
  print(f"  {spec.model} / {spec.optimizer} lr {spec.learning_rate:g}"
        f" seed {spec.seed}: full-set training loss"
        f" {record['train_loss'][-1]}, test error {record['test_error'][-1]}"
        f" ({record['seconds']:.0f} s)", flush=True)
  return record


# ---------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------

def plan(settings: Settings, data: Data, models: list[str],
         optimizers: list[str]) -> list[RunSpec]:
  """Every run of the grid, in PRIORITY's order, each block seed by seed."""
  specs = []
  for model, block in PRIORITY:
    names = [name for name in block if name in optimizers]
    if model not in models or not names:
      continue
    seeds = max(grid(model, name, settings)[1] for name in names)
    for seed in range(seeds):
      for name in names:
        rates, rate_seeds = grid(model, name, settings)
        specs += [RunSpec(model, name, rate, seed, settings.epochs,
                          settings.batch_size, data.digest)
                  for rate in rates if seed < rate_seeds]
  return specs


def summary(values) -> dict[str, float | None] | None:
  """Mean, minimum and maximum over the seeds; None where one diverged."""
  if not values or any(v is None for v in values):
    return None
  return {"mean": float(np.mean(values)), "min": float(np.min(values)),
          "max": float(np.max(values))}


FINAL = ("train_loss", "train_batch_loss", "validation_loss", "test_loss",
         "test_error")


def collect(specs: list[RunSpec], runs: dict[RunSpec, dict]) -> dict:
  """The grid's results: per cell its seeds' records and their summary."""
  results: dict[str, Any] = {}
  for spec in specs:
    model = results.setdefault(spec.model, {
        "title": MODEL_TITLES[spec.model],
        "parameters": parameter_count(spec.model), "optimizers": {}})
    optimizer = model["optimizers"].setdefault(spec.optimizer, {"rates": {}})
    cell = optimizer["rates"].setdefault(f"{spec.learning_rate:g}", {
        "learning_rate": spec.learning_rate, "epochs": spec.epochs,
        "seeds_planned": 0, "runs": {}})
    cell["seeds_planned"] += 1
    if spec in runs:
      cell["runs"][str(spec.seed)] = runs[spec]
  for model in results.values():
    for optimizer in model["optimizers"].values():
      for cell in optimizer["rates"].values():
        records = list(cell["runs"].values())
        cell["complete"] = len(records) == cell["seeds_planned"]
        cell["final"] = {
            key: summary([r[key][-1] if len(r[key]) == cell["epochs"] else None
                          for r in records]) for key in FINAL}
        cell["diverged_seeds"] = sum(
            len(r["train_loss"]) < cell["epochs"] or r["train_loss"][-1] is None
            for r in records)
      for criterion, key in (("best_by_train_loss", "train_loss"),
                             ("best_by_validation_loss", "validation_loss")):
        optimizer[criterion] = best_rate(optimizer["rates"], key)
  return results


def best_rate(cells: dict[str, dict], key: str) -> str | None:
  """The rate with the lowest mean final value, among the complete cells.

  None until every rate's seeds have finished: a rate not yet run could be
  the best. A cell where a seed diverged ranks last.
  """
  if not cells or not all(cell["complete"] for cell in cells.values()):
    return None
  value = lambda rate: (math.inf if cells[rate]["final"][key] is None
                        else cells[rate]["final"][key]["mean"])
  return min(cells, key=value)


def experiment(data: Data, settings: Settings, cache: pathlib.Path,
               models: list[str], optimizers: list[str], train_missing: bool,
               report: Callable[[dict[RunSpec, dict]], None]) -> None:
  """Runs the grid's missing runs (if train_missing), reporting after each."""
  specs = plan(settings, data, models, optimizers)
  runs = {spec: record for spec in specs
          if (record := read_run(spec, cache)) is not None}
  report(runs)
  if not train_missing:
    return
  trainers: dict[str, Trainer] = {}
  for spec in specs:
    if spec in runs:
      continue
    # Read again: another process, given another part of the grid, may have
    # finished this run since this one started.
    if (record := read_run(spec, cache)) is None:
      if spec.model not in trainers:
        trainers[spec.model] = Trainer(spec.model)
      record = run_and_save(spec, trainers[spec.model], data, cache)
    runs[spec] = record
    report(runs)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def runs_of(results: dict):
  """Every finished run's record."""
  for model in results.values():
    for optimizer in model["optimizers"].values():
      for cell in optimizer["rates"].values():
        yield from cell["runs"].values()


def distinct(values: list) -> list:
  return [json.loads(v) for v in dict.fromkeys(
      json.dumps(value, sort_keys=True) for value in values)]


def spread(value: dict | None, scale: float = 1, digits: int = 4) -> str:
  if value is None:
    return "diverged"
  return (f"{scale * value['mean']:.{digits}f} [{scale * value['min']:.{digits}f},"
          f" {scale * value['max']:.{digits}f}]")


def markdown(output: dict) -> str:
  settings, results = output["settings"], output["results"]
  finished, planned = output["runs_finished"], output["runs_planned"]
  state = ("complete" if finished == planned else "the grid is incomplete;"
           " a blank cell has no finished seed yet")
  lines = [
      "Fashion-MNIST (Xiao, Rasul & Vollgraf, arXiv 1708.07747, August 2017;"
      " not a data set of the FTML paper, which it postdates):"
      f" {output['train_size']:,} training images, batch"
      f" {settings['batch_size']}, {settings['epochs']} epochs at a constant"
      " learning rate; the test file's 10,000 images split once into"
      f" {settings['validation_size']:,} validation images (to compare rates"
      f" by) and {output['test_size']:,} test images. Every rate of the grid"
      " is run; seeds (initial weights, batch order, dropout) are shared by"
      " the optimizers.",
      "",
      f"Runs finished: {finished} of {planned}"
      f" ({state})."
      f" Compute: {output['compute_seconds'] / 3600:.2f} hours of the runs'"
      " wall-clock time, on a machine shared with other work.",
      "",
      "Ran on: " + "; ".join(f"{m['cpu']}, {m['cpu_count']} cores"
                             for m in output["machines"]) + ".",
      "",
      "Versions: " + "; ".join(", ".join(f"{k} {v}" for k, v in versions.items())
                               for versions in output["versions"]) + ".",
      "",
      "After the last epoch, each a mean [minimum, maximum] over the finished"
      " seeds: **full-set training loss**, the loss on all training images"
      " with the final weights (dropout off); batch-mean loss, the mean of the"
      " last epoch's batch losses; validation loss; test error and test loss."
      " Seeds: finished of planned. s / epoch: median seconds of a training"
      " epoch (evaluation excluded). T: the optimizer's best rate by"
      " full-set training loss, V: by validation loss (mean over the seeds;"
      " shown once all its rates have finished).",
  ]
  for model, entry in results.items():
    lines += ["", f"### {model}: {entry['title']} {entry['parameters']:,}"
              " parameters", "",
              "| optimizer | learning rate | seeds | full-set training loss |"
              " batch-mean loss | validation loss | test error (%) | test loss"
              " | s / epoch |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, optimizer in entry["optimizers"].items():
      for rate, cell in optimizer["rates"].items():
        marks = [mark for mark, key in (("T", "best_by_train_loss"),
                                        ("V", "best_by_validation_loss"))
                 if optimizer[key] == rate]
        label = f"{rate} ({', '.join(marks)})" if marks else rate
        seeds = f"{len(cell['runs'])}/{cell['seeds_planned']}"
        if not cell["runs"]:
          lines.append(f"| {name} | {label} | {seeds} |  |  |  |  |  |  |")
          continue
        final = cell["final"]
        seconds = np.median([s for r in cell["runs"].values()
                             for s in r["epoch_seconds"]])
        lines.append(
            f"| {name} | {label} | {seeds} | {spread(final['train_loss'])} |"
            f" {spread(final['train_batch_loss'])} |"
            f" {spread(final['validation_loss'])} |"
            f" {spread(final['test_error'], 100, 2)} |"
            f" {spread(final['test_loss'])} | {seconds:.1f} |")
    lines += epoch_by_epoch(entry, settings["epochs"])
  return "\n".join(lines) + "\n"


def epoch_by_epoch(entry: dict, epochs: int) -> list[str]:
  """The table of how fast each optimizer trains, at its best rate.

  The mean full-set training loss after every epoch, each optimizer at its
  rate T; then, seeds being shared, in how many of them FTML's loss is below
  Adam's after that epoch.
  """
  best = {}  # optimizer: (rate T, {seed: training loss after every epoch})
  for name, optimizer in entry["optimizers"].items():
    if (rate := optimizer["best_by_train_loss"]) is not None:
      best[name] = rate, {
          seed: np.pad(curve(r["train_loss"]),
                       (0, epochs - len(r["train_loss"])),
                       constant_values=np.nan)
          for seed, r in optimizer["rates"][rate]["runs"].items()}
  if not best:
    return []
  shown = lambda value: "diverged" if np.isnan(value) else f"{value:.4f}"
  lines = ["", "Full-set training loss after each epoch, each optimizer at its"
           " rate T (mean over the seeds):", "",
           "| optimizer, rate | " + " | ".join(map(str, range(1, epochs + 1)))
           + " |", "| --- |" + " ---: |" * epochs]
  for name, (rate, curves) in best.items():
    means = np.mean(list(curves.values()), axis=0)
    lines.append(f"| {name} {rate} | " + " | ".join(map(shown, means)) + " |")
  if "ftml" in best and "adam" in best:
    ftml, adam = best["ftml"][1], best["adam"][1]
    shared = sorted(set(ftml) & set(adam))
    below = [sum(ftml[seed][epoch] < adam[seed][epoch] for seed in shared)
             for epoch in range(epochs)]
    lines.append("| ftml below adam (seeds) | "
                 + " | ".join(f"{n}/{len(shared)}" for n in below) + " |")
  return lines


def plain_log_labels(ax, axis: str = "y"):
  """0.2, 0.3 rather than 2 x 10^-1, and on enough minor ticks to read.

  Within a decade the ticks at 1, 1.2, 1.5, 2, 2.5, 3, 4, ..., 9 times a
  power of ten are labelled; within two decades, 1, 2, 3 and 5 times;
  beyond, the powers of ten only.
  """
  # pylint: disable=import-outside-toplevel
  from matplotlib import ticker
  which = ax.yaxis if axis == "y" else ax.xaxis
  low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
  if high < 10 * low:  # also 1.2, 1.5 and 2.5 times a power of ten
    which.set_minor_locator(ticker.LogLocator(
        subs=(1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)))
  leading = lambda value: round(value / 10**math.floor(math.log10(value)), 1)
  shown = ((1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9) if high < 10 * low else
           (1, 2, 3, 5) if high < 100 * low else (1,))
  for set_formatter in (which.set_major_formatter, which.set_minor_formatter):
    set_formatter(ticker.FuncFormatter(
        lambda value, _: f"{value:g}" if value > 0 and leading(value) in shown
        else ""))


def curve(values: list) -> np.ndarray:
  return np.asarray([np.nan if v is None else v for v in values], float)


def plot(output: dict, out: pathlib.Path) -> list[pathlib.Path]:
  """Per model, every seed's curves; the final losses against the rate."""
  # pylint: disable=import-outside-toplevel
  from matplotlib import colormaps
  from matplotlib import ticker
  from matplotlib.figure import Figure

  paths = []
  epochs = output["settings"]["epochs"]
  for model, entry in output["results"].items():
    names = list(entry["optimizers"])
    fig = Figure(figsize=(3.3 * len(names) + 0.6, 6.4))
    axes = fig.subplots(2, len(names), sharey="row", squeeze=False)
    for column, name in enumerate(names):
      cells = entry["optimizers"][name]["rates"]
      colours = colormaps["viridis"](np.linspace(0, 0.85, len(cells)))
      for colour, (rate, cell) in zip(colours, cells.items(), strict=True):
        for index, record in enumerate(cell["runs"].values()):
          for ax, key, scale in ((axes[0, column], "train_loss", 1),
                                 (axes[1, column], "test_error", 100)):
            values = curve(record[key])
            ax.plot(np.arange(1, len(values) + 1), scale * values,
                    color=colour, lw=1, marker=".", ms=3, alpha=0.85,
                    label=None if index else
                    f"lr {rate} ({len(cell['runs'])}/{cell['seeds_planned']})")
      axes[0, column].set_title(name)
      if not any(cell["runs"] for cell in cells.values()):
        axes[0, column].text(0.5, 0.5, "no run finished yet", ha="center",
                             transform=axes[0, column].transAxes)
      else:
        axes[0, column].legend(fontsize=7, title="rate (seeds)",
                               title_fontsize=7)
    axes[0, 0].set_ylabel("full-set training loss")
    axes[1, 0].set_ylabel("test error (%)")
    for ax in axes.flat:
      ax.set(xlim=(0.5, epochs + 0.5))
      ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
      ax.grid(alpha=0.3, which="both")
    for ax in axes[1]:
      ax.set_xlabel("epoch")
    if any(True for _ in runs_of({model: entry})):
      for ax in axes[:, 0]:
        ax.set_yscale("log")
        plain_log_labels(ax)
    fig.suptitle(f"Fashion-MNIST, {entry['title']}"
                 f" ({entry['parameters']:,} parameters). One line per seed.",
                 fontsize=9)
    fig.tight_layout()
    path = out / f"fashion_mnist_{model}.png"
    write_whole(path, lambda f, fig=fig: fig.savefig(f, dpi=90, format="png"))
    paths.append(path)

  models = list(output["results"])
  fig = Figure(figsize=(10, 3.6 * len(models)))
  axes = fig.subplots(len(models), 2, squeeze=False)
  for row, model in enumerate(models):
    any_point = False
    for name, optimizer in output["results"][model]["optimizers"].items():
      for ax, key in ((axes[row, 0], "train_loss"),
                      (axes[row, 1], "validation_loss")):
        rates, means = [], []
        colour = None
        for cell in optimizer["rates"].values():
          finals = [r[key][-1] for r in cell["runs"].values()
                    if len(r[key]) == epochs and r[key][-1] is not None]
          if not finals:
            continue
          any_point = True
          dots = ax.plot([cell["learning_rate"]] * len(finals), finals,
                         ls="", marker="o", ms=3, alpha=0.6, color=colour)
          colour = dots[0].get_color()
          rates.append(cell["learning_rate"])
          means.append(np.mean(finals))
        if rates:
          ax.plot(rates, means, color=colour, lw=2 if name in LEADS else 1,
                  label=name)
    for ax, label in ((axes[row, 0], "full-set training loss"),
                      (axes[row, 1], "validation loss")):
      ax.set(xlabel="learning rate", ylabel=f"{label} after {epochs} epochs",
             title=f"{model}: {label}")
      ax.grid(alpha=0.3, which="both")
      if any_point:
        ax.set(xscale="log", yscale="log")
        plain_log_labels(ax)
        ax.legend(fontsize=7)
      else:
        ax.text(0.5, 0.5, "no run finished yet", ha="center",
                transform=ax.transAxes)
  fig.suptitle("Final losses against the learning rate: dots, the seeds;"
               " lines, their means", fontsize=9)
  fig.tight_layout()
  path = out / "fashion_mnist_rates.png"
  write_whole(path, lambda f: fig.savefig(f, dpi=90, format="png"))
  paths.append(path)
  return paths


def write_report(settings: Settings, data: Data, models: list[str],
                 optimizers: list[str], runs: dict[RunSpec, dict],
                 out: pathlib.Path, quick: bool) -> dict:
  """fashion_mnist.md, .json and the plots, from the runs finished so far."""
  specs = plan(settings, data, models, optimizers)
  results = collect(specs, runs)
  records = list(runs_of(results))
  output = {
      "quick": quick, "settings": dataclasses.asdict(settings),
      "train_size": len(data.train[1]), "test_size": len(data.test[1]),
      "data_digest": data.digest,
      "rates": {name: RATES[name] for name in optimizers},
      "reduced_grid": {name: REDUCED[name] for name in optimizers},
      "runs_planned": len(specs), "runs_finished": len(records),
      "versions": distinct([r["versions"] for r in records]),
      "machines": distinct([r["machine"] for r in records]),
      "compute_seconds": sum(r["seconds"] for r in records),
      "results": results}
  write_whole(out / "fashion_mnist.md", markdown(output))
  write_whole(out / "fashion_mnist.json", json.dumps(output) + "\n")
  plot(output, out)
  return output


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", type=pathlib.Path, default=DEBIAN_DATA,
                      help="directory of the IDX files (gzipped or not)")
  parser.add_argument("--quick", action="store_true",
                      help="a few hundred images, few epochs (a smoke run)")
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="directory for the table, the numbers and the plots"
                      f" (default {RESULTS}, with --quick {QUICK_OUT})")
  parser.add_argument("--cache", type=pathlib.Path, default=None,
                      help="directory of the finished runs' records (default"
                      f" {RUNS}, with --quick {QUICK_OUT / 'runs'})")
  parser.add_argument("--report-only", action="store_true",
                      help="train nothing: the report of the finished runs")
  parser.add_argument("--models", nargs="+", choices=list(MODELS),
                      default=list(MODELS))
  parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS),
                      default=list(OPTIMIZERS))
  args = parser.parse_args(argv)
  settings = QUICK if args.quick else FULL
  out = args.out or (QUICK_OUT if args.quick else RESULTS)
  cache = args.cache or (QUICK_OUT / "runs" if args.quick else RUNS)
  try:
    data = load_data(args.data, settings)
  except (FileNotFoundError, IdxError) as error:
    parser.exit(2, f"{parser.prog}: error: {error}\n")
  report = lambda runs: write_report(settings, data, args.models,
                                     args.optimizers, runs, out, args.quick)
  experiment(data, settings, cache, args.models, args.optimizers,
             not args.report_only, report)
  print((out / "fashion_mnist.md").read_text())


if __name__ == "__main__":
  main()
