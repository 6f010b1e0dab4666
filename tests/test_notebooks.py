"""Runs every notebook in colabs/ top to bottom, with few training steps."""

import pathlib
import re

import nbclient
import nbformat
import pytest

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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_colab_installs_the_package_by_name(path):
  # On Colab: the released package by its name, or a wheel built from a clone
  # and uploaded; never an address that nothing publishes.
  notebook = nbformat.read(path, as_version=4)
  install = next(cell.source for cell in notebook.cells
                 if "%pip install" in cell.source)
  assert '"google.colab" in sys.modules' in install
  assert '"optax_ftml[demo]"' in install
  assert 'glob.glob("/content/optax_ftml-*.whl")' in install
  assert "python -m build" in install
  assert not re.search(r"git\+|https?://", install)


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
