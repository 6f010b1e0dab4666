"""Reading XLA's compiled text: the loops and copies of a compiled step, and
the arrays each loop streams (``benchmarks/speed.py``'s tables and streaming
floor; the tests read XLA's ``memory_analysis`` and ``cost_analysis``)."""

from __future__ import annotations

import re


def entry_computation(compiled_text: str) -> str:
  """The entry computation of a compiled module's text (its loops and copies)."""
  return compiled_text[compiled_text.index("\nENTRY"):]


def array_ops(entry: str, opcode: str) -> list[str]:
  """The instructions ``opcode`` of an entry computation with an array result."""
  return re.findall(rf"= \w+\[\d[^\]]*\]\S* {opcode}\(", entry)


def compiled_structure(compiled_text: str) -> dict[str, int]:
  """Loops over arrays (fusions with a non-scalar result) and array copies
  in the compiled step."""
  entry = entry_computation(compiled_text)
  return {"array_loops": len(array_ops(entry, "fusion")),
          "array_copies": len(array_ops(entry, "copy"))}


def computations(compiled_text: str) -> dict[str, list[tuple[str, str, list[str]]]]:
  """Each computation of a compiled module's text: its instructions, as
  (name, result type and opcode, operand names)."""
  out, current = {}, None
  for line in compiled_text.splitlines():
    header = re.match(r"(?:ENTRY )?%(\S+) .*\{$", line)
    if header:
      current = out.setdefault(header.group(1), [])
      continue
    instruction = re.match(r"\s+(?:ROOT )?%(\S+) = (\S+ \w+)\((.*?)\)", line)
    if instruction and current is not None:
      name, op, operands = instruction.groups()
      current.append((name, op, [o.strip().lstrip("%") for o in re.sub(
          r"/\*index=\d+\*/", "", operands).split(",") if o.strip()]))
  return out


def ordering_only(body: list[tuple[str, str, list[str]]]) -> set[str]:
  """The instructions of a fused loop whose value only reaches the unselected
  side of a select on a scalar condition: FTML's never-taken selects, which
  order the in-place updates (the loop does not stream such an array: the
  select adds ~4% to a loop reading one array, a real read ~70%)."""
  ops = {name: op for name, op, _ in body}
  users = {name: [] for name in ops}
  for name, op, operands in body:
    for i, operand in enumerate(operands):
      users.setdefault(operand, []).append((name, op, i, operands))
  scalar_condition = {name for name, op, operands in body
                      if op.startswith("pred[") and op.endswith(" broadcast")
                      and ops.get(operands[0], "").startswith("pred[] ")}
  ghosts: set[str] = set()
  for name, _, _ in reversed(body):  # users come after their operands
    uses = users.get(name, [])
    if uses and all(
        (user_op.endswith(" select") and i == 1
         and operands[0] in scalar_condition)
        or (user in ghosts and user_op.split()[-1] in ("convert", "real"))
        for user, user_op, i, operands in uses):
      ghosts.add(name)
  return ghosts


def loop_reads(compiled_text: str) -> list[int]:
  """The number of arrays each array-valued loop (fusion) of the compiled
  entry computation streams from memory: its array operands, less those
  that only order it after another loop (:func:`ordering_only`)."""
  bodies = computations(compiled_text)
  entry = entry_computation(compiled_text)
  types = dict(re.findall(r"%(\S+) = (\w+\[[^\]]*\])", entry))
  reads = []
  for operands, called in re.findall(
      r"= \w+\[\d[^\]]*\]\S* fusion\(([^)]*)\).*?calls=%([\w.]+)", entry):
    names = [o.strip().lstrip("%") for o in
             re.sub(r"/\*index=\d+\*/", "", operands).split(",")]
    body = bodies[called]
    parameters = {int(operands[0]): name for name, op, operands in body
                  if op.endswith(" parameter")}
    ghosts = ordering_only(body)
    reads.append(sum(
        re.match(r"\w+\[\d", types[n]) is not None
        and parameters.get(i) not in ghosts for i, n in enumerate(names)))
  return reads
