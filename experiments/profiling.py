"""Reading a compiled XLA program: its computations, the matmuls of its loops, and where the
time of one run of it goes (per-op events of JAX's profiler, by category).

Used by :mod:`experiments.benchmark`; nothing here is needed to train.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import re
import tempfile
from typing import Callable

import jax

#: What an instruction's time counts as, in the order the breakdown prints.
CATEGORIES = ("matmul", "element-wise", "copy / transpose", "dynamic slice", "loop control",
              "other")
#: Opcodes that only move or reshape data.
_MOVES = {"copy", "transpose", "broadcast", "reshape", "bitcast", "concatenate", "slice", "pad",
          "parameter", "constant", "tuple", "get-tuple-element", "iota", "reverse", "gather",
          "dynamic-slice", "dynamic-update-slice", "copy-start", "copy-done"}
_CONTAINERS = {"while", "call", "conditional"}
_OTHER = {"custom-call", "rng-bit-generator", "rng", "sort", "all-reduce", "all-gather",
          "reduce-scatter", "all-to-all", "collective-permute"}


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  computation: str
  callees: tuple[str, ...]
  operands: tuple[str, ...]
  line: str


def _operands(rhs: str, opcode: str) -> tuple[str, ...]:
  """The names in an instruction's operand list ``opcode(%a, %b, ...)``."""
  start = rhs.find(opcode + "(")
  if start < 0:
    return ()
  depth, i = 0, start + len(opcode)
  for j in range(i, len(rhs)):
    depth += (rhs[j] == "(") - (rhs[j] == ")")
    if depth == 0:
      return tuple(re.findall(r"%([\w.\-]+)", rhs[i:j]))
  return ()


def _opcode(rhs: str) -> str:
  """The opcode of an instruction's right-hand side ``shape opcode(operands), ...``."""
  if rhs.startswith("("):  # a tuple shape: skip to its closing parenthesis
    depth = 0
    for i, ch in enumerate(rhs):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        rhs = rhs[i + 1:]
        break
  else:
    rhs = rhs.split(" ", 1)[1] if " " in rhs else ""
  match = re.match(r"\s*([\w\-]+)\(", rhs)
  return match.group(1) if match else ""


