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
# [sparse/local/memory attention, issue 4]
# [mixture of experts, issue 5]
