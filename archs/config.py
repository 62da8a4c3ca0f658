"""Model configuration: a model is an embedding, ``n_layers`` residual pre-norm blocks
built from a repeating ``pattern`` of :class:`BlockSpec`, a final norm and a (tied) head.

The pattern is the *repeating unit* of the stack: Llama is ``(attention+swiglu,)``,
Jamba is ``(mamba+ffn, mamba+moe, mamba+ffn, attention+moe, ...)``. ``n_layers`` must be
a multiple of ``len(pattern)``; with ``scan_layers`` the stack runs as ``nn.scan``
over ``n_repeats = n_layers / len(pattern)`` repeats, so compile time does not grow
with depth.

Overrides (``archs.preset(name, size, **overrides)`` and :func:`override`) name a
``ModelConfig`` field, a ``BlockSpec`` field (``short_conv``), or a field of the
mixers/FFNs in the pattern. A field name that components of more than one kind have
(``n_heads`` in a hybrid of attention and RetNet; ``hidden`` of ``ffn`` and ``moe``)
is refused with the list of places it could go; qualify it with the component's
kind: ``{"attention.n_heads": 8}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from layers.attention import AttentionConfig
from layers.contracts import FeedForwardConfig, MixerConfig, in_range, one_of, positive
from layers.ffn import FFNConfig
from layers.norms import NORMS

REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
# The tied head's logit scale: "none" (h @ E^T, the published models) or "rsqrt_d"
# (h @ E^T / sqrt(D), logits O(1) with the unit-variance table init).
TIED_HEAD_SCALES = ("none", "rsqrt_d")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One residual block: ``x + mixer(conv?(norm(x)))`` then ``x + ffn(norm(x))``.

    ``short_conv``: width of a causal depthwise conv placed before the mixer
    (0 = off; the "BASED recipe" / H3 short conv). ``ffn=None``: no FFN sub-block
    (Mamba-style stacks).
    """
    mixer: MixerConfig = AttentionConfig()
    ffn: FeedForwardConfig | None = FFNConfig()
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
    tied_head_scale: str = "none"  # one of TIED_HEAD_SCALES: "none" = h @ E^T (Llama-3, Mamba)
    embed_norm: bool = False       # a norm right after the embedding (RWKV's ln0)
    scan_layers: bool = True
    remat: str = "none"          # one of REMAT_POLICIES
    dtype: str = "float32"       # compute dtype
    param_dtype: str = "float32"
    max_len: int = 2048          # longest sequence / cache the model accepts

    @property
    def n_repeats(self) -> int:
        """How many times the pattern repeats (the ``nn.scan`` length)."""
        return self.n_layers // len(self.pattern)

    @property
    def causal(self) -> bool:
        # An FFN can break causality too (MoE expert-choice routing sees the whole sequence).
        return all(b.mixer.causal and (b.ffn is None or b.ffn.causal) for b in self.pattern)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def validate(self, path: str = "model") -> None:
        """Raises ValueError naming the field, its value and what is allowed."""
        positive(f"{path}.vocab_size", self.vocab_size)
        positive(f"{path}.d_model", self.d_model)
        positive(f"{path}.n_layers", self.n_layers)
        positive(f"{path}.max_len", self.max_len)
        in_range(f"{path}.norm_eps", self.norm_eps, 0.0, lo_open=True)
        one_of(f"{path}.norm", self.norm, sorted(NORMS))
        one_of(f"{path}.remat", self.remat, REMAT_POLICIES)
        one_of(f"{path}.tied_head_scale", self.tied_head_scale, TIED_HEAD_SCALES)
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
            if spec.ffn is not None and not isinstance(spec.ffn, FeedForwardConfig):
                raise ValueError(f"{path}.pattern.{i}.ffn={spec.ffn!r} must be a FeedForwardConfig or None")
            if spec.ffn is not None:
                spec.ffn.validate(self.d_model, f"{path}.pattern.{i}.ffn")
            if spec.short_conv < 0 or spec.short_conv == 1:
                raise ValueError(f"{path}.pattern.{i}.short_conv={spec.short_conv} must be 0 (off) or >= 2")


def override(cfg: ModelConfig, **fields) -> ModelConfig:
    """``cfg`` with ``fields`` set: ``ModelConfig`` fields, ``short_conv``, and fields of the
    pattern's mixers/FFNs (plain, or qualified by kind as ``"kind.field"``).

    A plain field goes to every component that has it, provided all of them are of one
    kind; otherwise ValueError lists the places (and the qualified names) it could go.
    An unknown field raises ValueError listing what is settable.
    """
    top = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in fields.items() if k in top})
    by_kind: dict[str, dict[str, Any]] = {}
    for key, value in fields.items():
        if key in top:
            continue
        kind, _, name = key.rpartition(".")
        kinds = _kinds_with(cfg, name) if not kind else ({kind} & _kinds_with(cfg, name))
        if not kinds:
            raise ValueError(f"unknown override {key!r} for model {cfg.name!r}; settable: "
                             f"{_settable(cfg)}")
        if len(kinds) > 1:
            places = [f"{k}.{name}" for k in sorted(kinds)]
            raise ValueError(f"override {key!r} is ambiguous for model {cfg.name!r}: components "
                             f"of kinds {sorted(kinds)} all have it; write one of {places}")
        by_kind.setdefault(kinds.pop(), {})[name] = value
    if not by_kind:
        return cfg
    return dataclasses.replace(cfg, pattern=tuple(_override_block(s, by_kind) for s in cfg.pattern))


def _components(spec: BlockSpec) -> list[tuple[str, Any]]:
    """(kind, config) of the parts of a block that take overrides."""
    parts = [("block", spec), (spec.mixer.kind, spec.mixer)]
    if spec.ffn is not None:
        parts.append((spec.ffn.kind, spec.ffn))
    return parts


def _kinds_with(cfg: ModelConfig, name: str) -> set[str]:
    return {kind for spec in cfg.pattern for kind, part in _components(spec)
            if name in _field_names(part) and not (kind == "block" and name in ("mixer", "ffn"))}


def _settable(cfg: ModelConfig) -> list[str]:
    names = set(_field_names(cfg))
    for spec in cfg.pattern:
        for kind, part in _components(spec):
            names |= {f"{kind}.{n}" for n in _field_names(part) if n not in ("mixer", "ffn")}
    return sorted(names)


def _override_block(spec: BlockSpec, by_kind: dict[str, dict[str, Any]]) -> BlockSpec:
    mixer = dataclasses.replace(spec.mixer, **by_kind.get(spec.mixer.kind, {}))
    ffn = spec.ffn
    if ffn is not None:
        ffn = dataclasses.replace(ffn, **by_kind.get(ffn.kind, {}))
    return dataclasses.replace(spec, mixer=mixer, ffn=ffn, **by_kind.get("block", {}))


def _field_names(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]
