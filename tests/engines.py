"""Starts multi-process JAX programs as the scaling guide says: Open MPI's
``mpirun``, SLURM's ``srun``, or JAX's shell loop, all on this machine.

``command`` builds the guide's one-machine command for an engine; ``run``
starts a command in a new process group with a time limit and stops it, with
every process it started, on timeout and when this process receives SIGTERM
or SIGINT. As a program (``python tests/engines.py ENGINE PROCESSES
CPU_DEVICES PROGRAM...``) it runs one command so, for trying the stop by hand
and for the SIGTERM test.

In CI (``CI=true``) an engine that is missing fails its tests; elsewhere they
are skipped with the reason. ``.ci/engines start`` starts SLURM on this
machine (export the slurm.conf it prints as ``SLURM_CONF``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence

ENGINES = ("mpirun", "srun")
# Open MPI stays on the loopback interface; it refuses root unless told.
MPIRUN_LOCAL = ("--oversubscribe", "--mca", "btl_tcp_if_include", "lo",
                "--mca", "oob_tcp_if_include", "lo")
STOP_GRACE = 15  # seconds between SIGTERM and SIGKILL


def unavailable(engine: str) -> str | None:
  """Why ``engine`` cannot run here, or None."""
  if shutil.which(engine) is None:
    return f"{engine} is not installed (.ci/engines start installs it)"
  probe = {"mpirun": ["mpirun", "--version"],
           "srun": ["sinfo", "--noheader", "--format=%t"]}[engine]
  try:
    answer = subprocess.run(probe, capture_output=True, text=True, timeout=20,
                            check=False)
  except (OSError, subprocess.TimeoutExpired) as error:
    return f"{probe[0]} does not answer: {error}"
  if answer.returncode != 0:
    return (f"{' '.join(probe)} failed: {answer.stderr.strip()[:300]} (start"
            " SLURM with .ci/engines start and export the SLURM_CONF it prints)")
  if engine == "mpirun" and "Open MPI" not in answer.stdout:
    return f"mpirun is not Open MPI: {answer.stdout.strip()[:200]}"
  if engine == "srun" and not answer.stdout.split():
    return "SLURM has no node (.ci/engines start)"
  return None


def require(engine: str) -> None:
  """Fails in CI, else skips, when ``engine`` cannot run here."""
  import pytest  # only the tests need it

  reason = unavailable(engine)
  if reason is None:
    return
  if os.environ.get("CI") == "true":
    pytest.fail(f"CI needs {engine}: {reason}")
  pytest.skip(reason)


def command(engine: str, processes: int, cpu_devices: int,
            program: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """The command that starts ``program`` as ``processes`` processes with
  ``cpu_devices`` CPU devices each, and the environment variables it needs."""
  environment = {"JAX_NUM_CPU_DEVICES": str(cpu_devices),
                 "JAX_PLATFORMS": "cpu"}
  if engine == "mpirun":
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    # As the guide writes it (on one machine, the processes inherit mpirun's
    # whole environment anyway).
    exported = [a for name in environment for a in ("-x", name)]
    return (["mpirun", "-n", str(processes), *root, *MPIRUN_LOCAL, *exported,
             *program], environment)
  if engine == "srun":
    # A unique job name: scancel finds the job by it if srun itself is lost.
    return (["srun", "-n", str(processes), "--kill-on-bad-exit=1",
             f"--job-name=optax-ftml-{uuid.uuid4().hex[:12]}", *program],
            environment)
  raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


class Stopped(Exception):
  """This process received SIGTERM or SIGINT while a command ran."""


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
  """SIGTERM and SIGINT raise Stopped, even where SIGINT was ignored (as in
  a shell's background job)."""
  def handler(signum, frame):
    raise Stopped(signal.Signals(signum).name)
  try:
    previous = {number: signal.signal(number, handler)
                for number in (signal.SIGTERM, signal.SIGINT)}
  except ValueError:  # not the main thread: leave signals alone
    yield
    return
  try:
    yield
  finally:
    for number, action in previous.items():
      signal.signal(number, action)


def stop(process: subprocess.Popen, arguments: Sequence[str]) -> None:
  """Stops ``process`` and every process it started.

  SIGTERM to its process group first: mpirun and srun then stop their
  processes themselves (SIGKILL to mpirun would leave them, in process groups
  of their own, behind). Whatever remains after STOP_GRACE seconds is killed:
  the group, and a SLURM job by its name.
  """
  with contextlib.suppress(ProcessLookupError):
    os.killpg(process.pid, signal.SIGTERM)
  try:
    process.wait(STOP_GRACE)
  except subprocess.TimeoutExpired:
    pass
  names = [a.removeprefix("--job-name=") for a in arguments
           if a.startswith("--job-name=")]
  if names and shutil.which("scancel"):
    subprocess.run(["scancel", "--signal=KILL", "--full", f"--name={names[0]}"],
                   capture_output=True, timeout=30, check=False)
  with contextlib.suppress(ProcessLookupError):
    os.killpg(process.pid, signal.SIGKILL)
  process.wait()


def run(arguments: Sequence[str], *, timeout: float,
        environment: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None) -> tuple[int | None, str]:
  """Runs ``arguments``; returns its exit status (None: stopped at
  ``timeout`` seconds) and its output, stdout and stderr together."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", **(environment or {}))
  with tempfile.TemporaryFile("w+") as output, _signals_raise():
    process = subprocess.Popen(
        list(arguments), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
        stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
      status = process.wait(timeout)
    except subprocess.TimeoutExpired:
      status = None
    finally:
      if process.poll() is None:
        stop(process, arguments)
    output.seek(0)
    return status, output.read()


def main(argv: Sequence[str]) -> int:
  engine, processes, cpu_devices, *program = argv
  if engine == "loop":  # JAX's shell loop; the program gets its process id
    arguments = ["bash", "-c", 'for i in $(seq 0 $(($1 - 1))); do'
                 ' "${@:2}" "$i" & done; wait', "loop", processes, *program]
    environment = {"JAX_NUM_CPU_DEVICES": cpu_devices, "JAX_PLATFORMS": "cpu"}
  else:
    arguments, environment = command(engine, int(processes), int(cpu_devices),
                                     program)
  try:
    status, output = run(arguments, timeout=600, environment=environment)
  except Stopped as stopped:
    print(f"engines: stopped by {stopped}", flush=True)
    return 128 + signal.Signals[str(stopped)]
  print(output, end="")
  return 124 if status is None else status


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
