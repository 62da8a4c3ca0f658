"""Llama-3 (Meta 2024): pre-norm decoder with GQA, RoPE (theta = 500000), SwiGLU and
RMSNorm (eps 1e-5); untied head at 8B, tied in the small presets.

Sizes: ``tiny`` (< 1M params, tests), ``small`` (CPU experiments), ``8b`` (the real
Llama-3-8B shape: D 4096, 32 layers, 32 heads / 8 kv heads, FFN 14336, V 128256;
build it abstractly with ``jax.eval_shape``).
"""

from __future__ import annotations

from archs.config import BlockSpec, ModelConfig
from layers.attention import AttentionConfig
from layers.ffn import FFNConfig
from layers.positions import RopeConfig

SIZES = {
    #        d_model, layers, heads, kv_heads, ffn multiple_of, ffn multiplier, vocab, max_len, tie
    "tiny": (64, 2, 4, 2, 16, 1.0, 256, 1024, True),
    "small": (128, 4, 4, 2, 32, 1.0, 512, 4096, True),
    "8b": (4096, 32, 32, 8, 1024, 1.3, 128256, 8192, False),
}


def llama(size: str = "small", **_) -> ModelConfig:
    d, n_layers, h, kh, mult_of, mult, vocab, max_len, tie = SIZES[size]
    attn = AttentionConfig(n_heads=h, n_kv_heads=kh, rope=RopeConfig(base=500000.0))
    ffn = FFNConfig(activation="swiglu", multiple_of=mult_of, ffn_dim_multiplier=mult)
    return ModelConfig(name="llama", vocab_size=vocab, d_model=d, n_layers=n_layers,
                       pattern=(BlockSpec(mixer=attn, ffn=ffn),), norm="rmsnorm", norm_eps=1e-5,
                       tie_embeddings=tie, max_len=max_len,
                       dtype="bfloat16" if size == "8b" else "float32")
