"""Complete models: an explicit registry of presets (docs/conventions.md #6).

``preset(name, size="small", **overrides) -> ModelConfig``; ``names()``;
``build(config) -> flax.linen.Module``; ``generate(model, params, prompt, n)``.

Overrides may name a ``ModelConfig`` field (``n_layers=4``), ``short_conv``, or a field
of the mixers/FFNs in the pattern (``attn_impl="blockwise"``, ``window=64``), applied to
every block that has it; a field that components of several kinds have must be
qualified by kind (``**{"attention.n_heads": 8}``) -- see ``archs.config.override``.
"""

from __future__ import annotations

from typing import Callable

from archs.config import BlockSpec, ModelConfig, override
from archs.generate import generate
from archs.model import LM, DecodeCache
from archs.hf import from_hf, to_hf  # noqa: E402  (HF checkpoints: README "Loading published checkpoints")

# One module per family, each with its PRESETS: name -> (builder(size) -> ModelConfig, sizes).
from archs import (deepseek, efficient_attention, linear, llama, memory_attention, moe,  # noqa: E402
                   retnet, rwkv, sparse_attention, ssm)

PRESETS: dict[str, tuple[Callable[..., ModelConfig], tuple[str, ...]]] = {}
for _family in (llama, ssm, rwkv, retnet, linear, sparse_attention, memory_attention,
                efficient_attention, moe, deepseek):
    _clash = set(PRESETS) & set(_family.PRESETS)
    if _clash:
        raise ImportError(f"preset name(s) {sorted(_clash)} registered twice ({_family.__name__})")
    PRESETS.update(_family.PRESETS)


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
    cfg = override(builder(size), **overrides)
    cfg.validate()
    return cfg


def build(config: ModelConfig) -> LM:
    """Validates ``config`` and returns the (unbound) Flax module."""
    config.validate()
    return LM(config)


__all__ = ["BlockSpec", "DecodeCache", "ModelConfig", "PRESETS", "build", "from_hf", "generate",
           "names", "override", "preset", "sizes", "to_hf"]
