"""Flax Linen layers and the pure-JAX math they call (no training code).

Explicit registries (STYLE.md #6) of mixer and FFN config classes by ``kind``: used to
rebuild configs from ``config.json`` and to enumerate mixers in benchmarks. A new
family adds one import and one entry at its marker below.
"""

from layers.attention import AttentionConfig
from layers.ffn import FFNConfig
from layers.mixer import MixerConfig

MIXERS: dict[str, type[MixerConfig]] = {
    "attention": AttentionConfig,
}
FFNS: dict[str, type] = {
    "ffn": FFNConfig,
}

# --- family registrations: each family inserts its lines directly below its marker ---
# [linear-time mixers, issue 3]
from layers.linear_attention import LinearAttentionConfig, PerformerConfig
from layers.mamba import MambaConfig
from layers.mamba2 import Mamba2Config
from layers.retnet import RetNetConfig
from layers.rwkv6 import RWKV6ChannelMixConfig, RWKV6Config
MIXERS.update({c.kind: c for c in (MambaConfig, Mamba2Config, RWKV6Config, RWKV6ChannelMixConfig,
                                   RetNetConfig, LinearAttentionConfig, PerformerConfig)})
# [sparse/local/memory attention, issue 4]
from layers.hierarchical import HierarchicalConfig
from layers.linformer import LinformerConfig
from layers.routed_attention import RoutedAttentionConfig
from layers.sparse_attention import BigBirdConfig, LongformerConfig, SlidingWindowConfig
from layers.sparse_transformer import SparseTransformerConfig
from layers.transnormer import TransNormerConfig
from layers.xl_attention import TransformerXLConfig
MIXERS.update({c.kind: c for c in (SlidingWindowConfig, LongformerConfig, BigBirdConfig,
                                   SparseTransformerConfig, LinformerConfig, HierarchicalConfig,
                                   RoutedAttentionConfig, TransformerXLConfig, TransNormerConfig)})
# [mixture of experts, issue 5]
from layers.moe import MoEConfig
FFNS.update({"moe": MoEConfig})
