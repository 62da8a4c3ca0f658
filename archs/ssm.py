"""State-space models: Mamba (Gu & Dao 2023) and Mamba-2 (Dao & Gu 2024).

Both stack mixer-only blocks (``ffn=None``): ``x + Mamba(RMSNorm(x))``, as the
reference models do (twice the layers of a Transformer of the same width, for
about the same parameter count). Sizes: ``tiny`` (< 1M params, tests) and
``small`` (CPU experiments, ~1M params at vocab 512).
"""

from __future__ import annotations

from archs.config import BlockSpec, ModelConfig
from layers.mamba import MambaConfig
from layers.mamba2 import Mamba2Config

#        d_model, layers, vocab, max_len
SIZES = {"tiny": (64, 2, 256, 1024), "small": (128, 8, 512, 4096)}


def mamba(size: str = "small", **_) -> ModelConfig:
    d, n_layers, vocab, max_len = SIZES[size]
    mixer = MambaConfig(d_state=16, d_conv=4, expand=2)
    return ModelConfig(name="mamba", vocab_size=vocab, d_model=d, n_layers=n_layers,
                       pattern=(BlockSpec(mixer=mixer, ffn=None),), norm="rmsnorm",
                       max_len=max_len)


def mamba2(size: str = "small", **_) -> ModelConfig:
    d, n_layers, vocab, max_len = SIZES[size]
    mixer = Mamba2Config(d_state=16 if size == "tiny" else 32, d_conv=4, expand=2, headdim=32,
                         n_groups=1)
    return ModelConfig(name="mamba2", vocab_size=vocab, d_model=d, n_layers=n_layers,
                       pattern=(BlockSpec(mixer=mixer, ffn=None),), norm="rmsnorm",
                       max_len=max_len)


PRESETS = {
    "mamba": (mamba, ("tiny", "small")),
    "mamba2": (mamba2, ("tiny", "small")),
}
