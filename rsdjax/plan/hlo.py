"""The collectives in a compiled XLA program, read from its HLO text.

Used by `rsdjax plan --collectives` to show what each tensor-parallel path (compiler-partitioned or
shard_map) and the pipeline really communicate, and by tests to count psums per layer. A collective
inside a while-loop body runs once per iteration; XLA records the trip count of the loops that scans
become, so `runs` is how often it executes per step (layers for the layer scan; ticks x local layers
inside the pipeline's tick loop).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"\b(?:calls|to_apply|condition|true_computation|false_computation)=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all
    shape: str  # result type as XLA prints it, e.g. f32[8,12,128]
    bytes: int  # bytes of the result on one device
    group: int | None  # devices taking part (replica group size / permute pairs)
    loop_depth: int  # 0: once per step; 1: inside one while loop (per layer, per tick); ...
    runs: int | None  # executions per step (product of the enclosing loops' trip counts; None: unknown)

    @property
    def bytes_per_step(self) -> int | None:
        return None if self.runs is None else self.bytes * self.runs


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _group_size(rest: str) -> int | None:
    if m := re.search(r"replica_groups=\{\{([0-9,]*)\}", rest):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[([0-9,]+)\]<=", rest):
        return int(m.group(1).split(",")[-1])
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", rest):
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
    if m := re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", rest):
        return len(re.findall(r"\{\d+,\d+\}", m.group(1)))  # for a permute: how many devices send
    return None


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective in the program, with the while-loop depth of the computation that holds it."""
    bodies: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            if m := _HEADER.match(line):
                current = m.group(2)
                bodies[current] = []
                entry = current if m.group(1) else entry
            continue
        if line.strip() == "}":
            current = None
        else:
            bodies[current].append(line)

    depth: dict[str, tuple[int, int | None]] = {}

    def visit(name: str, d: int, runs: int | None):
        if name not in bodies or name in depth:
            return
        depth[name] = (d, runs)
        for line in bodies[name]:
            for callee in _BODY.findall(line):
                trips = _TRIPS.search(line)
                visit(callee, d + 1, runs * int(trips.group(1)) if trips and runs is not None else None)
            for callee in _CALLS.findall(line):
                visit(callee, d, runs)

    if entry is not None:
        visit(entry, 0, 1)
    found = []
    for name, lines in bodies.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            op = m.group(2).removesuffix("-start")
            if op in COLLECTIVES:
                d, runs = depth.get(name, (0, None))
                found.append(Collective(op, m.group(1), _shape_bytes(m.group(1)), _group_size(m.group(3)), d, runs))
    return found


def summarize(found: list[Collective]) -> list[tuple[Collective, int]]:
    """Identical collectives merged: [(collective, how many in the program text)], deepest loops first."""
    counts = Counter(found)
    return sorted(counts.items(), key=lambda kv: (-kv[0].loop_depth, kv[0].op, -kv[0].bytes))


def format_table(found: list[Collective]) -> str:
    rows = [f"{'collective':<20} {'result (per device)':<30} {'bytes':>11} {'group':>5} {'loop':>4} "
            f"{'runs/step':>9} {'count':>5} {'bytes/step':>13}"]
    total = 0
    for c, n in summarize(found):
        per_step = None if c.runs is None else c.bytes * c.runs * n
        total += per_step or 0
        shape = re.sub(r"\{[^}]*\}", "", c.shape)  # drop layout annotations
        runs = "?" if c.runs is None else str(c.runs)
        moved = "?" if per_step is None else f"{per_step:,}"
        rows.append(f"{c.op:<20} {shape[:30]:<30} {c.bytes:>11,} {c.group or '-':>5} {c.loop_depth:>4} "
                    f"{runs:>9} {n:>5} {moved:>13}")
    if len(rows) == 1:
        rows.append("(no collectives)")
    else:
        rows.append(f"{'total':<20} {'':<30} {'':>11} {'':>5} {'':>4} {'':>9} {'':>5} {total:>13,}")
    return "\n".join(rows)
