"""RetNet (Sun et al. 2023): ``Y = MSR(LN(X)) + X``, ``X' = FFN(LN(Y)) + Y`` (eq. 9) with
multi-scale retention (value dim 2 x key dim, gamma_h = 1 - 2^(-5-h)) and a GELU FFN
of width 2 D (the paper's sizing, since MSR carries the extra parameters).
"""

from __future__ import annotations

from archs.config import BlockSpec, ModelConfig
from layers.ffn import FFNConfig
from layers.retnet import RetNetConfig

#        d_model, layers, heads, vocab, max_len
SIZES = {"tiny": (64, 2, 4, 256, 1024), "small": (128, 4, 4, 512, 4096)}


def retnet(size: str = "small", **_) -> ModelConfig:
    d, n_layers, heads, vocab, max_len = SIZES[size]
    block = BlockSpec(mixer=RetNetConfig(n_heads=heads, value_factor=2),
                      ffn=FFNConfig(activation="gelu", hidden=2 * d))
    return ModelConfig(name="retnet", vocab_size=vocab, d_model=d, n_layers=n_layers,
                       pattern=(block,), norm="layernorm", max_len=max_len)


PRESETS = {"retnet": (retnet, ("tiny", "small"))}
