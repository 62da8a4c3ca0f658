"""Shared benchmark plumbing: timing, compiled memory/FLOPs, environment, output.

Timing compiles once, warms up, then takes the median of ``repeats`` wall-clock
runs, each ended by ``block_until_ready``. Memory is XLA's compiled estimate
(``.lower().compile().memory_analysis()``): temp + argument + output bytes.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax


def env_info() -> dict[str, Any]:
    """Device, backend and library versions for the header of every table."""
    import flax
    import jaxlib

    dev = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(),
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "n_devices": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


def compile_fn(fn: Callable, *args, **jit_kwargs):
    """Returns ``(compiled, compile_seconds)`` for ``jax.jit(fn)`` on ``args``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def compiled_stats(compiled) -> dict[str, float]:
    """Peak-memory estimate (bytes) and FLOPs from XLA's analyses (NaN if unavailable)."""
    out = {"peak_bytes": float("nan"), "temp_bytes": float("nan"), "flops": float("nan")}
    try:
        m = compiled.memory_analysis()
        out["temp_bytes"] = float(m.temp_size_in_bytes)
        out["peak_bytes"] = float(m.temp_size_in_bytes + m.argument_size_in_bytes
                                  + m.output_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # backend without memory analysis
        pass
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        out["flops"] = float(cost.get("flops", float("nan")))
    except Exception:
        pass
    return out


def time_compiled(compiled, *args, warmup: int = 1, repeats: int = 5,
                  max_seconds: float = 30.0) -> float:
    """Median seconds of ``compiled(*args)``; stops early after ``max_seconds`` of timing."""
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times)


def fmt_bytes(n: float) -> str:
    if n != n:  # NaN
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns``."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, rows: list[dict[str, Any]], out_dir: str = "bench_out",
                  extra: dict[str, Any] | None = None) -> str:
    """Writes ``{out_dir}/{name}.json`` with the environment and rows; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"env": env_info(), "rows": rows, **(extra or {})}, f, indent=2)
    return path


def print_header(title: str) -> None:
    info = env_info()
    print(f"# {title}")
    print(", ".join(f"{k}={v}" for k, v in info.items()))
