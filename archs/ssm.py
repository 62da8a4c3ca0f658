"""State-space models: Mamba (Gu & Dao 2023) and Mamba-2 (Dao & Gu 2024).

Both stack mixer-only blocks (``ffn=None``): ``x + Mamba(RMSNorm(x))``, as the
reference models do (twice the layers of a Transformer of the same width, for
about the same parameter count). Sizes: ``tiny`` (< 1M params, tests) and
``small`` (CPU experiments, ~1M params at vocab 512). Mixers in
``layers/recurrent/mamba.py`` and ``layers/recurrent/mamba2.py``.
"""

from __future__ import annotations

import dataclasses

from archs.config import BlockSpec, ModelConfig
from layers.recurrent.mamba import MambaConfig
from layers.recurrent.mamba2 import Mamba2Config


@dataclasses.dataclass(frozen=True)
class SSMSize:
    d_model: int
    n_layers: int
    vocab_size: int
    max_len: int
    mamba2_d_state: int       # N of Mamba-2 (Mamba uses the paper's 16 at every size)
    mamba2_head_dim: int = 32


SIZES = {
    "tiny": SSMSize(d_model=64, n_layers=2, vocab_size=256, max_len=1024, mamba2_d_state=16),
    "small": SSMSize(d_model=128, n_layers=8, vocab_size=512, max_len=4096, mamba2_d_state=32),
}


def _stack(name: str, mixer, s: SSMSize) -> ModelConfig:
    return ModelConfig(name=name, vocab_size=s.vocab_size, d_model=s.d_model,
                       n_layers=s.n_layers, pattern=(BlockSpec(mixer=mixer, ffn=None),),
                       norm="rmsnorm", max_len=s.max_len)


def mamba(size: str = "small") -> ModelConfig:
    return _stack("mamba", MambaConfig(d_state=16, d_conv=4, expand=2), SIZES[size])


def mamba2(size: str = "small") -> ModelConfig:
    s = SIZES[size]
    mixer = Mamba2Config(d_state=s.mamba2_d_state, d_conv=4, expand=2, head_dim=s.mamba2_head_dim,
                         n_bc_heads=1)
    return _stack("mamba2", mixer, s)


PRESETS = {
    "mamba": (mamba, tuple(SIZES)),
    "mamba2": (mamba2, tuple(SIZES)),
}
