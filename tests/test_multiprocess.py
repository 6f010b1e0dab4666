"""FTML on JAX's multi-process runtime, started by the cluster engines.

Every scenario runs tests/multiprocess_training.py under Open MPI's ``mpirun``
and under SLURM's ``srun`` (2 processes x 2 CPU devices, 1 x 4, 4 x 1,
1 x 2), where ``jax.distributed.initialize()`` finds the processes itself,
and compares what process 0 wrote. The scaling guide's program and the
scale-out notebook run with the commands their text gives, under both
engines, and the guide's program in JAX's shell loop too. Cross-process
collectives may sum in another order than one process's, so training is
compared to float32 rounding; FTML's update alone has no reduction and is
compared bitwise, and so is a resumed run with the run it continues (same
processes, same reductions). SIGTERM or SIGINT to tests/engines.py, which
starts the processes here, leaves none of them behind.

In CI (``CI=true``) a missing engine fails these tests; elsewhere they are
skipped with the reason (tests/engines.py). ``.ci/engines start`` starts
SLURM on this machine.
"""

import dataclasses
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import engines
import numpy as np
import pytest

import optax_ftml

pytestmark = pytest.mark.extras  # Orbax, nbconvert

ROOT = pathlib.Path(__file__).parent.parent
WORKER = pathlib.Path(__file__).parent / "multiprocess_training.py"
GUIDE = ROOT / "docs" / "guides" / "scaling_out.md"
NOTEBOOK = ROOT / "colabs" / "scale_out.ipynb"
MXNET_GLUON = pathlib.Path(__file__).parent / "mxnet_fixtures" / "gluon"
SAVE_AT = 6
TIMEOUT = 180  # per run; each takes 5 to 20 s on 2 idle cores
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


@pytest.fixture(params=engines.ENGINES)
def engine(request):
  engines.require(request.param)
  return request.param


def environment():
  """The processes import this optax_ftml (installed or in the source tree)
  and find ``python`` where this interpreter is; as root, Open MPI is told
  that root may run it, as the guide says."""
  variables = {
      "PYTHONPATH": os.pathsep.join(
          [str(pathlib.Path(optax_ftml.__file__).parent.parent),
           os.environ.get("PYTHONPATH", "")]),
      "PATH": os.pathsep.join([str(pathlib.Path(sys.executable).parent),
                               os.environ["PATH"]])}
  if os.geteuid() == 0:
    variables |= {"OMPI_ALLOW_RUN_AS_ROOT": "1",
                  "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
  return variables


def start(engine, processes, cpu_devices, program, **kwargs):
  arguments, variables = engines.command(engine, processes, cpu_devices,
                                         program)
  return engines.run(arguments, timeout=TIMEOUT,
                     environment=environment() | variables, **kwargs)


def run_scenarios(engine, tmp_path, scenarios):
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
    status, output = start(engine, scenario.processes, scenario.cpu_devices,
                           [sys.executable, str(WORKER), *arguments])
    assert status == 0, (engine, name, status, output[-5000:])
    results[name] = {path.stem: dict(np.load(path))
                     for path in out.glob("*.npz")}
    results[name]["checkpoint"] = out / "checkpoint"
  return results


def max_difference(actual, expected):
  assert sorted(actual) == sorted(expected)
  return max(float(np.max(np.abs(actual[key].astype(np.float64)
                                 - expected[key]), initial=0))
             for key in expected)


def assert_equal(actual, expected):
  for key in expected:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def assert_close(actual, expected):
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=RTOL,
                               atol=ATOL, err_msg=key)


