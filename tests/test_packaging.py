"""The package as released: one version everywhere, and the wheel's contents.

The continuous integration installs the built wheel and runs the tests from
outside the source tree (OPTAX_FTML_TESTING_WHEEL=1); there, the installed
distribution is checked too.
"""

import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import tomllib

import pytest

import optax_ftml

ROOT = pathlib.Path(__file__).parent.parent
TESTING_WHEEL = os.environ.get("OPTAX_FTML_TESTING_WHEEL") == "1"


def test_one_version_everywhere():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert "version" not in project and "version" in project["dynamic"]
  version = optax_ftml.__version__
  assert re.fullmatch(r"\d+\.\d+\.\d+", version)
  citation = (ROOT / "CITATION.cff").read_text()
  assert re.search(r"^version: (.+)$", citation, re.M)[1] == version
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert re.search(r"^## (\S+)", changelog, re.M)[1] == version


def test_every_dependency_declares_its_floor():
  # .ci/floors installs exactly these lowest versions and tests them.
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  for requirement in project["dependencies"]:
    assert re.fullmatch(r"[\w.-]+>=[\w.]+", requirement), requirement


def test_documented_floors_are_the_declared_ones():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  requirements = [*project["dependencies"],
                  *(r for extra in project["optional-dependencies"].values()
                    for r in extra)]
  declared = dict(re.fullmatch(r"([\w.-]+)(?:\[[\w,]+\])?>=([\w.]+)", r).groups()
                  for r in requirements if ">=" in r)
  page = (ROOT / "docs" / "getting_started.md").read_text()
  documented = dict(re.findall(r"^\| `([\w.-]+)`[^|]* \| ([\w.]+) \|", page,
                               re.M))
  assert documented.keys() >= {"optax", "numpy", "chex", "flax",
                               "orbax-checkpoint"}
  for name, floor in documented.items():
    assert declared[name] == floor, name
  assert project["requires-python"] == ">=3.11"
  assert "| Python | 3.11 |" in page


@pytest.mark.skipif(not TESTING_WHEEL, reason="runs on the installed wheel")
def test_tests_import_the_installed_wheel():
  module = pathlib.Path(optax_ftml.__file__).resolve()
  assert not module.is_relative_to(ROOT.resolve()), module
  distribution = importlib.metadata.distribution("optax_ftml")
  assert distribution.version == optax_ftml.__version__
  files = {file.as_posix() for file in distribution.files}
  for name in ("_ftml.py", "mxnet/_optimizer.py", "mxnet/example/model.params",
               "demo.py", "py.typed", "__init__.py"):
    assert f"optax_ftml/{name}" in files
  assert any(file.endswith("licenses/LICENSE") for file in files)
  assert distribution.metadata["License-Expression"] == "Apache-2.0"


# The test files that need the test-extras extra (Flax, Orbax, Sphinx,
# Jupyter, MXNet's recordings); .ci/floors runs every other one.
NEEDS_EXTRAS = {
    "test_benchmarks.py", "test_checkpoint.py", "test_demo.py",
    "test_flax.py", "test_multiprocess.py", "test_mxnet_recording.py",
    "test_notebooks.py",
}


def test_floors_run_every_core_test_file():
  floors = (ROOT / ".ci" / "floors").read_text()
  listed = re.search(r"^core_tests=\((.*?)^\)", floors, re.M | re.S)[1].split()
  present = {path.name for path in (ROOT / "tests").glob("test_*.py")}
  assert set(listed) <= present, set(listed) - present
  assert set(listed) == present - NEEDS_EXTRAS


def pip_install_arguments(text):
  """The arguments of every ``pip install`` command in ``text``."""
  for match in re.finditer(r"pip install ([^\n`]*)", text):
    for argument in match[1].split():
      yield argument.strip("\"'\\,;)")


def test_nothing_installs_optax_ftml_by_its_bare_name():
  # optax_ftml is not on a package index: `pip install optax_ftml` would
  # install whatever someone registered under that name. Every install names
  # a clone or a wheel.
  sources = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"),
             *(ROOT / "colabs").glob("*.ipynb"),
             *(ROOT / "optax_ftml").rglob("*.py"), *(ROOT / ".ci").iterdir(),
             *(ROOT / "benchmarks").glob("*.py"),
             ROOT / ".github" / "workflows" / "tests.yml"]
  assert len(sources) > 20
  bare = [(path.relative_to(ROOT).as_posix(), argument)
          for path in sources if path.is_file()
          for argument in pip_install_arguments(path.read_text())
          if re.fullmatch(r"optax_ftml(\[[\w,-]*\])?([=<>!~].*)?", argument)]
  assert not bare
  # The check itself: it finds the commands that it must refuse.
  assert list(pip_install_arguments('`pip install "optax_ftml[demo]"`')) == [
      "optax_ftml[demo]"]


def test_the_workflow_runs_every_environment_of_ci_run():
  # .ci/run runs the environments one after another; the workflow, one job
  # each, on the same Python.
  ci = (ROOT / ".ci" / "run").read_text()
  scripts = re.findall(r"^bash (\.ci/\w+)$", ci, re.M)
  assert scripts == [".ci/test", ".ci/floors", ".ci/newest"]
  workflow = (ROOT / ".github" / "workflows" / "tests.yml").read_text()
  jobs = re.findall(r'python: "([\d.]+)"\n\s+script: (\S+)', workflow)
  newest = re.search(r"^NEWEST_PYTHON=([\d.]+)$",
                     (ROOT / ".ci" / "newest").read_text(), re.M)[1]
  assert jobs == [("3.11", ".ci/test"), ("3.11", ".ci/floors"),
                  (newest, ".ci/newest")]
  assert "run: bash ${{ matrix.script }}" in workflow


def python_for(version, tmp_path, path):
  """What .ci/python's python_for prints for ``version``, with only ``path``
  (and a fake pyenv in ``tmp_path``) to search."""
  return subprocess.run(
      ["bash", "-c", f'source "{ROOT}/.ci/python" && python_for {version}'],
      capture_output=True, text=True, check=False,
      env={"PATH": path, "HOME": str(tmp_path / "home"),
           "PYENV_ROOT": str(tmp_path / "pyenv")})


def test_ci_finds_pyenv_pythons_and_says_what_to_install(tmp_path):
  # pyenv's builds of a version, newest first; none on PATH, no apt-get.
  bash = pathlib.Path(shutil.which("bash") or "/bin/bash")
  tools = tmp_path / "bin"
  tools.mkdir()
  for tool in ("bash", "ls", "sort", "id", "grep", "head"):
    found = shutil.which(tool)
    assert found, tool
    (tools / tool).symlink_to(found)
  for patch in ("3.99.1", "3.99.10", "3.98.0"):
    python = tmp_path / "pyenv" / "versions" / patch / "bin" / "python3.99"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!{bash}\nexit 0\n")
    python.chmod(0o755)
  found = python_for("3.99", tmp_path, str(tools))
  assert found.returncode == 0, found.stderr
  assert found.stdout.strip() == str(
      tmp_path / "pyenv" / "versions" / "3.99.10" / "bin" / "python3.99")
  missing = python_for("3.97", tmp_path, str(tools))
  assert missing.returncode == 1
  assert "No Python 3.97 here" in missing.stderr
  assert "pyenv install 3.97" in missing.stderr
