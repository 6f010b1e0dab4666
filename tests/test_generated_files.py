"""Files built from scratch by a grammar (tests/file_grammar.py): each read
in a forked child under warnings-as-errors, within time and resident-memory
bounds in its size, returning exactly what a well-formed file encodes and
refusing everything else with ``mxnet.FileError``."""

import json
import pathlib
import subprocess
import sys
import warnings

import file_grammar
import hypothesis
from hypothesis import strategies as st

SCRIPT = pathlib.Path(file_grammar.__file__)


def test_generated_files_read_or_raise_file_error_within_bounds():
  done = subprocess.run(
      [sys.executable, "-W", "error", str(SCRIPT), "--seed", "0",
       "--count", "700"], capture_output=True, text=True, timeout=600,
      check=False)
  lines = [json.loads(line) for line in done.stdout.splitlines()]
  assert lines, done.stderr
  results, summary = lines[:-1], lines[-1]
  escapes = [r for r in results if r["problems"]]
  assert done.returncode == 0 and not escapes, escapes[:5]
  assert summary["inputs"] == len(results) >= 200, summary
  outcomes = {(r["kind"], r["outcome"]) for r in results}
  for kind in ("well-formed", "well-formed params", "well-formed npz"):
    assert (kind, "read") in outcomes, summary
  for kind in ("stranger", "stray opcode", "npz deflated", "params magic"):
    assert (kind, "FileError") in outcomes, outcomes
  # Every input's growth was measured, so the bounds were checked.
  assert all(r["resident_growth"] is not None for r in results)


def read_back(reader, data):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    return file_grammar.READERS[reader](data)


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(st.randoms(use_true_random=False), st.sampled_from([2, 3, 4]))
def test_well_formed_pickles_read_as_the_values_they_encode(rng, protocol):
  value = file_grammar.ValueGrammar(rng, max_depth=6, sharing=0.0
                                    ).trainer_states()
  data = file_grammar.PickleWriter(rng, protocol).dumps(value)
  saved = read_back("states", data)
  model = file_grammar.expected(value)
  got = (saved.states if saved.optimizer is None
         else (saved.states, saved.optimizer))
  assert file_grammar.same(got, model)


def test_generation_is_seeded():
  """A run's seed and an input's index regenerate the input."""
  first = [file_grammar.generate(5, i)[2] for i in range(20)]
  assert first == [file_grammar.generate(5, i)[2] for i in range(20)]
  assert len(set(first)) > 15  # a few small hostile inputs coincide
