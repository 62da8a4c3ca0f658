"""The run directory: what archlab may replace, resume or rebuild (docs/design.md).

* A run directory is recognised by the marker file ``.archlab-run`` written when
  archlab creates it (or, for runs made before the marker, a ``config.json`` with
  archlab's keys). ``--overwrite`` deletes only such a directory; anything else (a
  file, a non-empty directory of other things) is refused with the reason.
* ``metrics.jsonl`` and ``summary.json`` are strict JSON: non-finite numbers are
  written as ``null``. A damaged metrics row is reported with ``file:line``; a
  truncated last row (a crash mid-write) is dropped with a warning.
* ``summary.json`` is rebuilt from ``metrics.jsonl`` and the final checkpoint step,
  so a crash at any point leaves a run whose summary can be recovered by resuming.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from typing import Any

import jax
import numpy as np

from experiments.config import ExperimentConfig, to_jsonable

MARKER = ".archlab-run"
_CONFIG_KEYS = {"name", "model", "task", "optimizer", "schedule", "train", "eval", "mesh"}


class MetricsFileError(ValueError):
    """A row of metrics.jsonl is not valid JSON; names the file and the line."""


def is_run_dir(path: str) -> bool:
    """Whether ``path`` is a directory archlab created (marker, or archlab's config.json)."""
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, MARKER)):
        return True
    try:
        with open(os.path.join(path, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and _CONFIG_KEYS <= set(saved)


def prepare(cfg: ExperimentConfig, out_dir: str, resume: bool, overwrite: bool) -> None:
    """Checks ``out_dir`` against --resume/--overwrite and creates it; ValueError with the
    reason when it must not be touched. Nothing is deleted unless it is a run directory."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file, not a directory; choose another --out")
    exists = os.path.isdir(out_dir) and bool(os.listdir(out_dir))
    if exists and resume:
        check_resumable(cfg, out_dir)
        return
    if resume:
        raise ValueError(f"--resume: run directory {out_dir} does not exist or is empty")
    if exists and not overwrite:
        raise ValueError(f"run directory {out_dir} already exists and is not empty; pass --resume to "
                         "continue it, --overwrite to replace it, or choose another --out")
    if exists and not is_run_dir(out_dir):
        raise ValueError(f"--overwrite refused: {out_dir} is not an archlab run directory (no "
                         f"{MARKER} marker and no archlab config.json), so it is left untouched; "
                         "remove it yourself or choose another --out")
    sync("archlab-checked-run-dir")   # every process decided before process 0 changes anything
    if is_writer():   # multi-host runs share the directory: process 0 replaces and creates it
        if exists:
            shutil.rmtree(out_dir)
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:   # a path component is a file, no permission, ...
            raise ValueError(f"--out {out_dir} cannot be created: {e.strerror or e}") from e
        with open(os.path.join(out_dir, MARKER), "w") as f:
            f.write("archlab run directory: `archlab run --overwrite` may replace it\n")
    sync("archlab-prepare-run-dir")


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0 of a multi-host run)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier across processes (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def check_resumable(cfg: ExperimentConfig, out_dir: str) -> None:
    """ValueError unless ``out_dir`` holds a run of ``cfg`` (what defines the run is equal)."""
    cfg_path = os.path.join(out_dir, "config.json")
    if not is_run_dir(out_dir) or not os.path.isfile(cfg_path):
        raise ValueError(f"--resume: {out_dir} has no config.json; it is not an archlab run directory")
    try:
        with open(cfg_path) as f:
            saved = json.load(f)
    except ValueError as e:
        raise ValueError(f"--resume: {cfg_path} is not valid JSON: {e}") from e
    now = to_jsonable(cfg)
    # train.steps / eval / logging may change on resume; what defines the run may not.
    for key in ("model", "task", "optimizer", "schedule", "mesh"):
        if saved.get(key) != now[key]:
            raise ValueError(f"--resume: {key} in {cfg_path} differs from the current config; "
                             "resume needs the same run (use a new --out, or --overwrite)")
    for key in ("seed", "batch_size", "segment_len", "loss_on_all_tokens"):
        if saved["train"].get(key) != now["train"][key]:
            raise ValueError(f"--resume: train.{key}={now['train'][key]!r} differs from the saved "
                             f"{saved['train'].get(key)!r} in {cfg_path}")


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file (never a half-written file);
    process 0 only."""
    if not is_writer():
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- strict JSON

def strict(value: Any) -> Any:
    """``value`` with non-finite floats (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: Any, **kw) -> str:
    """Strict JSON (``allow_nan=False``) of ``value`` after :func:`strict`."""
    return json.dumps(strict(value), allow_nan=False, **kw)


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` ([] if absent). A damaged row raises
    MetricsFileError with ``file:line``; a truncated last row is dropped with a warning."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "step" not in row or "split" not in row:
                raise ValueError("not a metrics row (an object with 'split' and 'step')")
        except ValueError as e:
            if i == len(lines) and not line.endswith("\n"):
                warnings.warn(f"{path}:{i}: the last row is truncated (a crash while writing it); "
                              "it is dropped", stacklevel=2)
                continue
            raise MetricsFileError(f"{path}:{i}: damaged metrics row: {e}") from e
        rows.append(row)
    return rows


def truncate_metrics(run_dir: str, step: int) -> None:
    """Keeps the metric rows up to ``step`` (a resumed run rewrites the later ones)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        rows = [r for r in read_metrics(run_dir) if r["step"] <= step]
        write_atomic(path, "".join(dumps(r) + "\n" for r in rows))


def build_summary(run_dir: str, name: str, n_params: int, final_step: int | None) -> dict[str, Any]:
    """``summary.json`` from metrics.jsonl and the final checkpoint step; written atomically."""
    rows = [r for r in read_metrics(run_dir) if final_step is None or r["step"] <= final_step]
    evals = [r for r in rows if r["split"] == "eval"]
    last = max((r["step"] for r in evals), default=None)
    tok_s = next((r.get("tokens_per_s") for r in reversed(rows)
                  if r["split"] == "train" and r.get("tokens_per_s") is not None), None)
    skipped = sum(r.get("skipped_steps", 0) or 0 for r in rows if r["split"] == "train")
    summary = {"name": name, "params": n_params, "steps": final_step,
               "eval": {int(r["length"]): r["accuracy"] for r in evals if r["step"] == last},
               "tokens_per_s": tok_s, "skipped_steps": skipped}
    write_atomic(os.path.join(run_dir, "summary.json"), dumps(summary, indent=2))
    return summary


class MetricsLog:
    """Appends strict-JSON rows to metrics.jsonl; train throughput excludes compile and eval."""

    def __init__(self, out_dir: str, tokens_per_step: int):
        self.f = open(os.path.join(out_dir, "metrics.jsonl") if is_writer() else os.devnull, "a")
        self.tokens_per_step, self.t_last, self.steps_since = tokens_per_step, time.perf_counter(), 0

    def step_done(self):
        self.steps_since += 1

    def train_row(self, done, metrics, skipped, first) -> dict:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        tok_s = None if first else self.tokens_per_step * self.steps_since / (now - self.t_last)
        self.t_last, self.steps_since = now, 0
        row = {"split": "train", "step": done, "tokens_per_s": tok_s,
               **{k: _to_list(v) for k, v in metrics.items() if k != "nonfinite"}}
        if skipped is not None:
            row["skipped_steps"] = skipped
        self._write(row)
        return {k: (float("nan") if v is None else v) for k, v in strict(row).items()}

    def eval_rows(self, done, final_eval):
        for length, (acc, loss) in final_eval.items():
            self._write({"split": "eval", "step": done, "length": length, "accuracy": acc, "loss": loss})
        self.t_last = time.perf_counter()  # eval time is not train throughput

    def _write(self, row):
        self.f.write(dumps(row) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


def _to_list(v):
    v = np.asarray(v)
    return float(v) if v.ndim == 0 else v.tolist()