def test_processes_train_save_and_resume_like_one_process(engine, tmp_path):
  start_time = time.monotonic()
  runs = run_scenarios(engine, tmp_path, SCENARIOS)
  print(f"{engine}: {len(SCENARIOS)} runs in"
        f" {time.monotonic() - start_time:.0f} s")
  two, one = runs["2x2"], runs["1x4"]
  for quantity in ("losses", "final", "saved"):
    print(f"{engine}: {quantity} 2x2 vs 1x4: max difference",
          max_difference(two[quantity], one[quantity]))
    assert_close(two[quantity], one[quantity])
  # The optimizer alone: no reduction, the same bits on any layout.
  assert_equal(two["update_alone"], one["update_alone"])

  # Each process stores 1/N of every split parameter and FTML buffer (every
  # process checks its own; process 0 reports). Only b2, one element, is
  # replicated.
  for name in ("2x2", "1x4", "2x2 resumed", "4x1 resumed", "1x2 resumed"):
    shares = runs[name]["shares"]
    # Parameters, v, z and d_prev (the lean state recomputes d_prev), 4 each.
    assert len(shares) == (4 + 3) * 4, sorted(shares)
    for key, share in shares.items():
      expected = 1.0 if "'b2'" in key else 1 / SCENARIOS[name].processes
      assert share == expected, (name, key, share)

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
    print(f"{engine}: {name} vs 2x2: max difference",
          max_difference(runs[name]["final"], two["final"]))
    assert_close(runs[name]["final"], two["final"])
    for key, losses in two["losses"].items():
      np.testing.assert_allclose(runs[name]["losses"][key], losses[SAVE_AT:],
                                 rtol=RTOL)


def test_mxnet_checkpoint_resumes_into_a_multi_process_sharded_run(
    engine, tmp_path):
  """Every process reads MXNet's files and resumes FTML sharded over 2
  processes x 2 devices: the continued run is the single-process resume to
  the bit (FTML's chain has no reduction) and MXNet's run to float32 rounding."""
  start_time = time.monotonic()
  runs = run_scenarios(engine, tmp_path, MXNET_SCENARIOS)
  print(f"{engine}: {len(MXNET_SCENARIOS)} runs in"
        f" {time.monotonic() - start_time:.0f} s")
  sharded, single = runs["MXNet 2x2"]["mxnet_resumed"], runs["MXNet 1x1"][
      "mxnet_resumed"]
  assert_equal(sharded, single)
  print(f"{engine}: MXNet resume, 2x2 vs 1x1: max difference",
        max_difference(sharded, single))
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
  print(f"{engine}: MXNet resume vs MXNet: worst difference {worst:.2g} of the"
        " largest weight")


def documented_commands(text):
  """The lines of the ```bash blocks in ``text``."""
  return [line for block in re.findall(r"^```bash\n(.*?)^```", text,
                                       re.S | re.M)
          for line in block.splitlines()]


def documented(text, engine):
  """The one documented command line that starts processes with ``engine``."""
  (line,) = [line for line in documented_commands(text)
             if engine in shlex.split(line)]
  return line


def free_port():
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


@pytest.fixture
def guide_program(tmp_path):
  """The guide's train.py, in a fresh directory."""
  # The only {code-block}: the in-process runs of the docs' ```python
  # blocks (test_docs.py) leave it to the tests here.
  (program,) = re.findall(r"^```\{code-block\} python\n(.*?)^```",
                          GUIDE.read_text(), re.S | re.M)
  (tmp_path / "train.py").write_text(program)
  return tmp_path


def assert_trained(output, processes, directory):
  # Not anchored: the processes' lines can interleave mid-line.
  for index in range(processes):
    assert re.search(rf"process {index} of {processes}: loss \d", output), (
        output[-3000:])
  # One checkpoint, in the shared default directory.
  assert (directory / "checkpoint").is_dir(), sorted(directory.iterdir())


def test_the_scaling_guides_program_runs_as_the_guide_starts_it(
    engine, guide_program):
  """The guide's train.py with the guide's command line for the engine."""
  line = documented(GUIDE.read_text(), engine)
  status, output = engines.run(["bash", "-c", line], timeout=TIMEOUT,
                               environment=environment(), cwd=guide_program)
  print(f"{engine}: {line}\n{output}")
  assert status == 0, output[-5000:]
  assert_trained(output, 2, guide_program)


def test_the_scaling_guides_program_runs_in_jaxs_shell_loop(guide_program):
  """The guide's shell loop, as written but for a free port."""
  lines = [line for line in documented_commands(GUIDE.read_text())
           if line.startswith(("export JAX_NUM_CPU_DEVICES", "for i in"))]
  assert len(lines) == 2, lines
  script = "\n".join(lines).replace("12345", str(free_port()))
  status, output = engines.run(["bash", "-c", script], timeout=TIMEOUT,
                               environment=environment(), cwd=guide_program)
  print(f"shell loop:\n{script}\n{output}")
  assert status == 0, output[-5000:]
  assert_trained(output, 2, guide_program)


