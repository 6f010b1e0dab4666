"""FTML next to other Optax optimizers on a small Flax NNX convolutional network.

Trains the same network, from the same initial weights and on the same
batches, once per optimizer on scikit-learn's bundled 8x8 handwritten digits
(nothing is downloaded), then prints a summary table and writes a plot of the
loss curves::

  pip install ".[demo]" && python -m optax_ftml.demo
  python -m optax_ftml.demo --optimizers ftml adam sgd rmsprop \\
      --lr ftml=0.0025 adam=0.001 --steps 3000 --output curves.png

Runs unchanged on CPU, GPU and TPU (whatever ``jax.default_backend()`` is).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from optax_ftml._demo import RunResult

# The optimizers the demo offers (optax_ftml._demo.OPTIMIZERS builds them),
# with the learning rate each gets unless --lr says otherwise: the optimizer's
# usual default, tuned where it had none.
LEARNING_RATES = {
    "ftml": 0.0025,
    "adam": 0.001,
    "adamw": 0.001,
    "nadam": 0.001,
    "adabelief": 0.001,
    "rmsprop": 0.001,
    "adagrad": 0.05,
    "lion": 0.0003,
    "sgd": 0.1,
    "momentum": 0.02,
}
# scikit-learn's 1797 digits less the 360 (20%) of the test split.
TRAINING_EXAMPLES = 1437
MAX_SEED = 2**32 - 1


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
  noun = "an integer" if kind is int else "a number"

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"expected {noun}, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
      raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value
  return parse


def _seed(text: str) -> int:
  # NumPy's and scikit-learn's seeds are 32-bit unsigned integers.
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected an integer, got {text!r}") from None
  if not 0 <= value <= MAX_SEED:
    raise argparse.ArgumentTypeError(
        f"must be in [0, {MAX_SEED}], got {text}")
  return value


def _learning_rate(text: str) -> tuple[str, float]:
  name, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(
        f"expected OPTIMIZER=RATE (e.g. ftml=0.0025), got {text!r}")
  if name not in LEARNING_RATES:
    raise argparse.ArgumentTypeError(
        f"unknown optimizer {name!r} in {text!r}; choose from"
        f" {', '.join(LEARNING_RATES)}")
  return name, _positive(float)(value)


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m optax_ftml.demo",
      description="Trains a small Flax NNX CNN on scikit-learn's digits with"
      " FTML and other Optax optimizers, from the same initial weights and"
      " batches; prints a summary table and writes a plot of the curves.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument(
      "--optimizers", nargs="+", default=["ftml", "adam"],
      choices=list(LEARNING_RATES), metavar="NAME",
      help=f"optimizers to compare, from: {', '.join(LEARNING_RATES)}")
  parser.add_argument(
      "--lr", nargs="+", default=[], type=_learning_rate, metavar="NAME=RATE",
      help="learning rates, e.g. ftml=0.0025 adam=0.001; defaults: "
      + ", ".join(f"{n}={lr:g}" for n, lr in LEARNING_RATES.items()))
  parser.add_argument("--steps", type=_positive(int), default=2000,
                      help="training steps per optimizer")
  parser.add_argument("--batch-size", type=_positive(int), default=64,
                      help="examples per step")
  parser.add_argument("--seed", type=_seed, default=0,
                      help="seed of the initial weights, batches and split")
  parser.add_argument("--output", default="ftml_demo.png",
                      help="where to write the PNG plot")
  parser.add_argument("--no-progress", action="store_true",
                      help="hide the progress bars")
  return parser


def parse_args(parser: argparse.ArgumentParser,
               argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses and checks the flags; exits with a usage message if they are bad."""
  args = parser.parse_args(argv)

  if len(set(args.optimizers)) != len(args.optimizers):
    parser.error("--optimizers: each optimizer may appear only once")
  unused = {name for name, _ in args.lr} - set(args.optimizers)
  if unused:
    parser.error(f"--lr given for {', '.join(sorted(unused))}, which is not"
                 " among --optimizers")
  args.lr = {**LEARNING_RATES, **dict(args.lr)}
  if args.batch_size > TRAINING_EXAMPLES:
    parser.error(f"--batch-size {args.batch_size} exceeds the"
                 f" {TRAINING_EXAMPLES} training examples")

  if not args.output.lower().endswith(".png"):
    parser.error(f"--output must name a .png file, got {args.output!r}")
  # Fail now rather than after training: try to open the file for writing.
  existed = os.path.exists(args.output)
  try:
    with open(args.output, "ab"):
      pass
  except OSError as error:
    parser.error(f"--output {args.output!r} cannot be written: {error.strerror}")
  if not existed:
    os.remove(args.output)
  return args


# The packages of the demo extra, as their modules are named.
DEMO_MODULES = ("flax", "sklearn", "matplotlib", "tqdm")


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
  parser = make_parser()
  args = parse_args(parser, argv)
  # Imported once the flags are known to be good: --help and a bad flag answer
  # at once, without the seconds JAX, Flax and scikit-learn take to import.
  try:
    from optax_ftml import _demo
  except ImportError as error:
    if error.name not in DEMO_MODULES:
      raise
    # What to install, not a traceback.
    parser.exit(1, f"{parser.prog}: {error}\n")
  return _demo.run(args)


def __getattr__(name: str):
  # The training code's names (load_digits, CNN, train_step, ...), as
  # optax_ftml.demo.<name> for the notebooks and tests that use them.
  if name.startswith("__"):
    raise AttributeError(name)
  from optax_ftml import _demo
  return getattr(_demo, name)


if __name__ == "__main__":
  main()
