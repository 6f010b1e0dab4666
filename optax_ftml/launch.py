"""Runs a multi-process JAX program as several processes on this machine.

Trying code written for many hosts (a TPU slice, a GPU cluster) on one machine::

  python -m optax_ftml.launch --processes 2 --cpu-devices 2 train.py [ARGS...]

starts ``python train.py ARGS`` twice, each process with 2 CPU devices, and sets
the environment variables ``JAX_COORDINATOR_ADDRESS`` (a free port on
127.0.0.1), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` that the program passes
to ``jax.distributed.initialize``. Every line a process prints is prefixed with
its ``[process id]``. When one process fails, or ``--timeout`` passes, every
process is stopped (with the processes it started); the exit status is the
first failing process's, or 124 on timeout.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

TIMED_OUT = 124


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _copy_lines(source: TextIO, prefix: str, sink: TextIO) -> None:
  for line in source:
    sink.write(prefix + line)
    sink.flush()


def _stop(processes: Sequence[subprocess.Popen]) -> None:
  for process in processes:
    if process.poll() is None:
      # Each process leads its own group: this also stops what it started.
      os.killpg(process.pid, signal.SIGKILL)
  for process in processes:
    process.wait()


def run(command: Sequence[str], *, processes: int, cpu_devices: int = 1,
        timeout: float | None = None, output: TextIO | None = None) -> int:
  """Runs ``command`` as ``processes`` processes joined by one coordinator.

  Args:
    command: the program and its arguments, e.g. ``[sys.executable, "train.py"]``.
    processes: how many processes, at least 1.
    cpu_devices: CPU devices in each process (``JAX_NUM_CPU_DEVICES``), at least
      1; the processes run on the CPU (``JAX_PLATFORMS=cpu``).
    timeout: seconds before every process is stopped; ``None`` waits.
    output: where the processes' prefixed lines go (default ``sys.stdout``).

  Returns:
    0 when every process succeeded, else the first failing exit status (a
    negative signal number for a killed process), or 124 on timeout.
  """
  if processes < 1:
    raise ValueError(f"processes must be at least 1, got {processes}")
  if cpu_devices < 1:
    raise ValueError(f"cpu_devices must be at least 1, got {cpu_devices}")
  sink = sys.stdout if output is None else output
  environment = dict(
      os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
      JAX_NUM_PROCESSES=str(processes), JAX_NUM_CPU_DEVICES=str(cpu_devices),
      JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  started, copiers = [], []
  deadline = None if timeout is None else time.monotonic() + timeout
  try:
    for process_id in range(processes):
      process = subprocess.Popen(
          list(command), env=dict(environment, JAX_PROCESS_ID=str(process_id)),
          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True, start_new_session=True)
      started.append(process)
      copier = threading.Thread(
          target=_copy_lines, args=(process.stdout, f"[{process_id}] ", sink),
          daemon=True)
      copier.start()
      copiers.append(copier)
    while True:
      failed = [p.returncode for p in started if p.poll() not in (None, 0)]
      if failed:
        return failed[0]
      if all(p.returncode == 0 for p in started):
        return 0
      if deadline is not None and time.monotonic() > deadline:
        sink.write(f"launch: stopped after {timeout} s\n")
        return TIMED_OUT
      time.sleep(0.05)
  finally:
    _stop(started)
    for copier in copiers:
      copier.join()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m optax_ftml.launch",
      description="Runs a Python script as N JAX processes on this machine.")
  parser.add_argument("--processes", type=int, default=2,
                      help="number of processes (default 2)")
  parser.add_argument("--cpu-devices", type=int, default=1,
                      help="CPU devices per process (default 1)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="seconds before every process is stopped")
  parser.add_argument("script", help="the Python script every process runs")
  parser.add_argument("args", nargs=argparse.REMAINDER,
                      help="the script's arguments")
  arguments = parser.parse_args(argv)
  try:
    return run([sys.executable, arguments.script, *arguments.args],
               processes=arguments.processes,
               cpu_devices=arguments.cpu_devices, timeout=arguments.timeout)
  except ValueError as error:
    parser.error(str(error))


if __name__ == "__main__":
  sys.exit(main())
