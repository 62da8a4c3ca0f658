"""Efficient (sub-quadratic, non-sparse) attention models, in the pre-norm decoder of
``archs.sparse_attention`` (RMSNorm, SwiGLU):

* ``linformer``: *encoder-style* (bidirectional) length-projected attention
  (Wang et al. 2020); ``causal`` is False, so it cannot decode.
* ``transnormer``: exact softmax inside blocks + normed linear attention across blocks
  (Qin et al. 2022), causal with a fixed-size decode cache.

Sizes ``tiny`` for tests, ``small`` for CPU experiments.
"""

from __future__ import annotations

from archs.config import ModelConfig
from archs.sparse_attention import SIZES, decoder, heads
from layers.attention import LinformerConfig, TransNormerConfig


def linformer(size: str = "small") -> ModelConfig:
    s = SIZES[size]
    mixer = LinformerConfig(causal=False, proj_len=32 * s.span_scale, input_len=s.max_len,
                            n_heads=s.n_heads)
    return decoder("linformer", size, [mixer])


def transnormer(size: str = "small") -> ModelConfig:
    s = SIZES[size].span_scale
    mixer = TransNormerConfig(block=16 * s, block_q=16 * s, block_k=16 * s, **heads(size))
    return decoder("transnormer", size, [mixer])


PRESETS = {
    "linformer": (linformer, ("tiny", "small")),
    "transnormer": (transnormer, ("tiny", "small")),
}
