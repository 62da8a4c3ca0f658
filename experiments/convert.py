"""``archlab convert --from-hf DIR --out RUN_DIR``: a HuggingFace checkpoint as an archlab
init directory, and what ``archlab run --init-from RUN_DIR`` reads back.

RUN_DIR holds ``hf_config.json`` (the source ``config.json``, from which the archlab
``ModelConfig`` is rebuilt by ``archs/hf``), ``params/`` (an orbax checkpoint of the
parameter pytree, fp32) and, for models with non-gradient state (DeepSeek-V3's router
bias), ``state/``. ``--overwrite`` replaces only a directory that this command made
(it has ``hf_config.json`` and ``params/``); anything else is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from archs import hf as hf_lib
from archs.config import ModelConfig
from archs.hf import common


def convert_hf(hf_dir: str, out_dir: str, *, overwrite: bool = False) -> ModelConfig:
    """Reads ``hf_dir`` with ``archs.from_hf`` and writes RUN_DIR; returns the config."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file, not a directory")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise ValueError(f"--out {out_dir} exists and is not empty (pass --overwrite)")
        if not _is_convert_dir(out_dir):
            raise ValueError(f"--overwrite refused: {out_dir} was not made by archlab convert (no "
                             "hf_config.json and params/); archlab deletes only its own directories")
        shutil.rmtree(out_dir)
    cfg, params = hf_lib.from_hf(hf_dir)
    os.makedirs(out_dir, exist_ok=True)
    hf = common.read_config(Path(hf_dir))
    common.write_config(Path(out_dir), hf)
    os.replace(os.path.join(out_dir, "config.json"), os.path.join(out_dir, "hf_config.json"))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(os.path.join(out_dir, "params")), params["params"])
        if params.get("state"):
            ckptr.save(os.path.abspath(os.path.join(out_dir, "state")), params["state"])
    return cfg


def _is_convert_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "hf_config.json"))
            and os.path.isdir(os.path.join(path, "params")))


def init_config(run_dir: str) -> ModelConfig:
    """The ModelConfig of a converted RUN_DIR."""
    path = os.path.join(run_dir, "hf_config.json")
    if not os.path.exists(path):
        raise ValueError(f"--init-from {run_dir}: no hf_config.json (make it with archlab convert)")
    hf = json.loads(open(path).read(), object_hook=common._json_hook)
    cfg = hf_lib._mapping_for(hf.get("model_type")).config_from_hf(hf)
    cfg.validate()
    return cfg


def init_params(run_dir: str, abstract_params):
    """The converted parameters, restored with the shardings/dtypes of ``abstract_params``
    (a pytree of ShapeDtypeStructs or arrays shaped like the model's params)."""
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=getattr(x, "sharding", None)),
                          abstract_params)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(os.path.join(run_dir, "params")), target)


def init_state(run_dir: str, abstract_state):
    """The converted non-gradient state (None if the checkpoint has none), restored like
    :func:`init_params`."""
    if not os.path.isdir(os.path.join(run_dir, "state")) or not abstract_state:
        return None
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=getattr(x, "sharding", None)),
                          abstract_state)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(os.path.join(run_dir, "state")), target)
