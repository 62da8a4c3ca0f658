"""The recurrent family: mixers with a fixed-size decode state, all built on the
shared primitives of ``layers.recurrence`` (and ``layers.feature_maps``).

* ``mamba``: Mamba's selective SSM (Gu & Dao 2023);
* ``mamba2``: Mamba-2's SSD (Dao & Gu 2024);
* ``retnet``: multi-scale retention (Sun et al. 2023);
* ``rwkv6``: RWKV-6 time mixing (a mixer) and channel mixing (an FFN) (Peng et al. 2024);
* ``linear_attention``: the linear transformer (Katharopoulos et al. 2020) and the
  Performer (Choromanski et al. 2021).

Implementation switches are named ``scan_impl`` (``layers.recurrence.MATRIX_IMPLS`` or
``layers.recurrent.mamba.MAMBA_IMPLS``). See docs/design.md.
"""

from layers.recurrent.linear_attention import LinearAttentionConfig, PerformerConfig
from layers.recurrent.mamba import MambaConfig
from layers.recurrent.mamba2 import Mamba2Config
from layers.recurrent.retnet import RetNetConfig
from layers.recurrent.rwkv6 import RWKV6ChannelMixConfig, RWKV6Config

MIXER_CONFIGS = (MambaConfig, Mamba2Config, RWKV6Config, RetNetConfig, LinearAttentionConfig,
                 PerformerConfig)
FFN_CONFIGS = (RWKV6ChannelMixConfig,)

__all__ = ["LinearAttentionConfig", "Mamba2Config", "MambaConfig", "PerformerConfig",
           "RWKV6ChannelMixConfig", "RWKV6Config", "RetNetConfig", "MIXER_CONFIGS", "FFN_CONFIGS"]
