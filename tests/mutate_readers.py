"""Mutation testing of the MXNet file readers: does every check have a test?

Each mutant changes one thing in one reader module, in the ways a reader's
checks go wrong:

* ``check``: an ``if`` whose body raises never fires (the check removed);
* ``bound``: an integer literal moved by one, up or down (limits, offsets,
  sizes, the entries of lookup tables);
* ``edge``: a comparison's boundary moved (``<`` and ``<=``, ``>`` and
  ``>=`` exchanged);
* ``table``: two neighbouring values of a dict literal swapped (a dtype
  table's flags, a dispatch table's handlers).

Each mutant runs the reader tests (``--tests``, default below, in tiers:
the next runs only if the last passed) in a forked child that imports the
mutated module in place of the file and calls each test function (each
parametrisation; warnings are errors, as in the suite) until one fails or a
time limit passes, which kills the mutant. Tests that start their own
Python process would not see the mutant: they are left out. Run from the
repository root, under ``nice``:

  PYTHONPATH=$PWD nice -n 19 python tests/mutate_readers.py --out mutants.jsonl

It prints one JSON line per mutant (module, line, kind, change, outcome) and
a summary with the kill rate and the survivors. The project does not use
mutmut or cosmic-ray for this: mutmut mutates only inside functions (not
module-level bounds such as ``_MAX_DEPTH`` or the dtype table) and neither
removes a check, which is the mutation that matters most here.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import importlib.abc
import importlib.util
import inspect
import json
import os
import pathlib
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

# Imported once, before the forks (optax_ftml.mxnet imports JAX and Optax).
import jax  # noqa: F401
import ml_dtypes  # noqa: F401
import numpy as np  # noqa: F401
import optax  # noqa: F401
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = ["optax_ftml/mxnet/_pickle.py", "optax_ftml/mxnet/_files.py",
           "optax_ftml/mxnet/_records.py"]
# In tiers: the next tier runs only on the mutants the last one let live.
TESTS = ["tests/test_reader_checks.py",
         "tests/test_mxnet_files.py,tests/test_hostile_files.py"]
# Left out: tests that read the module from disk in a subprocess of their
# own, and the truncation sweeps (a read per byte of a fixture: minutes under
# load per mutant, and no check of their own).
LEFT_OUT = [
    "tests/test_mxnet_files.py::test_truncated_trainer_state_files_are_refused",
    "tests/test_mxnet_files.py::test_truncated_or_extended_parameter_files_are_refused",
    "tests/test_hostile_files.py::test_named_hostile_files_are_refused_quickly_and_change_nothing",
    "tests/test_hostile_files.py::test_fuzzed_fixtures_read_or_raise_mxnet_file_error"]
_EDGES = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}


def _raises(body: list[ast.stmt]) -> bool:
  return any(isinstance(statement, ast.Raise) for statement in body)


def _docstring_nodes(tree: ast.Module) -> set[int]:
  nodes = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and (
        node.body and isinstance(node.body[0], ast.Expr)):
      nodes.add(id(node.body[0].value))
  return nodes


def _in_fstring(tree: ast.Module) -> set[int]:
  return {id(child) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
          for child in ast.walk(node)}


def _opcode_indices(tree: ast.Module) -> set[int]:
  """The 0 in each ``pickle.OPCODE[0]``: a one-byte constant, whose index -1
  is its index 0 (an equivalent mutant, not made)."""
  return {id(node.slice) for node in ast.walk(tree)
          if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
          and isinstance(node.value.value, ast.Name)
          and node.value.value.id == "pickle"}


def sites(tree: ast.Module) -> Iterator[tuple[str, int, str, Any]]:
  """(kind, line, description, how to apply it to a copy of the node)."""
  skip = _docstring_nodes(tree) | _in_fstring(tree)
  opcode_indices = _opcode_indices(tree)
  for node in ast.walk(tree):
    if id(node) in skip:
      continue
    if isinstance(node, ast.If) and _raises(node.body):
      yield ("check", node.lineno, f"if {ast.unparse(node.test)[:70]}: raise",
             (node, "test", ast.Constant(False)))
    elif (isinstance(node, ast.Constant) and type(node.value) is int):
      for delta in (1, -1):
        if delta == -1 and id(node) in opcode_indices:
          continue
        yield ("bound", node.lineno, f"{node.value} -> {node.value + delta}",
               (node, "value", node.value + delta))
    elif isinstance(node, ast.Compare):
      for i, op in enumerate(node.ops):
        if type(op) in _EDGES:
          new_ops = list(node.ops)
          new_ops[i] = _EDGES[type(op)]()
          yield ("edge", node.lineno,
                 f"{ast.unparse(node)[:60]}: {type(op).__name__} ->"
                 f" {type(new_ops[i]).__name__}", (node, "ops", new_ops))
    elif isinstance(node, ast.Dict) and len(node.values) > 1:
      for i in range(len(node.values) - 1):
        values = list(node.values)
        values[i], values[i + 1] = values[i + 1], values[i]
        key = ast.unparse(node.keys[i]) if node.keys[i] else "**"
        yield ("table", node.lineno, f"values of {key[:40]} and the next swapped",
               (node, "values", values))


def mutants(path: pathlib.Path) -> Iterator[tuple[str, int, str, Any]]:
  """Each mutant of the module at ``path``: (kind, line, change, code)."""
  source = path.read_text()
  tree = ast.parse(source)
  for number, (kind, line, change, (node, field, value)) in enumerate(sites(tree)):
    original = getattr(node, field)
    setattr(node, field, value)
    try:
      code = compile(ast.fix_missing_locations(copy.deepcopy(tree)), str(path),
                     "exec")
    except (SyntaxError, ValueError):
      code = None
    finally:
      setattr(node, field, original)
    yield kind, line, f"#{number} {change}", code


class _Mutant(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Imports ``name`` from ``code`` instead of its file."""

  def __init__(self, name: str, path: pathlib.Path, code: Any):
    self.name, self.path, self.code = name, path, code

  def find_spec(self, fullname, path=None, target=None):
    if fullname != self.name:
      return None
    return importlib.util.spec_from_file_location(fullname, self.path,
                                                  loader=self)

  def create_module(self, spec):
    return None

  def exec_module(self, module):
    exec(self.code, module.__dict__)


