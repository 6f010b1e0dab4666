"""What the benchmarks ran on: their results depend on the processor."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
  """The processor's name, where Linux says; else what Python knows."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def description() -> dict[str, str | int | None]:
  """The processor and its number of cores."""
  return {"cpu": cpu_model(), "cpu_count": os.cpu_count()}
