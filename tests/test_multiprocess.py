"""FTML on JAX's multi-process runtime: local processes joined into one mesh.

Every scenario runs tests/multiprocess_training.py with optax_ftml.launch (2
processes x 2 CPU devices, 1 x 4, 4 x 1, 1 x 2) and compares what process 0
wrote; the scaling guide's program and the scale-out notebook's code run on
2 x 2 and check themselves. Cross-process collectives may sum in another order
than one process's, so training is compared to float32 rounding; FTML's update
alone has no reduction and is compared bitwise, and so is a resumed run with
the run it continues (same processes, same reductions).
"""

import dataclasses
import io
import os
import pathlib
import re
import sys
import time

import nbformat
import numpy as np
import pytest
from IPython.core.inputtransformer2 import TransformerManager

import optax_ftml
from optax_ftml import launch

pytestmark = pytest.mark.extras  # Orbax, nbformat, IPython

WORKER = pathlib.Path(__file__).parent / "multiprocess_training.py"
SAVE_AT = 6
TIMEOUT = 120  # per launch; the whole test takes well under a minute idle
# Float32 rounding of a different summation order, grown over 12 steps.
RTOL, ATOL = 1e-5, 1e-7


@dataclasses.dataclass(frozen=True)
class Scenario:
  processes: int
  cpu_devices: int
  resume: str | None = None  # the scenario whose checkpoint it continues
  mxnet: bool = False  # resumes MXNet's Gluon checkpoint instead of training


SCENARIOS = {
    "2x2": Scenario(2, 2),
    "1x4": Scenario(1, 4),
    "2x2 resumed": Scenario(2, 2, resume="2x2"),
    "4x1 resumed": Scenario(4, 1, resume="2x2"),
    "1x2 resumed": Scenario(1, 2, resume="2x2"),
}
MXNET_SCENARIOS = {
    "MXNet 2x2": Scenario(2, 2, mxnet=True),
    "MXNet 1x1": Scenario(1, 1, mxnet=True),
}
MXNET_GLUON = pathlib.Path(__file__).parent / "mxnet_fixtures" / "gluon"


def run_scenarios(tmp_path, monkeypatch, scenarios):
  # The worker imports this optax_ftml, installed or in the source tree.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(pathlib.Path(optax_ftml.__file__).parent.parent),
       os.environ.get("PYTHONPATH", "")]))
  results = {}
  for name, scenario in scenarios.items():
    out = tmp_path / name.replace(" ", "_")
    out.mkdir()
    arguments = ["--out", str(out), "--checkpoints", str(out / "checkpoint"),
                 "--save-at", str(SAVE_AT)]
    if scenario.resume:
      arguments += ["--resume", str(results[scenario.resume]["checkpoint"])]
    if scenario.mxnet:
      arguments += ["--mxnet", str(MXNET_GLUON)]
    log = io.StringIO()
    status = launch.run([sys.executable, str(WORKER), *arguments],
                        processes=scenario.processes,
                        cpu_devices=scenario.cpu_devices, timeout=TIMEOUT,
                        output=log)
    assert status == 0, (name, log.getvalue()[-5000:])
    results[name] = {path.stem: dict(np.load(path))
                     for path in out.glob("*.npz")}
    results[name]["checkpoint"] = out / "checkpoint"
  return results


def max_differences(actual, expected):
  assert sorted(actual) == sorted(expected)
  return {key: float(np.max(np.abs(actual[key].astype(np.float64)
                                   - expected[key]), initial=0))
          for key in expected}


def assert_equal(actual, expected):
  for key in expected:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def assert_close(actual, expected):
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=RTOL,
                               atol=ATOL, err_msg=key)


def test_processes_train_save_and_resume_like_one_process(tmp_path,
                                                          monkeypatch):
  start = time.monotonic()
  runs = run_scenarios(tmp_path, monkeypatch, SCENARIOS)
  print(f"{len(SCENARIOS)} launches in {time.monotonic() - start:.0f} s")
  two, one = runs["2x2"], runs["1x4"]
  for quantity in ("losses", "final", "saved"):
    differences = max_differences(two[quantity], one[quantity])
    print(quantity, "2x2 vs 1x4: max difference", max(differences.values()))
    assert_close(two[quantity], one[quantity])
  # The optimizer alone: no reduction, the same bits on any layout.
  assert_equal(two["update_alone"], one["update_alone"])

  # Fresh processes restore every process's save exactly, onto the same or
  # another process count and mesh shape, each leaf with the target's sharding
  # (the worker checks); on the same layout, the continued run is the
  # uninterrupted one to the bit.
  for name in ("2x2 resumed", "4x1 resumed", "1x2 resumed"):
    assert_equal(runs[name]["restored"], two["saved"])
  resumed = runs["2x2 resumed"]
  assert_equal(resumed["final"], two["final"])
  for key, losses in two["losses"].items():
    np.testing.assert_array_equal(resumed["losses"][key], losses[SAVE_AT:])
  # Continued on other layouts: the same run to float32 rounding.
  for name in ("4x1 resumed", "1x2 resumed"):
    assert_close(runs[name]["final"], two["final"])
    for key, losses in two["losses"].items():
      np.testing.assert_allclose(runs[name]["losses"][key], losses[SAVE_AT:],
                                 rtol=RTOL)


def test_launch_stops_every_process_when_one_fails(tmp_path):
  script = tmp_path / "fails.py"
  script.write_text(
      "import os, sys, time\n"
      "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
      "time.sleep(600)\n")
  start = time.monotonic()
  status = launch.run([sys.executable, str(script)], processes=2, timeout=60,
                      output=io.StringIO())
  assert status == 3
  assert time.monotonic() - start < 30


