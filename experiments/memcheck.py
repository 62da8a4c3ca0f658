"""Memory pre-check: refuse a compiled step that cannot fit before running it.

XLA's ``compiled.memory_analysis()`` gives per-device bytes of the step's arguments,
outputs (less those aliased to donated arguments) and temporaries. On an accelerator
the step must fit in ``device.memory_stats()["bytes_limit"]``; on CPU the devices share
the host's RAM, so what the step allocates beyond its (already resident) arguments,
times the local devices, must fit in the available RAM (``MemAvailable`` in
/proc/meminfo, else ``os.sysconf``).
"""

from __future__ import annotations

import os

import jax

GIB = 1 << 30


def check_fits(compiled, what: str, mesh) -> None:
    """ValueError with the numbers when ``compiled`` needs more memory than there is."""
    try:
        m = compiled.memory_analysis()
    except Exception:   # not every backend implements it
        return
    if m is None:
        return
    new = max(m.output_size_in_bytes - m.alias_size_in_bytes, 0) + m.temp_size_in_bytes
    total = m.argument_size_in_bytes + new
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    dev = devices[0]
    stats = _memory_stats(dev)
    if stats and stats.get("bytes_limit"):
        limit = stats["bytes_limit"]
        if total > limit:
            raise ValueError(
                f"the {what} needs {total / GIB:.2f} GiB per device ({m.temp_size_in_bytes / GIB:.2f} GiB "
                f"temporaries, {m.argument_size_in_bytes / GIB:.2f} GiB arguments, "
                f"{(new - m.temp_size_in_bytes) / GIB:.2f} GiB new outputs) but {dev.device_kind} "
                f"{dev.id} has {limit / GIB:.2f} GiB; lower train.batch_size or shard more (mesh)")
        return
    if dev.platform != "cpu":
        return
    need, avail = new * len(devices), host_available_bytes()
    if avail is not None and need > avail:
        raise ValueError(
            f"the {what} would allocate {need / GIB:.2f} GiB of host memory ({len(devices)} CPU "
            f"device(s) x {new / GIB:.2f} GiB: {m.temp_size_in_bytes / GIB:.2f} GiB temporaries + "
            f"{(new - m.temp_size_in_bytes) / GIB:.2f} GiB outputs) but only {avail / GIB:.2f} GiB "
            "is available; lower train.batch_size (or task.seq_len / the model size)")


def _memory_stats(dev):
    try:
        return dev.memory_stats()
    except Exception:
        return None


def host_available_bytes() -> int | None:
    """Available host RAM in bytes (None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
