"""Runs every notebook in colabs/ top to bottom, with few training steps."""

import glob
import importlib.util
import os
import pathlib
import re
import sys
import types

import nbclient
import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

COLABS = pathlib.Path(__file__).parent.parent / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))


def test_all_notebooks_are_found():
  assert {path.name for path in NOTEBOOKS} >= {
      "quickstart.ipynb", "migrating_from_mxnet.ipynb", "scale_out.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, path.name
      # Self-contained: everything a notebook uses comes from installed packages.
      for name in ("from tests", "import tests", "mxnet_reference"):
        assert name not in cell.source, (path.name, name)


def install_cell(path):
  notebook = nbformat.read(path, as_version=4)
  return next(cell.source for cell in notebook.cells
              if "%pip install" in cell.source)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_colab_install_says_how_to_install_before_a_release(path):
  # On Colab: an uploaded wheel or clone; never a bare name that anyone could
  # register on PyPI, never an address that nothing publishes.
  install = install_cell(path)
  assert '"google.colab" in sys.modules' in install
  assert 'glob.glob("/content/optax_ftml-*.whl")' in install
  assert "pip install build && python -m build" in install
  assert not re.search(r"git\+|https?://", install)
  assert not re.search(r"""["']optax_ftml\[""", install)


class FakeIPython:
  """Records the install cell's %pip lines instead of running pip."""

  def __init__(self):
    self.pip_lines = []

  def run_line_magic(self, name, line):
    assert name == "pip"
    self.pip_lines.append(line)


@pytest.mark.parametrize("before, copy, pip_installs, requirement", [
    ("installed", "wheel", None, None),
    ("missing", "wheel", True, "/content/optax_ftml-0.1.0-py3-none-any.whl[demo]"),
    ("missing", "clone", True, "/content/optax_ftml[demo]"),
    ("missing", "clone", False, "/content/optax_ftml[demo]"),
    ("missing", None, None, None),
])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_colab_install_installs_only_the_copy_given_or_stops(
    path, before, copy, pip_installs, requirement, monkeypatch):
  # The cell as IPython runs it, on Colab, with optax_ftml found or not, and a
  # wheel, a clone or nothing in /content.
  code = TransformerManager().transform_cell(install_cell(path))
  ipython = FakeIPython()
  monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("colab"))
  monkeypatch.setenv("XLA_FLAGS", "")  # scale_out.ipynb's cell appends to it
  find_spec = importlib.util.find_spec

  def colab_find_spec(name, *args):
    found = before == "installed" or (pip_installs and ipython.pip_lines)
    if name == "optax_ftml" and not found:
      return None
    return find_spec(name, *args)

  wheel = "/content/optax_ftml-0.1.0-py3-none-any.whl"
  monkeypatch.setattr(importlib.util, "find_spec", colab_find_spec)
  monkeypatch.setattr(glob, "glob", lambda pattern: (
      [wheel] if copy == "wheel" and pattern == "/content/optax_ftml-*.whl"
      else []))
  exists = os.path.exists
  monkeypatch.setattr(os.path, "exists", lambda name: (
      copy == "clone" if name.startswith("/content/") else exists(name)))
  namespace = {"get_ipython": lambda: ipython}
  if before == "missing" and not pip_installs:
    with pytest.raises(RuntimeError,
                       match=r"pip install build && python -m build"):
      exec(code, namespace)
  else:
    exec(code, namespace)
  if before == "installed" or copy is None:
    assert ipython.pip_lines == []
  else:
    assert ipython.pip_lines == ['install --quiet "{requirement}"']
    assert namespace["requirement"] == requirement


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_runs_top_to_bottom(path, tmp_path, monkeypatch):
  monkeypatch.setenv("OPTAX_FTML_NOTEBOOK_STEPS", "30")
  # scale_out.ipynb sets up its own simulated devices, as on a fresh machine.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on the first failing cell

  outputs = [output for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.outputs]
  assert not [output for output in outputs if output.output_type == "error"]
  # Python warnings print as "<file>:<line>: SomeWarning: ..." on stderr; the
  # rest of the suite treats them as errors, and so do these tests.
  stderr = "".join(output.text for output in outputs
                   if output.output_type == "stream" and output.name == "stderr")
  assert not re.search(r"\w+Warning: ", stderr), stderr
