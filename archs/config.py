"""Model configuration: a model is an embedding, ``n_layers`` residual pre-norm blocks
built from a repeating ``pattern`` of :class:`BlockSpec`, a final norm and a (tied) head.

The pattern is the *repeating group*: Llama is ``(attention+swiglu,)``, Jamba is
``(mamba+ffn, mamba+moe, mamba+ffn, attention+moe, ...)``. ``n_layers`` must be a
multiple of ``len(pattern)``; with ``scan_layers`` the stack runs as ``nn.scan``
over ``n_layers / len(pattern)`` groups, so compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from layers.attention import AttentionConfig
from layers.ffn import FFNConfig
from layers.mixer import MixerConfig, one_of, positive
from layers.norms import NORMS

REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One residual block: ``x + mixer(conv?(norm(x)))`` then ``x + ffn(norm(x))``.

    ``short_conv``: width of a causal depthwise conv placed before the mixer
    (0 = off; the "BASED recipe" / H3 short conv). ``ffn=None``: no FFN sub-block
    (Mamba-style stacks).
    """
    mixer: MixerConfig = AttentionConfig()
    ffn: Any = FFNConfig()
    short_conv: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "llama"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    pattern: tuple[BlockSpec, ...] = (BlockSpec(),)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    scan_layers: bool = True
    remat: str = "none"          # one of REMAT_POLICIES
    dtype: str = "float32"       # compute dtype
    param_dtype: str = "float32"
    max_len: int = 2048          # longest sequence / cache the model accepts

    @property
    def n_groups(self) -> int:
        return self.n_layers // len(self.pattern)

    @property
    def causal(self) -> bool:
        # An FFN can break causality too (MoE expert-choice routing sees the whole sequence).
        return all(b.mixer.causal and getattr(b.ffn, "causal", True) for b in self.pattern)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def validate(self, path: str = "model") -> None:
        """Raises ValueError naming the field, its value and what is allowed."""
        positive(f"{path}.vocab_size", self.vocab_size)
        positive(f"{path}.d_model", self.d_model)
        positive(f"{path}.n_layers", self.n_layers)
        positive(f"{path}.max_len", self.max_len)
        one_of(f"{path}.norm", self.norm, sorted(NORMS))
        one_of(f"{path}.remat", self.remat, REMAT_POLICIES)
        one_of(f"{path}.dtype", self.dtype, DTYPES)
        one_of(f"{path}.param_dtype", self.param_dtype, DTYPES)
        if not self.pattern:
            raise ValueError(f"{path}.pattern is empty; give at least one BlockSpec")
        if self.n_layers % len(self.pattern):
            raise ValueError(f"{path}.n_layers={self.n_layers} must be a multiple of the pattern "
                             f"length {len(self.pattern)}")
        for i, spec in enumerate(self.pattern):
            if not isinstance(spec, BlockSpec):
                raise ValueError(f"{path}.pattern.{i}={spec!r} must be a BlockSpec")
            if not isinstance(spec.mixer, MixerConfig):
                raise ValueError(f"{path}.pattern.{i}.mixer={spec.mixer!r} must be a MixerConfig")
            spec.mixer.validate(self.d_model, f"{path}.pattern.{i}.mixer")
            if spec.ffn is not None:
                spec.ffn.validate(self.d_model, f"{path}.pattern.{i}.ffn")
            if spec.short_conv < 0 or spec.short_conv == 1:
                raise ValueError(f"{path}.pattern.{i}.short_conv={spec.short_conv} must be 0 (off) or >= 2")


def replace_in_blocks(cfg: ModelConfig, **fields) -> ModelConfig:
    """Sets ``fields`` on every mixer/FFN/BlockSpec in the pattern that has them.

    Used by ``archs.preset(name, impl="blockwise")``-style overrides. A field that no
    part of the model has raises ValueError listing what is settable.
    """
    unused = set(fields)
    blocks = []
    for spec in cfg.pattern:
        mix_f = {k: v for k, v in fields.items() if k in _field_names(spec.mixer)}
        ffn_f = {k: v for k, v in fields.items() if spec.ffn is not None and k in _field_names(spec.ffn)}
        blk_f = {k: v for k, v in fields.items() if k in ("short_conv",)}
        unused -= set(mix_f) | set(ffn_f) | set(blk_f)
        spec = dataclasses.replace(spec, mixer=dataclasses.replace(spec.mixer, **mix_f), **blk_f)
        if ffn_f:
            spec = dataclasses.replace(spec, ffn=dataclasses.replace(spec.ffn, **ffn_f))
        blocks.append(spec)
    if unused:
        settable = sorted(set(_field_names(cfg)) | {f for s in cfg.pattern for f in
                          _field_names(s.mixer) + (_field_names(s.ffn) if s.ffn else []) + ["short_conv"]})
        raise ValueError(f"unknown override(s) {sorted(unused)} for preset {cfg.name!r}; "
                         f"settable: {settable}")
    return dataclasses.replace(cfg, pattern=tuple(blocks))


def _field_names(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]
