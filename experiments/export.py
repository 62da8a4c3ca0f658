"""``archlab export RUN_DIR --out DIR``: an unsharded, single-host copy of a run's weights.

Reads a checkpoint (the newest, or ``--step``) after verifying its integrity manifest,
restores every array onto one local device whatever mesh it was saved from (orbax
reshards on restore), and writes

* ``DIR/params.npz``: numpy ``.npz`` (no orbax, no sharding), one array per parameter,
  keyed by its path joined with ``/`` (``params/layers/block_0/mixer/q``); the
  non-gradient ``state`` collection, if any, under ``state/...``;
* ``DIR/export.json``: the run's ``config.json`` contents, the step, and the format.

Load with ``numpy.load(DIR/params.npz)``; :func:`unflatten` rebuilds the nested dict
that ``model.apply({"params": ...})`` takes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from experiments import checkpoint as ckpt_lib
from experiments import rundir


def restore_unsharded(run_dir: str, step: int | None = None, device=None) -> tuple[int, dict]:
    """``(step, train-state tree)`` of a run's checkpoint with every array on ``device``
    (default: the first local device), whatever mesh it was saved on."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"{run_dir} has no checkpoints/ directory; is it an archlab run directory?")
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=1_000_000)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ValueError(f"{ckpt_dir} holds no checkpoint")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"--step {step}: no such checkpoint in {ckpt_dir}; saved steps: {steps}")
        ckpt.verify(step)
        sharding = SingleDeviceSharding(device or jax.local_devices()[0])
        meta = ocp.StandardCheckpointer().metadata(os.path.join(ckpt.step_dir(step), "default"))
        meta = getattr(meta, "item_metadata", meta)
        meta = getattr(meta, "tree", meta)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
        tree = ckpt.manager.restore(step, args=ocp.args.StandardRestore(target))
    finally:
        ckpt.close()
    return step, tree


def flatten(tree: Any, prefix: str) -> dict[str, np.ndarray]:
    """``{"prefix/a/b": array}`` of a nested dict of arrays."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        out["/".join([prefix, *keys])] = np.asarray(leaf)
    return out


def unflatten(flat: dict[str, np.ndarray], prefix: str = "params") -> dict:
    """The nested dict under ``prefix`` from :func:`flatten`'s keys."""
    out: dict = {}
    for key, value in flat.items():
        parts = key.split("/")
        if parts[0] != prefix:
            continue
        node = out
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = np.asarray(value)
    return out


def export(run_dir: str, out_dir: str, step: int | None = None) -> str:
    """Writes ``out_dir/params.npz`` and ``out_dir/export.json``; returns the npz path."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file, not a directory")
    if os.path.isdir(out_dir) and os.path.exists(os.path.join(out_dir, "params.npz")):
        raise ValueError(f"--out {out_dir} already holds params.npz; choose another --out")
    cfg_path = os.path.join(run_dir, "config.json")
    if not rundir.is_run_dir(run_dir) or not os.path.isfile(cfg_path):
        raise ValueError(f"{run_dir} is not an archlab run directory (no config.json)")
    step, tree = restore_unsharded(run_dir, step)
    arrays = {**flatten(tree["params"], "params"), **flatten(tree.get("state") or {}, "state")}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "params.npz")
    np.savez(path, **arrays)
    with open(cfg_path) as f:
        config = json.load(f)
    meta = {"format": "numpy npz, unsharded; keys are '/'-joined parameter paths",
            "step": step, "run_dir": os.path.abspath(run_dir), "config": config}
    rundir.write_atomic(os.path.join(out_dir, "export.json"), rundir.dumps(meta, indent=2))
    return path