def parse(hlo_text: str) -> dict[str, list[Instruction]]:
  """The computations of an HLO module's text: name → its instructions, in order."""
  computations: dict[str, list[Instruction]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)  # computations start unindented
    if header:
      current = header.group(1)
      computations[current] = []
    elif current is not None and line.strip() == "}":
      current = None
    elif current is not None:
      match = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
      if match:
        callees = re.findall(
            r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", line)
        opcode = _opcode(match.group(2))
        computations[current].append(Instruction(match.group(1), opcode, current, tuple(callees),
                                                 _operands(match.group(2), opcode), line))
  return computations


def _is_matmul(ins: Instruction) -> bool:
  return ins.opcode in ("dot", "convolution") or (
      ins.opcode == "custom-call"
      and re.search(r'custom_call_target="[^"]*(matmul|gemm|dot)', ins.line, re.I) is not None)


def loop_matmul_counts(hlo_text: str) -> list[int]:
  """Matmuls per iteration of each ``while`` loop in a compiled HLO module, in program order.

  Counts ``dot`` and matmul custom-calls in each loop body, following the computations it
  calls (fusions, nested calls). For a training step the forward scan comes first and the
  backward scan second.
  """
  computations = parse(hlo_text)

  def count(name: str, seen: frozenset = frozenset()) -> int:
    if name in seen or name not in computations:
      return 0
    total = 0
    for ins in computations[name]:
      total += _is_matmul(ins)
      if ins.opcode != "while":  # nested loops are reported on their own
        total += sum(count(callee, seen | {name}) for callee in ins.callees)
    return total

  return [count(body) for ins in _instructions(computations) if ins.opcode == "while"
          for body in re.findall(r"body=%?([\w.\-]+)", ins.line)]


def loop_matmul_depths(hlo_text: str) -> list[int]:
  """The longest chain of dependent matmuls in one iteration of each ``while`` loop, in
  program order (what bounds a loop on an accelerator where each small matmul waits for the
  one before it): dependences followed through the body's instructions, a fusion holding a
  matmul counting as one, calls followed as one step."""
  computations = parse(hlo_text)

  def holds_matmul(ins: Instruction, seen: frozenset = frozenset()) -> bool:
    return _is_matmul(ins) or ins.opcode != "while" and any(
        holds_matmul(inner, seen | {callee}) for callee in ins.callees if callee not in seen
        for inner in computations.get(callee, ()))

  def depth(body: str) -> int:
    instructions = {ins.name: ins for ins in computations.get(body, ())}
    memo: dict[str, int] = {}
    for ins in instructions.values():  # instructions come after their operands
      below = max((memo.get(o, 0) for o in ins.operands if o in instructions), default=0)
      memo[ins.name] = below + holds_matmul(ins)
    return max(memo.values(), default=0)

  return [depth(body) for ins in _instructions(computations) if ins.opcode == "while"
          for body in re.findall(r"body=%?([\w.\-]+)", ins.line)]


def _instructions(computations: dict[str, list[Instruction]]):
  return (ins for body in computations.values() for ins in body)


def category(ins: Instruction, computations: dict[str, list[Instruction]],
             conditions: frozenset[str] = frozenset()) -> str | None:
  """What one executed instruction's time counts as (:data:`CATEGORIES`); ``None`` for a
  container (``while``, ``call``, ``conditional``), whose time is its children's.

  A fusion counts by what it fuses: a matmul if it holds one, a data move if it holds only
  moves, else element-wise. ``conditions``: the loops' condition computations (loop control,
  as is a scalar integer op: the scan's counter).
  """
  if ins.opcode in _CONTAINERS:
    return None
  if ins.computation in conditions or re.search(r"=\s*[su]32\[\]\s", ins.line):
    return "loop control"
  inner = ([i for c in ins.callees for i in computations.get(c, ())]
           if ins.opcode == "fusion" else [ins])
  if any(_is_matmul(i) for i in inner):
    return "matmul"
  opcodes = {i.opcode for i in inner}
  if opcodes <= _MOVES:
    return "dynamic slice" if opcodes & {"dynamic-slice", "dynamic-update-slice"} else "copy / transpose"
  return "other" if ins.opcode in _OTHER else "element-wise"


def _loop_of(computations: dict[str, list[Instruction]]) -> dict[str, str]:
  """Computation name → the ``while`` instruction whose body or condition reaches it."""
  owner: dict[str, str] = {}
  for ins in _instructions(computations):
    if ins.opcode != "while":
      continue
    stack = list(ins.callees)
    while stack:
      name = stack.pop()
      if name in owner or name not in computations:
        continue
      owner[name] = ins.name
      stack.extend(c for inner in computations[name] if inner.opcode != "while"
                   for c in inner.callees)
  return owner


def union_ms(intervals) -> float:
  """The time covered by at least one of ``intervals`` ((start_ns, end_ns) pairs), in ms."""
  total, reach = 0, None
  for start, end in sorted(intervals):
    if reach is None or start > reach:
      total, reach = total + (end - start), end
    elif end > reach:
      total, reach = total + (end - reach), end
  return total / 1e6


def _trace(run: Callable[[], None]):
  """One call of ``run`` under JAX's profiler; its ``ProfileData``."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      run()
    paths = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
    if not paths:
      raise RuntimeError("JAX's profiler wrote no trace")
    return jax.profiler.ProfileData.from_file(paths[0])


def _span_ms(events) -> float:
  """From the first event's start to the last one's end, in ms (events end with start, end)."""
  return (max(e[-1] for e in events) - min(e[-2] for e in events)) / 1e6


def region_walls(events, region_of) -> dict[str, float]:
  """Wall time per region of one run, in ms.

  ``events``: (instruction, loop or ``None``, start_ns, end_ns). A loop's wall time is the
  span from the first of its instructions' events to the end of the last; a region's
  (forward loops, backward loops) the union of its loops' spans (``region_of``: loop →
  region); "outside loops" is the rest of the run's span, loops charged there included.
  """
  spans: dict[str, list[int]] = {}
  for _, loop, start, end in events:
    if loop is not None:
      span = spans.setdefault(loop, [start, end])
      span[0], span[1] = min(span[0], start), max(span[1], end)
  walls = {region: union_ms([tuple(spans[l]) for l in spans if region_of[l] == region])
           for region in ("forward loops", "backward loops")}
  walls["outside loops"] = (_span_ms(events) - walls["forward loops"]
                            - walls["backward loops"])
  return walls


def profile(run: Callable[[], None], hlo_text: str, runs: int = 3) -> dict:
  """Where the time of ``run`` (one call of the compiled program ``hlo_text``) goes.

  Traces ``runs`` calls, one trace each, with JAX's profiler and reads XLA's per-instruction
  events (their ``hlo_op`` names): each is charged to a :data:`CATEGORIES` entry and to a
  region, the forward loops (the first half of the ``while`` loops, by the time they start),
  the backward loops (the second half) or outside the loops. Containers are not charged
  themselves. Beside the events' sums, each region's wall time (:func:`region_walls`): an
  event can be shorter than its work (XLA:CPU records only the launch of a large matmul,
  which then runs asynchronously) or overlap others (instructions on several threads), so
  only the wall times add up to the step.

  Returns:
    ``{"wall_ms", "busy_ms", "ms": {region: {category: ms}}, "wall": {region: ms}}``, means
    per call: the traced wall time (first to last instruction event), the summed event time,
    the breakdown of the events and the regions' wall times.
  """
  computations = parse(hlo_text)
  by_name = {ins.name: ins for ins in _instructions(computations)}
  loop_of = _loop_of(computations)
  conditions = frozenset(c for ins in _instructions(computations) if ins.opcode == "while"
                         for c in re.findall(r"condition=%?([\w.\-]+)", ins.line))
  ms: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
  walls: dict[str, float] = collections.defaultdict(float)
  wall_ms = 0.0
  for _ in range(runs):
    data = _trace(run)
    events, loop_starts = [], {}
    for plane in data.planes:
      for line in plane.lines:
        for event in line.events:
          ins = by_name.get(dict(event.stats).get("hlo_op"))
          if ins is None:
            continue
          start, end = event.start_ns, event.start_ns + event.duration_ns
          if ins.opcode == "while":
            loop_starts[ins.name] = min(start, loop_starts.get(ins.name, start))
          events.append((ins, loop_of.get(ins.computation), start, end))
    if not events:
      raise RuntimeError("the trace holds no XLA instruction events (is this backend's per-op "
                         "tracing on?)")
    order = sorted(loop_starts, key=loop_starts.get)
    half = len(order) // 2
    region_of = {n: ("forward loops" if i < half else "backward loops") for i, n in enumerate(order)}
    region_of.update({loop: "outside loops" for _, loop, _, _ in events
                      if loop is not None and loop not in region_of})
    for ins, loop, start, end in events:
      kind = category(ins, computations, conditions)
      if kind is not None:
        ms[region_of.get(loop, "outside loops")][kind] += (end - start) / 1e6 / runs
    for region, value in region_walls(events, region_of).items():
      walls[region] += value / runs
    wall_ms += _span_ms(events) / runs
  return {
      "wall_ms": wall_ms,
      "busy_ms": sum(v for region in ms.values() for v in region.values()),
      "ms": {region: dict(values) for region, values in ms.items()},
      "wall": dict(walls),
  }


def format_profile(name: str, record: dict) -> str:
  """A small table: category, ms and % of the summed event time, per region and in all;
  then each region's wall time and what it holds beyond its events."""
  regions = ("forward loops", "backward loops", "outside loops")
  totals = {c: sum(record["ms"].get(r, {}).get(c, 0.0) for r in regions) for c in CATEGORIES}
  busy = sum(totals.values()) or 1.0
  head = f"{name:<18}" + "".join(f"{r:>16}" for r in regions) + f"{'all ms':>10}{'%':>7}"
  lines = [head, "-" * len(head)]
  for c in CATEGORIES:
    lines.append(f"{c:<18}" + "".join(f"{record['ms'].get(r, {}).get(c, 0.0):>16.1f}" for r in regions)
                 + f"{totals[c]:>10.1f}{100 * totals[c] / busy:>7.1f}")
  region_sums = [sum(record["ms"].get(r, {}).values()) for r in regions]
  lines.append(f"{'sum of events':<18}" + "".join(f"{v:>16.1f}" for v in region_sums)
               + f"{busy:>10.1f}{100.0:>7.1f}")
  region_walls = [record["wall"].get(r, 0.0) for r in regions]
  lines.append(f"{'wall time':<18}" + "".join(f"{v:>16.1f}" for v in region_walls)
               + f"{record['wall_ms']:>10.1f}")
  lines.append(f"{'wall − events':<18}" + "".join(f"{w - v:>+16.1f}" for w, v in
                                                zip(region_walls, region_sums))
               + f"{record['wall_ms'] - busy:>+10.1f}")
  lines.append("wall − events: + where work ran past its event (XLA:CPU's large matmuls run on "
               "after their launch)\n               or nothing ran; − where events ran on several "
               "threads at once")
  return "\n".join(lines)
