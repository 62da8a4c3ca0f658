"""``archlab aot``: resolve configs, compile for a target, tabulate (Markdown + JSON).

``CONFIG_OR_PRESET`` is an experiment file (its runs, ``--smoke``/``--only`` as in
``archlab run``) or a preset ``NAME[:SIZE]`` (``llama:8b``). A preset becomes a run
with sequence length ``model.max_len``, one sequence per device and the mesh
``fsdp=-1, data=1`` (parameters and optimizer state sharded over every device);
``--set`` overrides any of it (``--set task.seq_len=4096 --set mesh.tensor=4``).

Configuration errors (unknown target, a mesh that does not divide the devices, a
batch that does not divide the data-parallel axes) raise ValueError before
anything compiles; a compile that fails (e.g. the TPU compiler's out-of-memory
error) becomes a row saying so, with the compiler's reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from experiments import config as config_lib
from experiments.aot import targets as targets_lib

GiB = 2 ** 30


def preset_config(spec: str, n_devices: int) -> config_lib.ExperimentConfig:
    """``NAME[:SIZE]`` -> an ExperimentConfig for compiling (module docstring)."""
    import archs
    from experiments.tasks import make_task
    name, _, size = spec.partition(":")
    model = archs.preset(name, size or "small")
    task = make_task("mqar", seq_len=model.max_len, vocab_size=model.vocab_size)
    return config_lib.ExperimentConfig(
        name=f"{name}-{size or 'small'}", model=model, task=task,
        train=config_lib.TrainConfig(steps=1000, batch_size=n_devices),
        eval=config_lib.EvalConfig(batch_size=n_devices),
        mesh=config_lib.MeshConfig(data=1, fsdp=-1))


def resolve(spec: str, n_devices: int, overrides: list[str], smoke=False, only=None):
    """The runs to compile, overrides applied and validated."""
    if spec.endswith(".py") or os.path.sep in spec:
        runs = config_lib.load_experiment_file(spec, smoke=smoke)
    else:
        runs = [preset_config(spec, n_devices)]
    if only:
        wanted = set(only.split(","))
        unknown = wanted - {r.name for r in runs}
        if unknown:
            raise ValueError(f"--only: unknown run name(s) {sorted(unknown)}; runs: {[r.name for r in runs]}")
        runs = [r for r in runs if r.name in wanted]
    runs = [config_lib.with_overrides(r, overrides) for r in runs]
    for r in runs:
        r.validate()
    return runs


def compile_run(cfg, target, devices, *, decode: bool = True) -> dict:
    """One row: train (and decode) step compiled for ``target``; failures recorded."""
    from experiments import mesh as mesh_lib
    from experiments import train
    from experiments.aot import compile as compile_lib
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    train.check_batch_divisible(cfg, mesh)
    row = {"name": cfg.name, **targets_lib.describe(target), "mesh": dict(mesh.shape),
           "seq_len": cfg.task.seq_len, "batch": cfg.train.batch_size, "remat": cfg.model.remat,
           "dtype": cfg.model.dtype}
    row["train"] = _attempt(lambda: compile_lib.compile_train(cfg, mesh, target))
    if decode:
        row["decode"] = _attempt(lambda: compile_lib.compile_decode(
            cfg, mesh, target, cfg.train.batch_size, cfg.task.seq_len))
    return row


def _attempt(fn) -> dict:
    try:
        return fn()
    except ValueError:
        raise
    except Exception as e:  # a compiler error is a finding (e.g. out of HBM), not a crash
        msg = str(e).strip().splitlines()
        text = " ".join(msg[:3])[:600] if msg else type(e).__name__
        oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
        row = {"error": text, "fits": False if oom else None, "does_not_compile": not oom}
        # The TPU compiler's OOM message: "... HLO temporaries (173.46G) exceeds available HBM (95.73G)"
        m = re.search(r"\(([\d.]+)([GM])\) exceeds available HBM \(([\d.]+)([GM])\)", text)
        if m:
            unit = {"G": GiB, "M": 2 ** 20}
            row["required_bytes"] = float(m.group(1)) * unit[m.group(2)]
            row["available_bytes"] = float(m.group(3)) * unit[m.group(4)]
        return row


def search_batch(cfg, target, devices, max_per_device: int = 1024) -> tuple[int, dict | None]:
    """Largest power-of-two per-device batch whose train step fits; (0, None) if none."""
    from experiments import mesh as mesh_lib
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    dp = mesh_lib.batch_axis_size(mesh, cfg.mesh)
    best, best_row, b = 0, None, 1
    while b <= max_per_device:
        trial = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=b * dp),
                                    eval=dataclasses.replace(cfg.eval, batch_size=b * dp))
        row = compile_run(trial, target, devices, decode=False)
        if not row["train"].get("fits"):
            break
        best, best_row, b = b, row, b * 2
    return best, best_row


def _gib(x) -> str:
    return f"{x / GiB:.1f}"


def markdown(rows: list[dict]) -> str:
    """The report table: one line per run (train step; decode step when compiled)."""
    head = ("| run | target | mesh | T | B | params | args GiB | temp GiB | total / HBM GiB | fits "
            "(headroom) | collectives (count, GiB moved) | TFLOP/dev | step >= s | MFU <= | bound | "
            "decode total GiB | decode step >= ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mesh = ",".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
        t = r["train"]
        cells = [r["name"], r["target"], mesh, str(r["seq_len"]), str(r["batch"])]
        if "error" in t:
            what = "does not fit" if t.get("fits") is False else "does not compile"
            need = (f" (temporaries alone {_gib(t['required_bytes'])} of {_gib(t['available_bytes'])} GiB)"
                    if "required_bytes" in t else "")
            cells += [""] * 4 + [f"**{what}**{need}: {t['error'][:160]}"] + [""] * 7
        else:
            m, rf = t["memory"], t["roofline"]
            colls = ", ".join(f"{c['kind']}{'(x-host)' if c['cross_host'] else ''} {c['count']}, "
                              f"{c['bytes'] / GiB:.1f}" for c in t["collectives"]) or "none"
            fits = ("yes" if t["fits"] else "**NO**") + f" ({_gib(t['headroom_bytes'])})"
            cells += [f"{t['params'] / 1e9:.2f}B", _gib(m["argument_bytes"]), _gib(m["temp_bytes"]),
                      f"{_gib(m['total_bytes'])} / {_gib(t['hbm_bytes'])}", fits, colls,
                      f"{t['model_flops_per_device'] / 1e12:.1f}", f"{rf['step_s']:.3f}",
                      f"{rf['mfu']:.2f}", rf["bound"]]
            d = r.get("decode")
            if d is None:
                cells += ["", ""]
            elif "error" in d:
                cells += [f"error: {d['error'][:80]}", ""]
            else:
                cells += [_gib(d["memory"]["total_bytes"]) + ("" if d["fits"] else " (NO)"),
                          f"{d['roofline']['step_s'] * 1e3:.2f}"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write(rows: list[dict], out: str | None) -> None:
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(rows, f, indent=2, default=float)