def test_the_scaling_guides_program_refuses_to_run_as_uncoordinated_copies(
    engine, guide_program):
  """Two copies given a one-process run's arguments (a port each) stop with
  the guide's message instead of each training alone."""
  rank = {"mpirun": "OMPI_COMM_WORLD_RANK", "srun": "SLURM_PROCID"}[engine]
  port = free_port()
  copy = ("exec python train.py"
          f" 127.0.0.1:$(({port} + ${rank})) 1 0")
  status, output = start(engine, 2, 1, ["sh", "-c", copy], cwd=guide_program)
  print(f"{engine}, uncoordinated copies:\n{output}")
  assert status not in (0, None), output[-3000:]
  assert "train.py: 2 processes were started but 1 joined" in output, output
  assert " loss " not in output, output


def test_the_scale_out_notebook_runs_as_it_says_on_two_processes(
    engine, tmp_path):
  """The notebook, exported and started with the commands of its last cell.

  Its data-parallel and sharded runs span both processes, each process feeding
  its own examples, and its own checks hold in every process: the first loss
  equals the single-device run's to float32 rounding, and FTML's update alone,
  sharded, is the single-device update to the bit.
  """
  notebook = json.loads(NOTEBOOK.read_text())
  text = "".join("".join(cell["source"]) for cell in notebook["cells"]
                 if cell["cell_type"] == "markdown")
  export = [line for line in documented_commands(text) if "nbconvert" in line]
  assert export == ["jupyter nbconvert --to python scale_out.ipynb"], export
  (tmp_path / NOTEBOOK.name).write_bytes(NOTEBOOK.read_bytes())
  # jupyter of this interpreter, wherever it is installed.
  exported = subprocess.run([sys.executable, "-m", *shlex.split(export[0])],
                            cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=False)
  assert exported.returncode == 0, exported.stderr[-3000:]
  line = documented(text, engine)
  start_time = time.monotonic()
  status, output = engines.run(
      ["bash", "-c", line], timeout=TIMEOUT, cwd=tmp_path,
      environment=environment() | {"OPTAX_FTML_NOTEBOOK_STEPS": "30"})
  print(f"{engine}: 2 processes in {time.monotonic() - start_time:.0f} s")
  assert status == 0, output[-5000:]
  # Both processes ran every check (their lines interleave, unlabelled).
  for index in range(2):
    assert re.search(rf"process {index} of 2, 4 devices", output), output
  # Data parallel and sharded parameters, in each process.
  assert output.count("vs single device: first loss within") == 4, output
  assert output.count("update alone, sharded vs one device: 0 of") == 2, output
  # Python warnings print as "<file>:<line>: SomeWarning: ..."; the notebook
  # test treats them as errors, and so does this one.
  assert not re.search(r"\w+Warning: ", output), output[-5000:]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("how", ["mpirun", "srun", "loop"])
def test_a_signal_leaves_no_process_behind(how, stop_signal, tmp_path):
  """SIGTERM or SIGINT to tests/engines.py, while it runs processes that
  ignore SIGTERM, stops every one of them."""
  if how != "loop":
    engines.require(how)
  pids = tmp_path / "pids"
  pids.mkdir()
  worker = tmp_path / "worker.py"
  worker.write_text(
      "import os, pathlib, signal, sys, time\n"
      "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
      f"pathlib.Path({str(pids)!r}, str(os.getpid())).touch()\n"
      "time.sleep(600)\n")
  helper = subprocess.Popen(
      [sys.executable, engines.__file__, how, "2", "1", sys.executable,
       str(worker)], env=os.environ | environment(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 60
  while len(list(pids.iterdir())) < 2:
    assert helper.poll() is None, helper.communicate()[0]
    assert time.monotonic() < deadline, "the processes did not start"
    time.sleep(0.1)
  started = [int(path.name) for path in pids.iterdir()]
  helper.send_signal(stop_signal)
  output = helper.communicate(timeout=engines.STOP_GRACE + 45)[0]
  assert helper.returncode == 128 + stop_signal, output
  assert f"stopped by {stop_signal.name}" in output, output

  def alive(pid):
    stat = pathlib.Path(f"/proc/{pid}/stat")
    try:
      return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
      return False

  deadline = time.monotonic() + 10
  while any(alive(pid) for pid in started):
    assert time.monotonic() < deadline, [p for p in started if alive(p)]
    time.sleep(0.1)
