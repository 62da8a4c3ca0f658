"""Linear-attention Transformers: the linear transformer (Katharopoulos et al. 2020,
``phi = elu + 1``) and the Performer (Choromanski et al. 2021, FAVOR+); mixers in
``layers/recurrent/linear_attention.py``.

The blocks are Llama's (RMSNorm pre-norm, SwiGLU FFN, same sizes as the ``llama``
preset) with the softmax attention swapped for the kernelized one, so comparisons
against ``llama`` isolate the mixer. Neither mixer uses positional encodings (as in
the papers' attention layers); the model has no absolute position embedding either,
so order enters only through causality.
"""

from __future__ import annotations

import dataclasses

from archs.config import BlockSpec, ModelConfig
from layers.ffn import FFNConfig
from layers.recurrent.linear_attention import LinearAttentionConfig, PerformerConfig


@dataclasses.dataclass(frozen=True)
class LinearSize:
    d_model: int
    n_layers: int
    n_heads: int
    ffn_multiple_of: int      # SwiGLU width: Llama's 8/3 D rule rounded up to this multiple
    vocab_size: int
    max_len: int


SIZES = {
    "tiny": LinearSize(d_model=64, n_layers=2, n_heads=4, ffn_multiple_of=16, vocab_size=256,
                       max_len=1024),
    "small": LinearSize(d_model=128, n_layers=4, n_heads=4, ffn_multiple_of=32, vocab_size=512,
                        max_len=4096),
}


def _model(name: str, mixer, s: LinearSize) -> ModelConfig:
    ffn = FFNConfig(activation="swiglu", multiple_of=s.ffn_multiple_of)
    return ModelConfig(name=name, vocab_size=s.vocab_size, d_model=s.d_model, n_layers=s.n_layers,
                       pattern=(BlockSpec(mixer=mixer, ffn=ffn),), norm="rmsnorm",
                       max_len=s.max_len)


def linear_transformer(size: str = "small") -> ModelConfig:
    s = SIZES[size]
    return _model("linear_transformer", LinearAttentionConfig(n_heads=s.n_heads), s)


def performer(size: str = "small") -> ModelConfig:
    s = SIZES[size]
    return _model("performer", PerformerConfig(n_heads=s.n_heads), s)


PRESETS = {
    "linear_transformer": (linear_transformer, tuple(SIZES)),
    "performer": (performer, tuple(SIZES)),
}
