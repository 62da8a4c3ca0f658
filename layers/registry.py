"""Explicit registries (docs/conventions.md #6) of mixer and FFN config classes by
``kind``: used to enumerate mixers in benchmarks and to look a kind up by name. A new
family exports its config classes from its ``__init__.py`` and adds them here.
"""

from layers.attention import CONFIGS as ATTENTION_CONFIGS
from layers.contracts import FeedForwardConfig, MixerConfig
from layers.ffn import FFNConfig
from layers.moe import MoEConfig
from layers.recurrent import FFN_CONFIGS as RECURRENT_FFNS
from layers.recurrent import MIXER_CONFIGS as RECURRENT_MIXERS

MIXERS: dict[str, type[MixerConfig]] = {c.kind: c for c in ATTENTION_CONFIGS + RECURRENT_MIXERS}
FFNS: dict[str, type[FeedForwardConfig]] = {c.kind: c for c in (FFNConfig, MoEConfig) + RECURRENT_FFNS}
