"""RWKV-6 "Finch" (Peng et al. 2024): LayerNorm pre-norm layers ``x + TM(LN1(x))`` then
``x + CM(LN2(x))`` -- one block per RWKV layer, time mixing as the mixer and channel
mixing as the FFN (``layers/recurrent/rwkv6.py``; channel mixing keeps a one-token
decode cache through the FFN contract). ``n_layers`` counts RWKV layers. The reference
model's extra LayerNorm after the embedding (``ln0``) is ``ModelConfig.embed_norm``.
"""

from __future__ import annotations

import dataclasses

from archs.config import BlockSpec, ModelConfig
from layers.recurrent.rwkv6 import RWKV6ChannelMixConfig, RWKV6Config


@dataclasses.dataclass(frozen=True)
class RWKVSize:
    d_model: int
    n_layers: int             # RWKV layers (time mixing + channel mixing each)
    head_dim: int
    mix_rank: int             # rank of the five ddlerp LoRAs
    decay_rank: int           # rank of the decay LoRA
    vocab_size: int
    max_len: int


SIZES = {
    "tiny": RWKVSize(d_model=64, n_layers=2, head_dim=16, mix_rank=8, decay_rank=16,
                     vocab_size=256, max_len=1024),
    "small": RWKVSize(d_model=128, n_layers=4, head_dim=32, mix_rank=16, decay_rank=32,
                      vocab_size=512, max_len=4096),
}


def rwkv6(size: str = "small") -> ModelConfig:
    s = SIZES[size]
    tm = RWKV6Config(head_dim=s.head_dim, mix_rank=s.mix_rank, decay_rank=s.decay_rank)
    return ModelConfig(name="rwkv6", vocab_size=s.vocab_size, d_model=s.d_model,
                       n_layers=s.n_layers,
                       pattern=(BlockSpec(mixer=tm, ffn=RWKV6ChannelMixConfig()),),
                       norm="layernorm", embed_norm=True, max_len=s.max_len)


PRESETS = {"rwkv6": (rwkv6, tuple(SIZES))}
