"""The demo: a short run end to end, its outputs, and its flag checking."""

import subprocess
import sys

import numpy as np
import pytest

import optax_ftml
from optax_ftml import demo


def test_short_run_prints_table_and_writes_png(tmp_path, capsys):
  output = tmp_path / "curves.png"
  results = demo.main([
      "--optimizers", "ftml", "sgd", "--lr", "ftml=0.01",
      "--steps", "40", "--batch-size", "32", "--seed", "3",
      "--output", str(output), "--no-progress"])

  assert [r.name for r in results] == ["ftml", "sgd"]
  assert [r.learning_rate for r in results] == [0.01, demo.LEARNING_RATES["sgd"]]
  # Same initial weights and first batch for every optimizer.
  assert results[0].losses[0] == results[1].losses[0]
  for result in results:
    assert result.losses.shape == (40,)
    assert np.all(np.isfinite(result.losses))
    assert 0 <= result.test_accuracy <= 1
    assert result.steps_per_second > 0
  ftml = results[0]
  # 40 steps already take FTML far past chance (10%) on the digits.
  assert ftml.train_loss < 0.5 * ftml.losses[0]
  assert ftml.test_accuracy > 0.8

  out = capsys.readouterr().out
  lines = out.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
  assert all(column in lines[header] for column in (
      "final train loss", "test accuracy", "steps/s"))
  rows = lines[header + 2:header + 4]
  assert [row.split()[0] for row in rows] == ["ftml", "sgd"]
  assert f"{100 * ftml.test_accuracy:.2f}%" in rows[0]
  assert "JAX backend: cpu" in out
  with open(output, "rb") as png:
    assert png.read(8) == b"\x89PNG\r\n\x1a\n"


def test_batches_cover_each_epoch_once():
  indices = demo.batch_indices(num_examples=10, batch_size=3, steps=7, seed=0)
  assert indices.shape == (7, 3)
  # Three full batches per epoch; the leftover example is dropped.
  for epoch in (indices[0:3], indices[3:6]):
    assert len(np.unique(epoch)) == 9
  np.testing.assert_array_equal(
      indices, demo.batch_indices(num_examples=10, batch_size=3, steps=7,
                                  seed=0))


def test_digits_split_is_stratified_and_scaled():
  data = demo.load_digits()
  assert data.train_images.shape == (1437, 8, 8, 1)
  assert len(data.train_labels) == demo.TRAINING_EXAMPLES  # --batch-size's bound
  assert data.test_images.shape == (360, 8, 8, 1)
  assert data.train_images.dtype == np.float32
  assert 0 <= data.train_images.min() and data.train_images.max() <= 1
  assert set(np.unique(data.test_labels)) == set(range(10))


@pytest.mark.parametrize(("argv", "message"), [
    (["--optimizers", "ftml", "adamax"], "invalid choice: 'adamax'"),
    (["--optimizers", "ftml", "ftml"], "may appear only once"),
    (["--lr", "ftml=0"], "must be positive, got 0"),
    (["--lr", "ftml=-1e-3"], "must be positive"),
    (["--lr", "ftml=fast"], "expected a number, got 'fast'"),
    (["--lr", "0.01"], "expected OPTIMIZER=RATE"),
    (["--lr", "foo=0.01"], "unknown optimizer 'foo'"),
    (["--lr", "sgd=0.01"], "not among --optimizers"),
    (["--steps", "0"], "must be positive"),
    (["--steps", "1.5"], "expected an integer, got '1.5'"),
    (["--batch-size", "-4"], "must be positive"),
    (["--batch-size", "100000"], "exceeds the 1437 training examples"),
    (["--output", "plot.pdf"], "must name a .png file"),
    (["--output", "/nonexistent-dir/plot.png"],
     "cannot be written: No such file or directory"),
    (["--output", "/"], "must name a .png file"),
    (["--output", "/proc/plot.png"], "cannot be written"),
    (["--seed", "-1"], "must be in [0, 4294967295], got -1"),
    (["--seed", str(2**32)], "must be in [0, 4294967295], got 4294967296"),
    (["--seed", "1.5"], "expected an integer, got '1.5'"),
])
def test_bad_flags_exit_with_a_clear_message(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    demo.main([*argv, "--no-progress"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "usage: python -m optax_ftml.demo" in err
  assert message in err


def test_every_seed_that_numpy_and_scikit_learn_accept_is_accepted(tmp_path):
  parser = demo.make_parser()
  for seed in (0, 2**32 - 1):
    args = demo.parse_args(parser, ["--seed", str(seed), "--output",
                                    str(tmp_path / "curves.png")])
    assert args.seed == seed
    np.random.default_rng(args.seed)
    demo.load_digits(seed=args.seed)


def test_one_step_run_prints_no_nan(tmp_path, capsys):
  (result,) = demo.main(["--optimizers", "ftml", "--steps", "1",
                         "--output", str(tmp_path / "curves.png"),
                         "--no-progress"])
  assert np.isnan(result.steps_per_second)  # nothing was timed
  out = capsys.readouterr().out
  assert "nan" not in out.lower()
  row = next(line for line in out.splitlines() if line.startswith("ftml "))
  assert row.split()[-1] == "-"


def test_package_imports_without_the_demo_dependencies():
  # None in sys.modules makes any import of that package fail.
  blocked = ("flax", "sklearn", "matplotlib", "tqdm", "orbax")
  code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r}));"
          " import optax_ftml; optax_ftml.ftml();"
          " optax_ftml.mxnet.ftml(mxnet_version=2)\n"
          "try:\n  from optax_ftml.demo import load_digits\n"
          "except ImportError as error:\n  print(error)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, check=True)
  # Nothing is on a package index yet: the hint installs from a clone.
  assert 'pip install ".[demo]" in a clone' in result.stdout


def test_every_optimizer_has_a_default_learning_rate():
  from optax_ftml import _demo
  assert list(_demo.OPTIMIZERS) == list(demo.LEARNING_RATES)


# What `python -m optax_ftml.demo` must not import before it has parsed its
# flags: these take seconds.
HEAVY_MODULES = ("jax", "flax", "optax", "sklearn", "matplotlib", "numpy")


@pytest.mark.parametrize("argv", [["--help"], ["--steps", "0"]])
def test_help_and_bad_flags_answer_before_importing_jax(argv):
  code = ("import runpy, sys\n"
          f"sys.argv = ['demo', *{argv!r}]\n"
          "try:\n"
          "  runpy.run_module('optax_ftml.demo', run_name='__main__')\n"
          "except SystemExit as exit:\n"
          "  print('exit', exit.code)\n"
          f"print('imported', sorted(set({HEAVY_MODULES!r}) & set(sys.modules)))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, check=True)
  assert "usage: python -m optax_ftml.demo" in result.stdout + result.stderr
  assert f"exit {0 if argv == ['--help'] else 2}" in result.stdout
  assert "imported []" in result.stdout


def test_every_public_name_is_imported_on_first_use():
  # optax_ftml imports its modules lazily (for the demo's --help): each name
  # of __all__ must resolve, and the mxnet subpackage as an attribute.
  code = ("import sys, optax_ftml\n"
          "print('jax' in sys.modules)\n"
          "print([callable(getattr(optax_ftml, n)) for n in optax_ftml.__all__])\n"
          "print(all(hasattr(optax_ftml.mxnet, n) for n in optax_ftml.mxnet.__all__))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, check=True)
  assert result.stdout.split("\n")[:3] == [
      "False", "[True, True, True]", "True"]
  with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
    _ = optax_ftml.no_such_name  # pyright: ignore[reportAttributeAccessIssue]
