"""Step time, first-call time and state memory of ``ftml`` next to Adam.

Each optimizer step is ``update`` followed by ``optax.apply_updates`` under
``jax.jit``, with the parameters and the optimizer state donated (updated in
place, as in a training loop) and without donation. The optimizers run
interleaved in one process (A B C A B C ...); times are medians over the
repetitions, and each ratio is the median over rounds of the time divided by
Adam's in the same round, so that machine load affects both alike.

Where the time goes: for one large float32 leaf, each optimizer's compiled
loops (the arrays each reads) are timed as plain streaming loops reading as
many arrays; their sum, the floor, is compared with the measured step.

    python benchmarks/speed.py            # the full run (a few minutes)
    python benchmarks/speed.py --quick    # a smoke run on small models

Writes ``speed.json`` and ``speed.md`` to ``--out`` (``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import hlo  # benchmarks/hlo.py and machine.py, beside this script
import machine
import optax_ftml

RESULTS = pathlib.Path(__file__).parent / "results"

OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": lambda: optax.adam(1e-3),
    "rmsprop": lambda: optax.rmsprop(1e-3),
    "ftml": lambda: optax_ftml.ftml(1e-3),
    "ftml (recompute_d_prev)": lambda: optax_ftml.ftml(
        1e-3, recompute_d_prev=True),
}


def conv_net_shapes(width: int, stages: int
                    ) -> dict[str, dict[str, tuple[int, ...]]]:
  """Leaves shaped like a plain conv net: 3x3 conv blocks (kernel, bias, norm
  scale and offset) in four stages of widening, and a dense head. With
  ``stages=10`` (39 blocks) there are 160 leaves, ~11M parameters at width 64.
  """
  channels = [3] + [width] * stages + [2 * width] * stages + [
      3 * width] * stages + [4 * width] * (stages - 1)
  shapes = {}
  for i, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
    shapes[f"conv{i:02d}"] = {"kernel": (3, 3, c_in, c_out), "bias": (c_out,),
                              "scale": (c_out,), "offset": (c_out,)}
  shapes["head"] = {"kernel": (2 * channels[-1], 8 * width),
                    "bias": (8 * width,), "scale": (8 * width,),
                    "offset": (8 * width,)}
  return shapes


def models(quick: bool) -> dict[str, tuple[dict, jnp.dtype]]:
  """Name -> (shapes pytree, dtype)."""
  sizes = (16_000, 256_000) if quick else (1_000_000, 16_000_000)
  conv_net = conv_net_shapes(8, 1) if quick else conv_net_shapes(64, 10)
  leaves = len(jax.tree.leaves(conv_net, is_leaf=lambda x: isinstance(x, tuple)))
  return {
      f"{sizes[0]:,}, one leaf": ({"w": (sizes[0],)}, jnp.float32),
      f"{sizes[1]:,}, one leaf": ({"w": (sizes[1],)}, jnp.float32),
      f"conv net, {leaves} leaves": (conv_net, jnp.float32),
      f"conv net, {leaves} leaves, bfloat16": (conv_net, jnp.bfloat16),
  }


def make_params(shapes, dtype, seed):
  leaves, treedef = jax.tree.flatten(
      shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([
      (0.1 * jax.random.normal(k, s, jnp.float32)).astype(dtype)
      for k, s in zip(keys, leaves, strict=True)])


def step_fn(optimizer, donate: bool):
  def step(params, state, grads):
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def tree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def time_steps(names, params, grads, donate, repetitions, steps):
  """Per optimizer: the median seconds per step, and the median over rounds
  of its time divided by Adam's in the same round (the optimizers run
  interleaved, so a change of machine load affects a round's times alike)."""
  runs = {}
  for name in names:
    optimizer = OPTIMIZERS[name]()
    fn = step_fn(optimizer, donate)
    own = jax.tree.map(jnp.copy, params)
    runs[name] = [fn, own, optimizer.init(own)]
    # Warm-up (compiles; also touches every buffer once).
    runs[name][1], runs[name][2] = fn(own, runs[name][2], grads)
    jax.block_until_ready(runs[name][1:])
  times = {name: [] for name in names}
  for _ in range(repetitions):
    for name in names:
      fn, p, s = runs[name]
      start = time.perf_counter()
      for _ in range(steps):
        p, s = fn(p, s, grads)
      jax.block_until_ready((p, s))
      times[name].append((time.perf_counter() - start) / steps)
      runs[name][1:] = [p, s]
  return {name: (statistics.median(t), statistics.median(
      x / a for x, a in zip(t, times["adam"], strict=True)))
          for name, t in times.items()}


