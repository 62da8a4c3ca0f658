"""Feed-forward blocks: SwiGLU (Shazeer 2020; Llama sizing) and the GELU MLP (GPT-2).

FFN contract: a frozen config dataclass with ``validate(d_model, path)`` and
``make(d_model, dtype, param_dtype, name) -> module``; the module is called as
``module(x [B, T, D], train=bool) -> (y [B, T, D], aux)`` with
``aux = {"losses": {name: scalar}, "metrics": {name: array}}`` (either key may be
absent), so dense and MoE FFNs are interchangeable in a block.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.typing import Array, DType


def llama_hidden(d_model: int, multiple_of: int, ffn_dim_multiplier: float = 1.0) -> int:
    """Llama's SwiGLU width: ``2/3 * 4 * D``, times the multiplier, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * d_model) / 3 * ffn_dim_multiplier)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def dense(features: int, axes: tuple[str, str], dtype: DType, param_dtype: DType, name: str,
          use_bias: bool = False, stddev: float | None = None) -> nn.Dense:
    """A Dense layer with logically partitioned kernel and fan-in-scaled normal init."""
    init = (nn.initializers.normal(stddev) if stddev is not None
            else nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"))
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.with_logical_partitioning(init, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
                    name=name)


@dataclasses.dataclass(frozen=True)
class FFNConfig:
    """Dense FFN. ``hidden=None`` uses Llama sizing for SwiGLU and 4*D for GELU."""
    kind: ClassVar[str] = "ffn"
    activation: str = "swiglu"   # "swiglu" | "gelu"
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
        if self.activation not in ("swiglu", "gelu"):
            raise ValueError(f"{path}.activation={self.activation!r} is not allowed; choose 'swiglu' or 'gelu'")
        if self.hidden is not None and self.hidden <= 0:
            raise ValueError(f"{path}.hidden={self.hidden} must be positive (or None for the default)")
        if self.multiple_of <= 0:
            raise ValueError(f"{path}.multiple_of={self.multiple_of} must be positive")

    def make(self, d_model: int, dtype: DType, param_dtype: DType, name: str | None = None):
        return FFN(self, d_model, dtype, param_dtype, name=name)


class FFN(nn.Module):
    """x [B, T, D] -> (y [B, T, D], {}). SwiGLU: ``W2 (silu(W1 x) * W3 x)``."""
    cfg: FFNConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, dict]:
        f = self.cfg.hidden_dim(self.d_model)
        mk = lambda feat, axes, name: dense(feat, axes, self.dtype, self.param_dtype, name,
                                            self.cfg.use_bias)
        h = mk(f, ("embed", "mlp"), "wi")(x)  # [B, T, F]
        if self.cfg.activation == "swiglu":
            h = jax.nn.silu(h) * mk(f, ("embed", "mlp"), "wg")(x)
        else:
            h = jax.nn.gelu(h)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return mk(self.d_model, ("mlp", "embed"), "wo")(h), {}