def test_launch_timeout_stops_the_processes_and_their_children(tmp_path):
  pid_file = tmp_path / "child.pid"
  script = tmp_path / "hangs.py"
  script.write_text(
      "import subprocess, sys, time\n"
      "child = subprocess.Popen([sys.executable, '-c',"
      " 'import time; time.sleep(600)'])\n"
      f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
      "time.sleep(600)\n")
  status = launch.run([sys.executable, str(script)], processes=1, timeout=5,
                      output=io.StringIO())
  assert status == launch.TIMED_OUT
  # Killed with its group: gone, or a zombie waiting for init to reap it.
  stat = pathlib.Path(f"/proc/{int(pid_file.read_text())}/stat")
  deadline = time.monotonic() + 10
  while stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z":
    assert time.monotonic() < deadline, "the child still runs"
    time.sleep(0.1)


@pytest.mark.parametrize("argument", ["processes", "cpu_devices"])
def test_launch_rejects_fewer_than_one(argument):
  with pytest.raises(ValueError, match=argument):
    launch.run([sys.executable, "-c", "pass"], **{"processes": 1, argument: 0})


def test_mxnet_checkpoint_resumes_into_a_multi_process_sharded_run(
    tmp_path, monkeypatch):
  """Every process reads MXNet's files and resumes FTML sharded over 2
  processes x 2 devices: the continued run is the single-process resume to
  the bit (FTML's chain has no reduction) and MXNet's run to float32 rounding."""
  start = time.monotonic()
  runs = run_scenarios(tmp_path, monkeypatch, MXNET_SCENARIOS)
  print(f"{len(MXNET_SCENARIOS)} launches in {time.monotonic() - start:.0f} s")
  sharded, single = runs["MXNet 2x2"]["mxnet_resumed"], runs["MXNet 1x1"][
      "mxnet_resumed"]
  assert_equal(sharded, single)
  print("MXNet resume, 2x2 vs 1x1: max difference",
        max(max_differences(sharded, single).values()))
  record = np.load(MXNET_GLUON / "continued.npz")
  last = max(int(key.split("/")[0]) for key in record.files)
  weights = {key.removeprefix("params['").removesuffix("']"): value
             for key, value in sharded.items() if key.startswith("params")}
  assert weights
  worst = 0.0
  for name, value in weights.items():
    expected = record[f"{last}/weight/{name}"]
    difference = np.max(np.abs(value - expected)) / np.max(np.abs(expected))
    assert difference <= 8 * np.finfo(np.float32).eps, (name, difference)
    worst = max(worst, difference)
  print(f"MXNet resume vs MXNet: worst difference {worst:.2g} of the largest"
        " weight")


GUIDE = pathlib.Path(__file__).parent.parent / "docs" / "guides" / "scaling_out.md"


def test_the_scaling_guides_program_runs_on_two_processes(tmp_path,
                                                          monkeypatch):
  """The guide's train.py, as the guide starts it: 2 processes x 2 devices."""
  (program,) = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(),
                          re.S | re.M)
  script = tmp_path / "train.py"
  script.write_text(program)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(pathlib.Path(optax_ftml.__file__).parent.parent),
       os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / "checkpoint"))
  log = io.StringIO()
  status = launch.run([sys.executable, str(script)], processes=2,
                      cpu_devices=2, timeout=TIMEOUT, output=log)
  assert status == 0, log.getvalue()[-5000:]
  for index in range(2):
    assert re.search(rf"^\[{index}\] process {index} of 2: loss \d", log.getvalue(),
                     re.M), log.getvalue()[-2000:]


NOTEBOOK = pathlib.Path(__file__).parent.parent / "colabs" / "scale_out.ipynb"


def test_the_scale_out_notebook_runs_on_two_processes(tmp_path, monkeypatch):
  """The notebook's code cells as one program on 2 processes x 2 devices.

  Its data-parallel and sharded runs span both processes, each process feeding
  its own examples, and its own checks hold in every process: the first loss
  equals the single-device run's to float32 rounding, and FTML's update alone,
  sharded, is the single-device update to the bit.
  """
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # As IPython runs each cell: magics (the install cell's %pip) become Python.
  to_python = TransformerManager().transform_cell
  script = tmp_path / "scale_out.py"
  script.write_text("\n".join(to_python(cell.source) for cell in notebook.cells
                              if cell.cell_type == "code"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(pathlib.Path(optax_ftml.__file__).parent.parent),
       os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("OPTAX_FTML_NOTEBOOK_STEPS", "30")
  start = time.monotonic()
  log = io.StringIO()
  status = launch.run([sys.executable, str(script)], processes=2,
                      cpu_devices=2, timeout=TIMEOUT, output=log)
  output = log.getvalue()
  print(f"2 processes in {time.monotonic() - start:.0f} s")
  assert status == 0, output[-5000:]
  for index in range(2):
    lines = "\n".join(re.findall(rf"^\[{index}\] (.*)$", output, re.M))
    assert re.search(rf"process {index} of 2, 4 devices", lines), lines
    first_losses = re.findall(r"vs single device: first loss within (\S+),", lines)
    assert len(first_losses) == 2, lines  # data parallel, sharded parameters
    assert "update alone, sharded vs one device: 0 of" in lines, lines
    print(f"process {index}: first losses within {first_losses} of one device's")
  # Python warnings print as "<file>:<line>: SomeWarning: ..."; the notebook
  # test treats them as errors, and so does this one.
  assert not re.search(r"\w+Warning: ", output), output[-5000:]
