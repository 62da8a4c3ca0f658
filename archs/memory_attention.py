"""Memory attention models: Transformer-XL (Dai et al. 2019), segment-level recurrence
with a stop-gradient memory and relative positions, in the pre-norm decoder of
``archs.sparse_attention`` (RMSNorm, SwiGLU).

Presets (sizes ``tiny`` for tests, ``small`` for CPU experiments):

* ``transformer_xl``: memory and segments of ``32 * span_scale`` tokens; the decode
  cache is a fixed-size buffer of mixer inputs (independent of the context length).
"""

from __future__ import annotations

from archs.config import ModelConfig
from archs.sparse_attention import SIZES, decoder
from layers.attention import TransformerXLConfig


def transformer_xl(size: str = "small") -> ModelConfig:
    s = SIZES[size].span_scale
    mixer = TransformerXLConfig(n_heads=SIZES[size].n_heads, mem_len=32 * s, segment_len=32 * s)
    return decoder("transformer_xl", size, [mixer])


PRESETS = {
    "transformer_xl": (transformer_xl, ("tiny", "small")),
}