def time_first_call(names, params, grads, repetitions):
  """Median seconds (wall clock, and CPU time of this process) to trace, lower
  and compile the donated step, and the compiled text of each."""
  wall, cpu, texts = ({name: [] for name in names}, {name: [] for name in names},
                      {})
  for _ in range(repetitions):
    for name in names:
      jax.clear_caches()
      optimizer = OPTIMIZERS[name]()
      state = optimizer.init(params)
      start, start_cpu = time.perf_counter(), time.process_time()
      compiled = step_fn(optimizer, donate=True).lower(
          params, state, grads).compile()
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
      texts[name] = compiled.as_text()
  return ({name: statistics.median(t) for name, t in wall.items()},
          {name: statistics.median(t) for name, t in cpu.items()}, texts)


def streaming_times(size: int, max_reads: int, repetitions: int
                    ) -> dict[int, list[float]]:
  """Seconds of a loop that reads ``k`` float32 arrays of ``size`` and writes
  one of them in place, for k = 1 .. max_reads, in each of the rounds (the
  loops run interleaved)."""
  arrays = [jnp.full((size,), 1.0 + i / 8, jnp.float32)
            for i in range(max_reads)]

  def kernel(*xs):
    return sum(((0.5 + i / 16) * x for i, x in enumerate(xs)), start=xs[0])

  loops = {k: jax.jit(kernel, donate_argnums=0) for k in range(1, max_reads + 1)}
  outputs = {k: loops[k](jnp.copy(arrays[0]), *arrays[1:k]) for k in loops}
  times = {k: [] for k in loops}
  for _ in range(repetitions):
    for k, loop in loops.items():
      start = time.perf_counter()
      outputs[k] = loop(outputs[k], *arrays[1:k])
      outputs[k].block_until_ready()
      times[k].append(time.perf_counter() - start)
  return times


def streaming_floor(size: int, measured: dict, repetitions: int) -> dict:
  """Where the step time of one large float32 leaf goes: each optimizer's
  compiled loops and the time of streaming loops with the same numbers of
  arrays, next to the measured donated step."""
  params = make_params({"w": (size,)}, jnp.float32, seed=0)
  structure = {}
  for name in OPTIMIZERS:
    optimizer = OPTIMIZERS[name]()
    text = step_fn(optimizer, donate=True).lower(
        params, optimizer.init(params), params).compile().as_text()
    structure[name] = hlo.loop_reads(text)
  per_loop = streaming_times(
      size, max(max(r) for r in structure.values()), repetitions)
  # Per round, like the step ratios: a change of load affects a round alike.
  floors = {name: [sum(rounds) for rounds in zip(
      *(per_loop[k] for k in reads), strict=True)]
            for name, reads in structure.items()}
  return {"size": size,
          "loop_s_by_arrays_read": {str(k): statistics.median(t)
                                    for k, t in per_loop.items()},
          "optimizers": {name: {
              "arrays_read_per_loop": structure[name],
              "floor_s": statistics.median(floors[name]),
              "floor_ratio": statistics.median(
                  x / a for x, a in zip(floors[name], floors["adam"],
                                        strict=True)),
              "measured_ratio": measured[name]["ratio_donated"],
          } for name in OPTIMIZERS}}


