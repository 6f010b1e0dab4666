"""What the benchmarks ran on: their results depend on the processor and the
packages' versions."""

from __future__ import annotations

import os
import platform

import jax
import jaxlib
import numpy as np
import optax

import optax_ftml


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


def package_versions() -> dict[str, str]:
  """Python's and the numerical packages' versions."""
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "optax": optax.__version__,
          "numpy": np.__version__, "optax_ftml": optax_ftml.__version__}
