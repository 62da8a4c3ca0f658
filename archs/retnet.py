"""RetNet (Sun et al. 2023): ``Y = MSR(LN(X)) + X``, ``X' = FFN(LN(Y)) + Y`` (eq. 9) with
multi-scale retention (value dim 2 x key dim, gamma_h = 1 - 2^(-5-h);
``layers/recurrent/retnet.py``) and a GELU FFN of width 2 D (the paper's sizing, since
MSR carries the extra parameters).
"""

from __future__ import annotations

import dataclasses

from archs.config import BlockSpec, ModelConfig
from layers.ffn import FFNConfig
from layers.recurrent.retnet import RetNetConfig


@dataclasses.dataclass(frozen=True)
class RetNetSize:
    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int
    max_len: int


SIZES = {
    "tiny": RetNetSize(d_model=64, n_layers=2, n_heads=4, vocab_size=256, max_len=1024),
    "small": RetNetSize(d_model=128, n_layers=4, n_heads=4, vocab_size=512, max_len=4096),
}


def retnet(size: str = "small") -> ModelConfig:
    s = SIZES[size]
    block = BlockSpec(mixer=RetNetConfig(n_heads=s.n_heads, value_factor=2),
                      ffn=FFNConfig(activation="gelu", hidden=2 * s.d_model))
    return ModelConfig(name="retnet", vocab_size=s.vocab_size, d_model=s.d_model,
                       n_layers=s.n_layers, pattern=(block,), norm="layernorm", max_len=s.max_len)


PRESETS = {"retnet": (retnet, tuple(SIZES))}