def run_tests(module: str, path: pathlib.Path, code: Any, tiers: list[str],
              seconds: int) -> str:
  """"killed", "survived" or "timeout" (killed)."""
  for tier in tiers:
    outcome = run_tier(module, path, code, tier.split(","), seconds)
    if outcome != "survived":
      return outcome
  return "survived"


def _calls(test: Any) -> Iterator[dict[str, Any]]:
  """The keyword arguments of each case of a test: its parametrisations
  (``pytest.mark.parametrize``) and a fresh ``tmp_path`` (``monkeypatch``,
  undone after the case, is given by the caller)."""
  cases: list[dict[str, Any]] = [{}]
  for mark in getattr(test, "pytestmark", []):
    if mark.name != "parametrize":
      continue
    names = mark.args[0]
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else names
    values = [tuple(v.values) if type(v).__name__ == "ParameterSet"
              else (v,) if len(names) == 1 else tuple(v) for v in mark.args[1]]
    cases = [{**case, **dict(zip(names, v, strict=True))}
             for case in cases for v in values]
  for case in cases:
    if "tmp_path" in inspect.signature(test).parameters:
      case = {**case, "tmp_path": pathlib.Path(tempfile.mkdtemp())}
    yield case


def run_tier(module: str, path: pathlib.Path, code: Any, tests: list[str],
             seconds: int) -> str:
  """One tier of tests on the mutant, in a forked child: each test function
  called directly (no pytest start-up: the machine may be shared), stopping
  at the first failure."""
  pid = os.fork()
  if pid == 0:
    status = 2
    try:
      os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
      os.dup2(1, 2)
      signal.alarm(seconds)
      warnings.simplefilter("error")
      sys.meta_path.insert(0, _Mutant(module, path, code))
      for test_file in tests:
        test_module = importlib.import_module(pathlib.Path(test_file).stem)
        for name, test in list(vars(test_module).items()):
          if (name.startswith("test_") and callable(test)
              and f"{test_file}::{name}" not in LEFT_OUT):
            for arguments in _calls(test):
              with pytest.MonkeyPatch.context() as monkeypatch:
                if "monkeypatch" in inspect.signature(test).parameters:
                  arguments["monkeypatch"] = monkeypatch
                test(**arguments)
      status = 0
    except BaseException:  # a failing test: the mutant is killed
      status = 1
    finally:
      os._exit(status)
  _, status = os.waitpid(pid, 0)
  if os.WIFSIGNALED(status):
    return "timeout" if os.WTERMSIG(status) == signal.SIGALRM else "killed"
  return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--modules", nargs="*", default=MODULES)
  parser.add_argument("--tests", nargs="*", default=TESTS,
                      help="tiers of tests, each a comma-separated list")
  parser.add_argument("--seconds", type=int, default=120,
                      help="per-mutant time limit")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  parser.add_argument("--again", type=pathlib.Path, default=None,
                      help="run only the survivors of this earlier --out")
  args = parser.parse_args()
  again = None
  if args.again:
    again = {(r["module"], r["line"], r["change"].split(" ", 1)[1]) for r in map(
        json.loads, args.again.read_text().splitlines())
             if r.get("outcome") == "survived"}
  os.chdir(ROOT)
  sys.path.insert(0, str(ROOT / "tests"))
  # The unmutated reader must pass, or every mutant would look killed.
  tally = {"killed": 0, "survived": 0, "timeout": 0, "invalid": 0}
  survivors = []
  out = args.out.open("w") if args.out else sys.stdout
  for relative in args.modules:
    path = ROOT / relative
    if not path.exists():
      continue
    module = relative.removesuffix(".py").replace("/", ".")
    baseline = run_tests(module, path, compile(path.read_text(), str(path),
                                               "exec"), args.tests, args.seconds)
    if baseline != "survived":
      sys.exit(f"{relative}: the tests fail without any mutation.")
    for kind, line, change, code in mutants(path):
      if again is not None and (
          relative, line, change.split(" ", 1)[1]) not in again:
        continue
      start = time.monotonic()
      outcome = ("invalid" if code is None else
                 run_tests(module, path, code, args.tests, args.seconds))
      tally[outcome] += 1
      record = {"module": relative, "line": line, "kind": kind,
                "change": change, "outcome": outcome,
                "seconds": round(time.monotonic() - start, 1)}
      if outcome == "survived":
        survivors.append(record)
      out.write(json.dumps(record) + "\n")
      out.flush()
  valid = tally["killed"] + tally["survived"] + tally["timeout"]
  summary = {"mutants": valid, **tally,
             "kill_rate": round((valid - tally["survived"]) / max(valid, 1), 4),
             "survivors": [f"{s['module']}:{s['line']} {s['kind']} {s['change']}"
                           for s in survivors]}
  out.write(json.dumps(summary) + "\n")
  print(json.dumps(summary, indent=1), file=sys.stderr)


if __name__ == "__main__":
  main()
