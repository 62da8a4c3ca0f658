"""RMSNorm (Zhang & Sennrich 2019, as in Llama) and LayerNorm (Ba et al. 2016).

Both normalize in fp32 whatever the compute dtype, then cast back.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from layers.typing import Array, DType


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * scale``; x: [..., D]."""
    eps: float = 1e-5
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (d,), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jnp.reciprocal(jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps))
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """``y = (x - mean) / sqrt(var + eps) * scale + bias``; x: [..., D]."""
    eps: float = 1e-5
    use_bias: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (d,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jnp.reciprocal(jnp.sqrt(var + self.eps)) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                              (d,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def make_norm(kind: str, eps: float, dtype: DType, param_dtype: DType, name: str | None = None):
    """Builds the norm named ``kind`` ("rmsnorm" or "layernorm")."""
    if kind not in NORMS:
        raise ValueError(f"norm={kind!r} is not a norm; choose one of {sorted(NORMS)}")
    return NORMS[kind](eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
