"""Sparse and local attention models: Llama-style pre-norm decoders (RMSNorm, SwiGLU,
RoPE) whose attention is a sparse or local mixer from ``layers.attention``.

Presets (sizes ``tiny`` for tests, ``small`` for CPU experiments):

* ``sliding_window``: local attention, ring-buffer decode cache (O(W) decode memory).
* ``longformer``: window + prefix global tokens (Beltagy et al. 2020), causal.
* ``bigbird``: window + globals + random blocks (Zaheer et al. 2020); every layer has
  its own seed (the repeating unit is the whole preset depth). Overriding ``n_layers``
  beyond it repeats the unit, and with it the random patterns.
* ``sparse_transformer``: strided pattern split across heads (Child et al. 2019).
* ``hierarchical``: fine in-block + coarse block-summary attention, causal.
* ``routed_attention``: content-routed top-k block attention (MoBA/NSA-style).
* ``multiscale``: layers cycling local window -> strided global -> full attention.

:class:`AttentionSize`, :data:`SIZES` and :func:`decoder` are the recipe shared by the
attention-variant presets (also ``archs.memory_attention`` and
``archs.efficient_attention``).
"""

from __future__ import annotations

import dataclasses

from archs.config import BlockSpec, ModelConfig
from layers.attention import (AttentionConfig, BigBirdConfig, HierarchicalConfig, LongformerConfig,
                              RoutedAttentionConfig, SlidingWindowConfig, SparseTransformerConfig)
from layers.contracts import MixerConfig
from layers.ffn import FFNConfig


@dataclasses.dataclass(frozen=True)
class AttentionSize:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_multiple_of: int
    vocab_size: int
    max_len: int
    span_scale: int               # multiplies the local spans (windows, blocks, strides)


SIZES = {
    "tiny": AttentionSize(64, 2, 4, 2, 16, 256, 1024, 1),
    "small": AttentionSize(128, 4, 4, 2, 32, 512, 4096, 2),
}


def decoder(name: str, size: str, mixers: list[MixerConfig], n_layers: int | None = None) -> ModelConfig:
    """A pre-norm decoder cycling through ``mixers`` (one SwiGLU FFN per block); the
    depth is rounded up to a multiple of ``len(mixers)``."""
    s = SIZES[size]
    ffn = FFNConfig(activation="swiglu", multiple_of=s.ffn_multiple_of)
    pattern = tuple(BlockSpec(mixer=m, ffn=ffn) for m in mixers)
    n = n_layers or s.n_layers
    n = -(-n // len(pattern)) * len(pattern)
    return ModelConfig(name=name, vocab_size=s.vocab_size, d_model=s.d_model, n_layers=n,
                       pattern=pattern, norm="rmsnorm", norm_eps=1e-5, tie_embeddings=True,
                       max_len=s.max_len)


def heads(size: str) -> dict:
    return dict(n_heads=SIZES[size].n_heads, n_kv_heads=SIZES[size].n_kv_heads)


def sliding_window(size: str = "small") -> ModelConfig:
    s = SIZES[size].span_scale
    return decoder("sliding_window", size, [SlidingWindowConfig(window=16 * s, **heads(size))])


def longformer(size: str = "small") -> ModelConfig:
    s = SIZES[size].span_scale
    mixer = LongformerConfig(window=32 * s, n_global=2 * s, block_q=16 * s, block_k=16 * s, **heads(size))
    return decoder("longformer", size, [mixer])


def bigbird(size: str = "small") -> ModelConfig:
    s = SIZES[size].span_scale
    # one seed per layer: the repeating unit is the whole stack, so nn.scan over repeats
    # never repeats a random pattern (BigBird draws random blocks per layer)
    mixers = [BigBirdConfig(window=16 * s, n_global=2 * s, n_random=2, seed=seed, block_q=16 * s,
                            block_k=16 * s, **heads(size)) for seed in range(SIZES[size].n_layers)]
    return decoder("bigbird", size, mixers)


def sparse_transformer(size: str = "small") -> ModelConfig:
    s = SIZES[size].span_scale
    mixer = SparseTransformerConfig(pattern="strided", stride=16 * s, n_strided=None, layout="heads",
                                    block_q=16 * s, block_k=16 * s, **heads(size))
    return decoder("sparse_transformer", size, [mixer])


def hierarchical(size: str = "small") -> ModelConfig:
    s = SIZES[size].span_scale
    mixer = HierarchicalConfig(summary_block=16 * s, block_q=16 * s, block_k=16 * s, **heads(size))
    return decoder("hierarchical", size, [mixer])


def routed_attention(size: str = "small") -> ModelConfig:
    s = SIZES[size].span_scale
    mixer = RoutedAttentionConfig(top_k=2 * s, block_k=16 * s, **heads(size))
    return decoder("routed_attention", size, [mixer])


def multiscale(size: str = "small") -> ModelConfig:
    s = SIZES[size].span_scale
    mixers = [SlidingWindowConfig(window=32 * s, **heads(size)),
              SparseTransformerConfig(pattern="strided", stride=16 * s, n_strided=None, layout="b",
                                      **heads(size)),
              AttentionConfig(**heads(size))]
    return decoder("multiscale", size, mixers, n_layers=3 if size == "tiny" else 6)


PRESETS = {
    "sliding_window": (sliding_window, ("tiny", "small")),
    "longformer": (longformer, ("tiny", "small")),
    "bigbird": (bigbird, ("tiny", "small")),
    "sparse_transformer": (sparse_transformer, ("tiny", "small")),
    "hierarchical": (hierarchical, ("tiny", "small")),
    "routed_attention": (routed_attention, ("tiny", "small")),
    "multiscale": (multiscale, ("tiny", "small")),
}
