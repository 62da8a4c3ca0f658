"""``archlab report RUN_DIR...``: compare runs side by side.

Writes ``report.md`` (a markdown table: architecture, params, training length, final
loss, evaluation accuracy per length, throughput; and, when several runs share a
``cell`` — e.g. the learning rates of one sweep setting — the best run per cell, as
Zoology reports) and matplotlib PNGs: accuracy per architecture vs sequence length,
training-loss curves, throughput, and scalar diagnostics (aux losses, MoE load CV, ...).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

import numpy as np

from experiments import rundir


def load_run(run_dir: str) -> dict[str, Any]:
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{run_dir} is not an archlab run directory (no config.json)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except ValueError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    # strict JSON stores non-finite numbers as null; plots and tables want NaN
    rows = [{k: (float("nan") if v is None else v) for k, v in r.items()}
            for r in rundir.read_metrics(run_dir)]
    summary = {}
    spath = os.path.join(run_dir, "summary.json")
    if os.path.exists(spath):
        try:
            with open(spath) as f:
                summary = json.load(f)
        except ValueError as e:
            raise ValueError(f"{spath} is not valid JSON ({e}); resuming the run rebuilds it") from e
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    last_step = max((r["step"] for r in evals), default=None)
    final_eval = {r["length"]: r["accuracy"] for r in evals if r["step"] == last_step}
    return {"dir": run_dir, "name": cfg["name"], "cell": cfg.get("cell", ""),
            "arch": cfg.get("arch") or cfg["model"]["name"], "cfg": cfg, "train": train,
            "evals": evals, "final_eval": final_eval, "params": summary.get("params"),
            "train_len": cfg["task"]["seq_len"], "task": cfg["task"]["__class__"],
            "lr": cfg["optimizer"]["lr"],
            "final_loss": train[-1]["loss"] if train else float("nan"),
            "tokens_per_s": next((r["tokens_per_s"] for r in reversed(train)
                                  if r.get("tokens_per_s") == r.get("tokens_per_s")), float("nan"))}


def _score(run) -> float:
    return float(np.mean(list(run["final_eval"].values()))) if run["final_eval"] else -1.0


def best_per_cell(runs: list[dict]) -> list[dict]:
    """One run per non-empty cell (highest mean final eval accuracy); runs without a cell kept."""
    cells, out = defaultdict(list), []
    for r in runs:
        (cells[r["cell"]].append(r) if r["cell"] else out.append(r))
    out += [max(c, key=_score) for c in cells.values()]
    return sorted(out, key=lambda r: (r["arch"], r["train_len"], r["name"]))


def _table(runs: list[dict], lengths: list[int]) -> str:
    head = ["run", "arch", "task", "params", "train len", "lr", "final loss"] + \
           [f"acc@{n}" for n in lengths] + ["tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        accs = [f"{r['final_eval'][n]:.3f}" if n in r["final_eval"] else "" for n in lengths]
        params = f"{r['params'] / 1e3:.0f}K" if r["params"] else "?"
        lines.append("| " + " | ".join([r["name"], r["arch"], r["task"], params, str(r["train_len"]),
                                        f"{r['lr']:g}", f"{r['final_loss']:.3f}", *accs,
                                        f"{r['tokens_per_s']:,.0f}"]) + " |")
    return "\n".join(lines)


def write_report(run_dirs: list[str], out_dir: str, title: str = "archlab report") -> str:
    """Writes ``out_dir/report.md`` and PNGs for ``run_dirs``; returns the report path."""
    runs = [load_run(d) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    lengths = sorted({n for r in runs for n in r["final_eval"]})
    best = best_per_cell(runs)
    md = [f"# {title}", "", f"{len(runs)} run(s). Accuracy is on scored positions of the "
          "evaluation stream at the end of training.", ""]
    if len(best) < len(runs):
        md += ["## Best run per cell (over the cell's learning rates)", "", _table(best, lengths), "",
               "## All runs", ""]
    md += [_table(runs, lengths), ""]
    plots = _plots(runs, best, out_dir)
    md += [f"![{p}]({p})" for p in plots]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    return path


def _plots(runs, best, out_dir) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # accuracy vs sequence length per architecture (best run per cell)
    fig, ax = plt.subplots(figsize=(6, 4))
    by_arch = defaultdict(dict)
    for r in best:
        for n, acc in r["final_eval"].items():
            by_arch[r["arch"]][n] = max(acc, by_arch[r["arch"]].get(n, -1))
    for arch, pts in sorted(by_arch.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=arch)
    ax.set(xlabel="sequence length", ylabel="accuracy", ylim=(-0.02, 1.02),
           title="Accuracy per architecture vs sequence length")
    if by_arch:
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    written.append(_save(fig, out_dir, "accuracy_vs_length.png"))
    # loss curves
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        if r["train"]:
            ax.plot([t["step"] for t in r["train"]], [t["loss"] for t in r["train"]], label=r["name"])
    ax.set(xlabel="step", ylabel="train loss", yscale="log", title="Training loss")
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir, "loss.png"))
    # throughput
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(runs) + 1.5))
    ax.barh([r["name"] for r in runs], [r["tokens_per_s"] for r in runs])
    ax.set(xlabel="train tokens / s", title="Throughput")
    written.append(_save(fig, out_dir, "throughput.png"))
    # diagnostics / aux losses over training; array-valued ones (per layer, per expert:
    # e.g. moe_load [E]) as their mean with a min-max band, so a load imbalance shows as a
    # wide band instead of averaging away to 1/E
    keys = sorted({k for r in runs for t in r["train"] for k in t if k.startswith(("aux/", "diag/"))})
    keys = [k for k in keys if all(np.asarray(t[k]).size <= 64 for r in runs for t in r["train"] if k in t)]
    if keys:
        fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.2 * len(keys)), squeeze=False)
        for ax, k in zip(axes[:, 0], keys):
            for r in runs:
                steps, mean, lo, hi = diagnostic_series(r["train"], k)
                if not steps:
                    continue
                line, = ax.plot(steps, mean, label=r["name"])
                if lo != hi:
                    ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
            ax.set(title=k, xlabel="step")
        axes[0, 0].legend(fontsize=7)
        written.append(_save(fig, out_dir, "diagnostics.png"))
    return written


def diagnostic_series(train_rows: list[dict], key: str):
    """``(steps, mean, min, max)`` of one diagnostic over training; for array values
    (per layer, per expert) the statistics run over all elements of each logged value."""
    pts = [(t["step"], np.asarray(t[key], dtype=np.float64)) for t in train_rows if key in t]
    return ([p for p, _ in pts], [float(v.mean()) for _, v in pts],
            [float(v.min()) for _, v in pts], [float(v.max()) for _, v in pts])


def _save(fig, out_dir, name) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return name
