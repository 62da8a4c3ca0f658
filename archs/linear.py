"""Linear-attention Transformers: the linear transformer (Katharopoulos et al. 2020,
``phi = elu + 1``) and the Performer (Choromanski et al. 2021, FAVOR+).

The blocks are Llama's (RMSNorm pre-norm, SwiGLU FFN, same sizes as the ``llama``
preset) with the softmax attention swapped for the kernelized one, so comparisons
against ``llama`` isolate the mixer. Neither mixer uses positional encodings (as in
the papers' attention layers); the model has no absolute position embedding either,
so order enters only through causality.
"""

from __future__ import annotations

from archs.config import BlockSpec, ModelConfig
from layers.ffn import FFNConfig
from layers.linear_attention import LinearAttentionConfig, PerformerConfig

#        d_model, layers, heads, ffn multiple_of, vocab, max_len
SIZES = {"tiny": (64, 2, 4, 16, 256, 1024), "small": (128, 4, 4, 32, 512, 4096)}


def _model(name: str, mixer, size: str) -> ModelConfig:
    d, n_layers, _, mult_of, vocab, max_len = SIZES[size]
    ffn = FFNConfig(activation="swiglu", multiple_of=mult_of)
    return ModelConfig(name=name, vocab_size=vocab, d_model=d, n_layers=n_layers,
                       pattern=(BlockSpec(mixer=mixer, ffn=ffn),), norm="rmsnorm", max_len=max_len)


def linear_transformer(size: str = "small", **_) -> ModelConfig:
    return _model("linear_transformer", LinearAttentionConfig(n_heads=SIZES[size][2]), size)


def performer(size: str = "small", **_) -> ModelConfig:
    return _model("performer", PerformerConfig(n_heads=SIZES[size][2]), size)


PRESETS = {
    "linear_transformer": (linear_transformer, ("tiny", "small")),
    "performer": (performer, ("tiny", "small")),
}