def benchmark(quick: bool) -> dict:
  names = list(OPTIMIZERS)
  repetitions = 3 if quick else 15
  steps = 2 if quick else 5
  results = {}
  for model, (shapes, dtype) in models(quick).items():
    params = make_params(shapes, dtype, seed=0)
    grads = make_params(shapes, dtype, seed=1)
    row = {"parameters": sum(x.size for x in jax.tree.leaves(params)),
           "leaves": len(jax.tree.leaves(params)),
           "dtype": jnp.dtype(dtype).name, "optimizers": {}}
    donated = time_steps(names, params, grads, True, repetitions, steps)
    undonated = time_steps(names, params, grads, False, repetitions, steps)
    first, first_cpu, texts = time_first_call(names, params, grads,
                                              1 if quick else 3)
    for name in names:
      row["optimizers"][name] = {
          "step_s_donated": donated[name][0],
          "ratio_donated": donated[name][1],
          "step_s_undonated": undonated[name][0],
          "ratio_undonated": undonated[name][1],
          "first_call_s": first[name],
          "first_call_cpu_s": first_cpu[name],
          "state_bytes": tree_bytes(OPTIMIZERS[name]().init(params)),
          **hlo.compiled_structure(texts[name]),
      }
    adam = row["optimizers"]["adam"]
    for r in row["optimizers"].values():
      r["ratio_first_call"] = r["first_call_s"] / adam["first_call_s"]
      r["ratio_first_call_cpu"] = (r["first_call_cpu_s"]
                                   / adam["first_call_cpu_s"])
      r["ratio_state_bytes"] = r["state_bytes"] / adam["state_bytes"]
    results[model] = row
    print(f"done: {model}", flush=True)
  large = list(results.values())[1]
  # The streaming loops are short: more rounds for the same time.
  floor = streaming_floor(large["parameters"], large["optimizers"],
                          5 * repetitions)
  return results, floor


def markdown(results: dict) -> str:
  lines = [
      "| model | optimizer | step, donated | ratio | step, not donated | ratio"
      " | first call | ratio | (CPU time) | state | ratio | loops | copies |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
      " ---: | ---: | ---: |"]
  for model, row in results.items():
    for name, r in row["optimizers"].items():
      lines.append(
          f"| {model} | {name} | {r['step_s_donated'] * 1e3:.2f} ms"
          f" | {r['ratio_donated']:.2f} | {r['step_s_undonated'] * 1e3:.2f} ms"
          f" | {r['ratio_undonated']:.2f} | {r['first_call_s']:.2f} s"
          f" | {r['ratio_first_call']:.2f} | {r['ratio_first_call_cpu']:.2f}"
          f" | {r['state_bytes'] / 2**20:.1f} MiB"
          f" | {r['ratio_state_bytes']:.2f} | {r['array_loops']}"
          f" | {r['array_copies']} |")
  return "\n".join(lines) + "\n"


def floor_markdown(floor: dict) -> str:
  loops = ", ".join(f"{k}: {t * 1e3:.2f} ms" for k, t in
                    floor["loop_s_by_arrays_read"].items())
  lines = [
      f"Streaming floor, one float32 leaf of {floor['size']:,} parameters."
      f" A loop reading k arrays and writing one in place takes ({loops});"
      " each floor is the sum of its loops' times, its ratio the median over"
      " rounds of that sum divided by Adam's.",
      "",
      "| optimizer | arrays read by each loop | floor | floor ratio |"
      " measured ratio |",
      "| --- | --- | ---: | ---: | ---: |"]
  for name, r in floor["optimizers"].items():
    lines.append(
        f"| {name} | {' + '.join(map(str, r['arrays_read_per_loop']))}"
        f" | {r['floor_s'] * 1e3:.2f} ms | {r['floor_ratio']:.2f}"
        f" | {r['measured_ratio']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="small models and few repetitions (a smoke run)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS,
                      help="directory for speed.json and speed.md")
  args = parser.parse_args(argv)
  results, floor = benchmark(args.quick)
  environment = {
      **machine.package_versions(),
      "backend": jax.default_backend(), "devices": str(jax.devices()[0]),
      **machine.description(), "quick": args.quick}
  table = (f"JAX {environment['jax']}, Optax {environment['optax']};"
           f" {environment['devices']}: {environment['cpu']},"
           f" {environment['cpu_count']} cores.\n\n"
           + markdown(results) + "\n" + floor_markdown(floor))
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "speed.json").write_text(json.dumps(
      {"environment": environment, "results": results,
       "streaming_floor": floor}, indent=2) + "\n")
  (args.out / "speed.md").write_text(table)
  print(table)


if __name__ == "__main__":
  main()
