"""Shared machinery of the HuggingFace checkpoint mappings (docs/design.md).

A model type's mapping module (``archs/hf/<type>.py``) provides ``MODEL_TYPES`` and three
functions: ``config_from_hf(hf: dict) -> ModelConfig`` (refusing fields it cannot honour),
``config_to_hf(cfg) -> dict`` and ``tensor_map(cfg) -> list[Entry]``. An :class:`Entry` ties
one HF tensor name to one archlab parameter path (with the layer's repeat index for
scanned stacks) and the pair of array transforms between the two layouts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Keys of config.json that never change the computation of a causal LM forward pass.
IGNORED_KEYS = {
    "architectures", "dtype", "torch_dtype", "transformers_version", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "attention_dropout",
    "output_router_logits", "router_aux_loss_coef", "_name_or_path", "model_type",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "tokenizer_class", "_attn_implementation_autoset", "pretraining_tp",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """HF tensor ``hf`` <-> the slice ``index`` of archlab leaf ``path`` (``(repeat,)`` in a
    scanned stack, ``(repeat, expert)`` for one expert, ``()`` for the whole leaf);
    ``to_lab`` / ``to_hf`` convert layouts."""
    hf: str
    path: tuple[str, ...]
    index: tuple[int, ...]
    to_lab: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def linear(hf: str, path, index=()) -> Entry:
    """torch Linear ``[out, in]`` <-> flax kernel ``[in, out]``."""
    return Entry(hf, tuple(path), tuple(index), lambda w: w.T, lambda w: w.T)


def copy(hf: str, path, index=()) -> Entry:
    return Entry(hf, tuple(path), tuple(index), lambda w: w, lambda w: w)


def heads_in(hf: str, path, index, n: int, dh: int) -> Entry:
    """``[n*Dh, D]`` <-> ``[D, n, Dh]`` (q/k/v projections)."""
    return Entry(hf, tuple(path), tuple(index), lambda w: w.T.reshape(w.shape[1], n, dh),
                 lambda w: w.reshape(w.shape[0], n * dh).T)


def heads_bias(hf: str, path, index, n: int, dh: int) -> Entry:
    return Entry(hf, tuple(path), tuple(index), lambda b: b.reshape(n, dh), lambda b: b.reshape(n * dh))


def heads_out(hf: str, path, index, n: int, dh: int) -> Entry:
    """``[D, n*Dh]`` <-> ``[n, Dh, D]`` (output projection)."""
    return Entry(hf, tuple(path), tuple(index), lambda w: w.T.reshape(n, dh, w.shape[0]),
                 lambda w: w.reshape(n * dh, w.shape[2]).T)


def layer_path(cfg, layer: int, *rest: str) -> tuple[tuple[str, ...], tuple[int]]:
    """Archlab path and ``(repeat,)`` index of HF layer ``layer`` (scanned stacks)."""
    p = len(cfg.pattern)
    return ("layers", f"block_{layer % p}") + rest, (layer // p,)


# --- config.json ----------------------------------------------------------------------

def _json_hook(obj: dict) -> Any:
    # Mamba-2 writes non-finite floats as {"__float__": "Infinity"}.
    if set(obj) == {"__float__"}:
        return float(obj["__float__"])
    return obj


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text(), object_hook=_json_hook)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": "Infinity" if obj > 0 else ("-Infinity" if obj < 0 else "NaN")}
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_config(path: Path, hf: dict) -> None:
    (path / "config.json").write_text(json.dumps(_json_safe(hf), indent=2, sort_keys=True) + "\n")


class ConfigReader:
    """Reads config.json fields and refuses, by name, anything it was not asked about."""

    def __init__(self, hf: dict, model_type: str):
        self.hf, self.model_type, self.used = hf, model_type, set(IGNORED_KEYS)

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.hf.get(key, default)

    def require(self, key: str, allowed: tuple, default: Any = None) -> Any:
        """The value of ``key``, which must be one of ``allowed`` (ValueError otherwise)."""
        value = self.get(key, default)
        if value not in allowed:
            raise ValueError(f"{self.model_type} config field {key!r}={value!r} is not supported "
                             f"by archlab; allowed: {list(allowed)}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.hf) - self.used)
        if unknown:
            raise ValueError(f"{self.model_type} config fields {unknown} are not supported by "
                             "archlab's loader (refused rather than ignored)")


# --- RoPE -----------------------------------------------------------------------------

_ROPE_KEYS = {  # HF rope_type -> (archlab scaling, keys besides rope_type/rope_theta)
    "default": ("none", ()),
    "linear": ("linear", ("factor",)),
    "dynamic": ("dynamic", ("factor",)),
    "yarn": ("yarn", ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                      "attention_factor", "truncate")),
    "llama3": ("llama3", ("factor", "original_max_position_embeddings", "low_freq_factor",
                          "high_freq_factor")),
}


def rope_from_hf(r: ConfigReader):
    """``RopeConfig`` from v5 ``rope_parameters`` or v4 ``rope_theta`` / ``rope_scaling``."""
    from layers.positions import RopeConfig
    rp = r.get("rope_parameters")
    if rp is None:
        rp = dict(r.get("rope_scaling") or {})
        rp.setdefault("rope_theta", r.get("rope_theta", 10000.0))
    rp = dict(rp)
    if "type" in rp:
        rp.setdefault("rope_type", rp.pop("type"))
    rtype = rp.pop("rope_type", "default")
    if rtype not in _ROPE_KEYS:
        raise ValueError(f"{r.model_type} config field 'rope_type'={rtype!r} is not supported; "
                         f"allowed: {sorted(_ROPE_KEYS)}")
    scaling, keys = _ROPE_KEYS[rtype]
    fraction = rp.pop("partial_rotary_factor", r.get("partial_rotary_factor", 1.0))
    base = rp.pop("rope_theta")
    extra = sorted(set(rp) - set(keys))
    if extra:
        raise ValueError(f"{r.model_type} rope fields {extra} are not supported for rope_type "
                         f"{rtype!r} (allowed: {list(keys)})")
    if rp.get("truncate", True) is not True:
        raise ValueError(f"{r.model_type} rope field 'truncate'={rp['truncate']!r} is not "
                         "supported; allowed: [True]")
    mpe = r.get("max_position_embeddings", 2048)
    orig = rp.get("original_max_position_embeddings") or mpe
    factor = rp.get("factor")
    if factor is None:
        factor = mpe / orig if scaling == "yarn" else 1.0
    return RopeConfig(base=float(base), scaling=scaling, factor=float(factor),
                      original_max_len=int(orig), beta_fast=float(rp.get("beta_fast") or 32.0),
                      beta_slow=float(rp.get("beta_slow") or 1.0),
                      attention_factor=rp.get("attention_factor"),
                      low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
                      high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
                      fraction=float(fraction))


def rope_to_hf(rope) -> dict:
    """v5 ``rope_parameters`` for a ``RopeConfig``."""
    names = {v[0]: k for k, v in _ROPE_KEYS.items()}
    if rope.scaling not in names:
        raise ValueError(f"rope.scaling={rope.scaling!r} has no HF rope_type; allowed: {sorted(names)}")
    out: dict[str, Any] = {"rope_type": names[rope.scaling], "rope_theta": rope.base}
    if rope.scaling != "none":
        out["factor"] = rope.factor
    if rope.scaling in ("yarn", "llama3"):
        out["original_max_position_embeddings"] = rope.original_max_len
    if rope.scaling == "yarn":
        out.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow)
        if rope.attention_factor is not None:
            out["attention_factor"] = rope.attention_factor
    if rope.scaling == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.fraction != 1.0:
        out["partial_rotary_factor"] = rope.fraction
    return out
