"""The benchmark scripts run (in their quick mode) and write their outputs.

Only that: what they measure is reported by the scripts, not asserted here.
"""

import json
import pathlib
import subprocess
import sys

import convergence  # benchmarks/, on pytest's pythonpath
import numpy as np

BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"


def run_quick(script, out):
  subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick",
                  "--out", str(out)], check=True, capture_output=True,
                 timeout=900)


def test_speed_benchmark_writes_its_table_and_numbers(tmp_path):
  run_quick("speed.py", tmp_path)
  output = json.loads((tmp_path / "speed.json").read_text())
  results = output["results"]
  table = (tmp_path / "speed.md").read_text()
  # Where the time goes: the arrays each loop streams, from the compiled
  # steps; an array that only orders FTML's in-place updates is not read.
  floor = output["streaming_floor"]["optimizers"]
  assert "Streaming floor" in table
  # The machine is part of the result: ratios to Adam depend on it.
  environment = output["environment"]
  assert environment["cpu"] and environment["cpu"] in table.splitlines()[0]
  assert floor["adam"]["arrays_read_per_loop"] == [2, 2, 3]
  assert sorted(floor["ftml"]["arrays_read_per_loop"]) == [1, 2, 3, 5]
  assert sorted(floor["ftml (recompute_d_prev)"]["arrays_read_per_loop"]) == [
      2, 3, 4]
  assert all(r["floor_s"] > 0 for r in floor.values())
  assert len(results) == 4
  for model, row in results.items():
    assert model in table
    assert set(row["optimizers"]) == {
        "adam", "rmsprop", "ftml", "ftml (recompute_d_prev)"}
    for r in row["optimizers"].values():
      assert r["step_s_donated"] > 0 and r["first_call_s"] > 0
    ftml, lean = row["optimizers"]["ftml"], row["optimizers"][
        "ftml (recompute_d_prev)"]
    # Memory is exact, unlike time: three buffers per parameter, or two.
    assert ftml["ratio_state_bytes"] > 1.4
    assert 0.99 < lean["ratio_state_bytes"] < 1.01
    # float32 and bfloat16 (with its bfloat16 state) alike.
    assert ftml["array_copies"] == lean["array_copies"] == 0
    assert ftml["array_loops"] == 4 * row["leaves"]
    assert lean["array_loops"] == 3 * row["leaves"]


def test_convergence_benchmark_writes_its_table_numbers_and_plots(tmp_path):
  run_quick("convergence.py", tmp_path)
  output = json.loads((tmp_path / "convergence.json").read_text())
  results = output["results"]
  table = (tmp_path / "convergence.md").read_text()
  assert set(output["versions"]) == {
      "python", "jax", "jaxlib", "optax", "numpy", "optax_ftml"}
  assert all(f"{name} {version}" in table
             for name, version in output["versions"].items())
  assert output["machine"]["cpu"] and output["machine"]["cpu"] in table
  assert len(results) == 3
  for task, row in results.items():
    assert task in table
    assert set(row["optimizers"]) == {
        "ftml", "adam", "rmsprop", "sgd (momentum 0.9)"}
    for r in row["optimizers"].values():
      assert len(r["curve_mean"]) == row["steps"]
      # The grid: consecutive half-decades (two, plus at most one added on
      # each side where the best rate was at an end), the flag telling
      # whether the selected rate is still at an end.
      grid = sorted(map(float, r["validation_loss_by_learning_rate"]))
      assert 2 <= len(grid) <= 4
      assert all(round(grid[i + 1] / grid[i], 2) in (3.0, 3.33)
                 for i in range(len(grid) - 1))
      assert r["at_grid_edge"] == (r["learning_rate"] in (grid[0], grid[-1]))
  pngs = sorted(tmp_path.glob("convergence_*.png"))
  assert len(pngs) == 3
  assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
  # The plots are redrawn from the JSON alone.
  for png in pngs:
    png.unlink()
  subprocess.run([sys.executable, str(BENCHMARKS / "convergence.py"),
                  "--plot-only", "--out", str(tmp_path)], check=True,
                 capture_output=True, timeout=300)
  assert sorted(tmp_path.glob("convergence_*.png")) == pngs


def test_convergence_bands_stay_positive_on_a_log_axis():
  # One seed's spike: the standard deviation exceeds the mean, and mean - std
  # would fall below zero; where the seeds agree, the band is mean +- std.
  mean, std = np.array([1e-3, 1.0]), np.array([3e-3, 1e-3])
  centre, factor = convergence.geometric_band(mean, std)
  lower, upper = centre / factor, centre * factor
  assert np.all(lower > 0) and np.all(lower < mean) and np.all(mean < upper)
  np.testing.assert_allclose([lower[1], upper[1]], [1 - 1e-3, 1 + 1e-3],
                             rtol=1e-5)
  # Log-normal with that mean and standard deviation.
  sigma = np.log(factor)
  np.testing.assert_allclose(centre * np.exp(sigma**2 / 2), mean)
  np.testing.assert_allclose(
      np.sqrt(np.expm1(sigma**2)) * centre * np.exp(sigma**2 / 2), std)
