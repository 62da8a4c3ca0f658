"""Complete models: an explicit registry of presets (STYLE.md #6).

``preset(name, size="small", **overrides) -> ModelConfig``; ``names()``;
``build(config) -> flax.linen.Module``; ``generate(model, params, prompt, n)``.

Overrides may name a ``ModelConfig`` field (``n_layers=4``) or a field of the
mixers/FFNs in the pattern (``impl="blockwise"``, ``window=64``, ``short_conv=4``),
applied to every block that has it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from archs.config import BlockSpec, ModelConfig, replace_in_blocks
from archs.generate import generate
from archs.llama import llama
from archs.model import LM, DecodeCache

# name -> (builder(size) -> ModelConfig, sizes)
PRESETS: dict[str, tuple[Callable[..., ModelConfig], tuple[str, ...]]] = {
    "llama": (llama, ("tiny", "small", "8b")),
}

# --- family registrations: each family inserts `from archs import fam` and
# `PRESETS.update(fam.PRESETS)` directly below its marker ---
# [linear-time mixers, issue 3]
from archs import linear, retnet, rwkv, ssm
PRESETS.update(ssm.PRESETS)
PRESETS.update(rwkv.PRESETS)
PRESETS.update(retnet.PRESETS)
PRESETS.update(linear.PRESETS)
# [sparse/local/memory attention, issue 4]
from archs import sparse
PRESETS.update(sparse.PRESETS)
# [mixture of experts, issue 5]
from archs import moe
PRESETS.update(moe.PRESETS)


def names() -> list[str]:
    return sorted(PRESETS)


def sizes(name: str) -> tuple[str, ...]:
    _check_name(name)
    return PRESETS[name][1]


def _check_name(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {names()}")


def preset(name: str, size: str = "small", **overrides) -> ModelConfig:
    """The named preset at ``size``, with ``overrides`` applied, validated."""
    _check_name(name)
    builder, valid_sizes = PRESETS[name]
    if size not in valid_sizes:
        raise ValueError(f"preset {name!r} has no size {size!r}; valid sizes: {list(valid_sizes)}")
    cfg = builder(size)
    top = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k in top})
    rest = {k: v for k, v in overrides.items() if k not in top}
    if rest:
        cfg = replace_in_blocks(cfg, **rest)
    cfg.validate()
    return cfg


def build(config: ModelConfig) -> LM:
    """Validates ``config`` and returns the (unbound) Flax module."""
    config.validate()
    return LM(config)


__all__ = ["BlockSpec", "DecodeCache", "ModelConfig", "PRESETS", "build", "generate", "names",
           "preset", "sizes"]
