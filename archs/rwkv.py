"""RWKV-6 "Finch" (Peng et al. 2024): LayerNorm pre-norm blocks alternating time
mixing and channel mixing, ``x + TM(LN(x))`` then ``x + CM(LN(x))``.

Channel mixing needs the previous token (its token shift), so it is a *mixer* with a
one-token cache, not an FFN (see ``layers/rwkv6.py``). One RWKV layer is therefore a
pattern of two blocks with ``ffn=None``; ``n_layers`` counts blocks (2 per RWKV layer).
The reference model's extra LayerNorm after the embedding (``ln0``) is not used.
"""

from __future__ import annotations

from archs.config import BlockSpec, ModelConfig
from layers.rwkv6 import RWKV6ChannelMixConfig, RWKV6Config

#        d_model, rwkv layers, head size, mix rank, decay rank, vocab, max_len
SIZES = {"tiny": (64, 2, 16, 8, 16, 256, 1024), "small": (128, 4, 32, 16, 32, 512, 4096)}


def rwkv6(size: str = "small", **_) -> ModelConfig:
    d, layers, head, mix_rank, decay_rank, vocab, max_len = SIZES[size]
    tm = RWKV6Config(head_size=head, mix_rank=mix_rank, decay_rank=decay_rank)
    cm = RWKV6ChannelMixConfig()
    return ModelConfig(name="rwkv6", vocab_size=vocab, d_model=d, n_layers=2 * layers,
                       pattern=(BlockSpec(mixer=tm, ffn=None), BlockSpec(mixer=cm, ffn=None)),
                       norm="layernorm", max_len=max_len)


PRESETS = {"rwkv6": (rwkv6, ("tiny", "small"))}
