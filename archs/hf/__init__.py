"""Loading and writing HuggingFace checkpoints (``config.json`` + ``*.safetensors``).

``from_hf(path) -> (ModelConfig, params)`` and ``to_hf(cfg, params, path)``; ``params`` is
the ``{"params": ...}`` variables dict of ``archs.build(cfg)``. Model types are mapping
modules registered in :data:`MAPPINGS` (see ``archs/hf/common.py`` for what one provides).
Reads and writes with ``safetensors.numpy``; torch is not needed. The README section
"Loading published checkpoints" lists the supported types and their measured errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import flax
import jax
import jax.numpy as jnp
import numpy as np

from archs.config import ModelConfig
from archs.hf import common, deepseek_v3, jamba, llama, mamba, moe

MAPPINGS: dict[str, ModuleType] = {}
for _module in (llama, moe, mamba, jamba, deepseek_v3):
    for _type in _module.MODEL_TYPES:
        MAPPINGS[_type] = _module


def _mapping_for(model_type) -> ModuleType:
    if model_type not in MAPPINGS:
        raise ValueError(f"config field 'model_type'={model_type!r} is not supported; "
                         f"allowed: {sorted(MAPPINGS)}")
    return MAPPINGS[model_type]


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a model directory (one ``model.safetensors`` or the shards of
    ``model.safetensors.index.json``)."""
    from safetensors.numpy import load_file
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(str(path / f)))
    return tensors


def _abstract_params(cfg: ModelConfig) -> dict:
    from archs import build
    model = build(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    return flax.traverse_util.flatten_dict(flax.core.meta.unbox(shapes)["params"])


def from_hf(path) -> tuple[ModelConfig, dict]:
    """Reads a HuggingFace model directory into ``(ModelConfig, {"params": ...})`` (plus
    ``"state"`` for mappings with a ``state_map``, e.g. DeepSeek-V3's router bias) (fp32
    numpy leaves cast to the config's param dtype). Unsupported config fields, unknown or
    missing tensors and shape mismatches raise ValueError naming them."""
    path = Path(path)
    hf = common.read_config(path)
    mapping = _mapping_for(hf.get("model_type"))
    cfg = mapping.config_from_hf(hf)
    cfg.validate()
    tensors = read_tensors(path)
    shapes = _abstract_params(cfg)
    stacks = {p: np.zeros(s.shape, s.dtype) for p, s in shapes.items()}
    filled: dict[tuple, int] = {}
    entries = mapping.tensor_map(cfg)
    unknown = sorted(set(tensors) - {e.hf for e in entries + _state_map(mapping, cfg)})
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:8]} have no archlab counterpart")
    for e in entries:
        if e.hf not in tensors:
            raise ValueError(f"{path}: tensor {e.hf!r} is missing")
        if e.path not in stacks:
            raise ValueError(f"mapping error: archlab parameter {'/'.join(e.path)} does not exist")
        value = np.asarray(e.to_lab(tensors[e.hf].astype(np.float32)))
        target = stacks[e.path][e.index] if e.index else stacks[e.path]
        if value.shape != target.shape:
            raise ValueError(f"{path}: tensor {e.hf!r} maps to shape {value.shape}, archlab "
                             f"parameter {'/'.join(e.path)} needs {target.shape}")
        if e.index:
            target[...] = value
        else:
            stacks[e.path] = value.astype(target.dtype)
        filled[e.path] = filled.get(e.path, 0) + 1
    missing = sorted("/".join(p) for p in stacks if p not in filled)
    if missing:
        raise ValueError(f"mapping error: archlab parameters {missing} were not filled")
    variables = {"params": flax.traverse_util.unflatten_dict(stacks)}
    if _state_map(mapping, cfg):
        variables["state"] = _load_state(mapping, cfg, tensors, path)
    return cfg, variables


def _state_map(mapping: ModuleType, cfg: ModelConfig) -> list:
    """Entries of the non-gradient ``state`` collection (a mapping's optional ``state_map``,
    e.g. DeepSeek-V3's router selection bias); [] for most model types."""
    return mapping.state_map(cfg) if hasattr(mapping, "state_map") else []


def _load_state(mapping: ModuleType, cfg: ModelConfig, tensors: dict, path: Path) -> dict:
    """The ``state`` collection; an entry with ``index=(repeat,)`` fills one repeat of a
    ``[n_repeats, ...]`` leaf."""
    flat: dict[tuple, np.ndarray] = {}
    for e in _state_map(mapping, cfg):
        if e.hf not in tensors:
            raise ValueError(f"{path}: tensor {e.hf!r} is missing")
        value = np.asarray(e.to_lab(tensors[e.hf].astype(np.float32)))
        if not e.index:
            flat[e.path] = value
            continue
        flat.setdefault(e.path, np.zeros((cfg.n_repeats,) + value.shape, np.float32))[e.index] = value
    return flax.traverse_util.unflatten_dict(flat)


def to_hf(cfg: ModelConfig, params: dict, path) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (fp32) for ``cfg`` and ``params``."""
    from safetensors.numpy import save_file
    mapping = _mapping_for(_model_type(cfg))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(params)["params"])
    tensors = {}
    for e in mapping.tensor_map(cfg):
        leaf = np.asarray(flat[e.path], np.float32)
        value = leaf[e.index] if e.index else leaf
        tensors[e.hf] = np.ascontiguousarray(e.to_hf(value))
    state = flax.traverse_util.flatten_dict(params.get("state", {}))
    for e in _state_map(mapping, cfg):
        leaf = np.asarray(state[e.path], np.float32)
        tensors[e.hf] = np.ascontiguousarray(e.to_hf(leaf[e.index] if e.index else leaf))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    common.write_config(path, mapping.config_to_hf(cfg))


def _model_type(cfg: ModelConfig) -> str:
    """The HF model type ``to_hf`` writes: the config's name when it is one of MAPPINGS."""
    name = cfg.name.removeprefix("hf_")
    if name not in MAPPINGS:
        raise ValueError(f"model.name={cfg.name!r}: to_hf writes only configs loaded by from_hf "
                         f"(names hf_<type>, type one of {sorted(MAPPINGS)})")
    return name


__all__ = ["MAPPINGS", "from_hf", "read_tensors", "to_hf"]
