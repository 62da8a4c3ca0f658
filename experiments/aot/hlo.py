"""Collectives in an optimized HLO module (the text of ``compiled.as_text()``).

Every collective instruction (all-reduce, all-gather, reduce-scatter, all-to-all,
collective-permute, and their async ``-start`` halves) is counted with the number
of times it executes per step: an instruction inside a ``while`` body (a scanned
layer stack) runs ``known_trip_count`` times, and nested loops multiply. Bytes are
those of the collective's result on one device (for async ``-start`` ops, whose
result tuple holds the operands and the results, the result half).

The transfer time uses the bandwidth-optimal ring costs on ``n`` participants
(per device, bytes of the result ``b``): all-gather and reduce-scatter move
``(n-1)/n * b`` (reduce-scatter: ``b`` is the scattered result, so ``(n-1) * b``),
all-reduce ``2 (n-1)/n * b``, all-to-all ``(n-1)/n * b``, collective-permute ``b``.
"""

from __future__ import annotations

import collections
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _shape_bytes(text: str) -> list[int]:
    out = []
    for dtype, dims in _SHAPE.findall(text):
        if dtype in _DTYPE_BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            out.append(n * _DTYPE_BYTES[dtype])
    return out


def _group_size(line: str, n_devices: int) -> int:
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([^}]*)\}", line)
    if m and m.group(1).strip():
        return len(m.group(1).split(","))
    m = re.search(r"source_target_pairs=\{([^}]*)\}", line)
    return 2 if m else n_devices


def _parse(text: str):
    """-> (computations: name -> [lines], entry name)."""
    comps, cur, entry = {}, None, None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(1)
            comps[cur] = []
            if line.startswith("ENTRY"):
                entry = cur
            continue
        if cur is not None:
            if line.strip() == "}":
                cur = None
            else:
                comps[cur].append(line)
    return comps, entry


def _multipliers(comps: dict, entry: str) -> dict[str, int]:
    """How many times each computation runs per execution of the entry computation."""
    mult = collections.defaultdict(int)
    mult[entry] = 1
    order, seen = [entry], {entry}
    for name in order:  # breadth-first over the call graph (HLO call graphs are acyclic)
        for line in comps.get(name, ()):
            callees = _CALLS.findall(line)
            b = _BRANCHES.search(line)
            if b:
                callees += [c.strip().lstrip("%") for c in b.group(1).split(",")]
            trip = _TRIP.search(line)
            for c in callees:
                if c not in comps:
                    continue
                times = int(trip.group(1)) if trip and " while(" in line else 1
                mult[c] += mult[name] * times
                if c not in seen:
                    seen.add(c)
                    order.append(c)
    return mult


def collectives(hlo_text: str, n_devices: int, devices_per_host: int | None = None) -> list[dict]:
    """Collectives per step: ``[{kind, cross_host, count, bytes, ring_bytes}]``.

    ``bytes``: result bytes per device summed over executions; ``ring_bytes``: the
    per-device bytes a bandwidth-optimal ring sends (module docstring);
    ``cross_host``: the replica groups are larger than ``devices_per_host`` (so the
    ring crosses hosts; default: never).
    """
    per_host = devices_per_host or n_devices
    comps, entry = _parse(hlo_text)
    if entry is None:
        raise ValueError("collectives: no ENTRY computation in the HLO text")
    mult = _multipliers(comps, entry)
    totals: dict[tuple, list] = {}
    for name, lines in comps.items():
        times = mult.get(name, 0)
        if not times:
            continue
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            op = m.group(2)
            kind = op[:-len("-start")] if op.endswith("-start") else op
            if kind not in KINDS:
                continue
            sizes = [s for s in _shape_bytes(m.group(1)) if s > 8 or kind == "all-reduce"]
            if op.endswith("-start") and len(sizes) >= 2:
                sizes = sizes[len(sizes) // 2:]
            b = sum(sizes)
            n = max(_group_size(line, n_devices), 1)
            factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n,
                      "reduce-scatter": float(n - 1), "all-to-all": (n - 1) / n,
                      "collective-permute": 1.0}[kind]
            t = totals.setdefault((kind, n > per_host), [0, 0, 0.0])
            t[0] += times
            t[1] += times * b
            t[2] += times * b * factor
    return [{"kind": k, "cross_host": x, "count": v[0], "bytes": v[1], "ring_bytes": v[2]}
            for (k, x), v in sorted(totals.items())]
