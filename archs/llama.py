"""Llama-3 (Meta 2024): pre-norm decoder with GQA, RoPE (theta = 500000), SwiGLU and
RMSNorm (eps 1e-5); untied head at 8B/70B, tied in the small presets.

Sizes: ``tiny`` (< 1M params, tests), ``small`` (CPU experiments), ``8b`` and ``70b``
(the real Llama-3 shapes: 8B = D 4096, 32 layers, 32 heads / 8 kv heads, FFN 14336;
70B = D 8192, 80 layers, 64 / 8 heads, FFN 28672; V 128256; build them abstractly
with ``jax.eval_shape`` or compile them with ``archlab aot``).
"""

from __future__ import annotations

import dataclasses

from archs.config import BlockSpec, ModelConfig
from layers.attention import AttentionConfig
from layers.ffn import FFNConfig
from layers.positions import RopeConfig


@dataclasses.dataclass(frozen=True)
class LlamaSize:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_multiple_of: int          # SwiGLU width = Llama's 8/3 D rule, times the multiplier,
    ffn_multiplier: float         # rounded up to a multiple of ffn_multiple_of
    vocab_size: int
    max_len: int
    tie_embeddings: bool
    dtype: str = "float32"


SIZES = {
    "tiny": LlamaSize(64, 2, 4, 2, 16, 1.0, 256, 1024, True),
    "small": LlamaSize(128, 4, 4, 2, 32, 1.0, 512, 4096, True),
    "8b": LlamaSize(4096, 32, 32, 8, 1024, 1.3, 128256, 8192, False, "bfloat16"),
    "70b": LlamaSize(8192, 80, 64, 8, 4096, 1.3, 128256, 8192, False, "bfloat16"),
}


def llama(size: str = "small") -> ModelConfig:
    s = SIZES[size]
    attn = AttentionConfig(n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, rope=RopeConfig(base=500000.0))
    ffn = FFNConfig(activation="swiglu", multiple_of=s.ffn_multiple_of,
                    ffn_dim_multiplier=s.ffn_multiplier)
    return ModelConfig(name="llama", vocab_size=s.vocab_size, d_model=s.d_model,
                       n_layers=s.n_layers, pattern=(BlockSpec(mixer=attn, ffn=ffn),),
                       norm="rmsnorm", norm_eps=1e-5, tie_embeddings=s.tie_embeddings,
                       max_len=s.max_len, dtype=s.dtype)


PRESETS = {"llama": (llama, tuple(SIZES))}
