"""Dense feed-forward blocks: SwiGLU (Shazeer 2020; Llama sizing) and the GELU MLP
(GPT-2), under the FFN contract of ``layers.contracts`` (stateless: no cache, no aux).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.contracts import FeedForwardConfig, no_aux, one_of, positive
from layers.heads import dense
from layers.typing import Array, DType

ACTIVATIONS = ("swiglu", "gelu")


def llama_hidden(d_model: int, multiple_of: int, ffn_dim_multiplier: float = 1.0) -> int:
    """Llama's SwiGLU width: ``2/3 * 4 * D``, times the multiplier, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * d_model) / 3 * ffn_dim_multiplier)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class FFNConfig(FeedForwardConfig):
    """Dense FFN. ``hidden=None`` uses Llama sizing for SwiGLU and 4*D for GELU."""
    kind: ClassVar[str] = "ffn"
    activation: str = "swiglu"   # one of ACTIVATIONS
    hidden: int | None = None
    multiple_of: int = 16
    ffn_dim_multiplier: float = 1.0
    use_bias: bool = False

    def hidden_dim(self, d_model: int) -> int:
        if self.hidden is not None:
            return self.hidden
        if self.activation == "swiglu":
            return llama_hidden(d_model, self.multiple_of, self.ffn_dim_multiplier)
        return 4 * d_model

    def validate(self, d_model: int, path: str = "ffn") -> None:
        one_of(f"{path}.activation", self.activation, ACTIVATIONS)
        positive(f"{path}.hidden", self.hidden, allow_none=True)
        positive(f"{path}.multiple_of", self.multiple_of)

    def make(self, d_model: int, dtype: DType, param_dtype: DType, name: str | None = None):
        return FFN(self, d_model, dtype, param_dtype, name=name)


class FFN(nn.Module):
    """x [B, T, D] -> (y [B, T, D], None, {}). SwiGLU: ``W2 (silu(W1 x) * W3 x)``."""
    cfg: FFNConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array | None = None,
                 segment_ids: Array | None = None, cache=None, train: bool = False):
        f = self.cfg.hidden_dim(self.d_model)
        mk = lambda feat, axes, name: dense(feat, axes, self.dtype, self.param_dtype, name,
                                            self.cfg.use_bias)
        h = mk(f, ("embed", "mlp"), "wi")(x)  # [B, T, F]
        if self.cfg.activation == "swiglu":
            h = jax.nn.silu(h) * mk(f, ("embed", "mlp"), "wg")(x)
        else:
            h = jax.nn.gelu(h)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return mk(self.d_model, ("mlp", "embed"), "wo")(h), None, no_aux()
