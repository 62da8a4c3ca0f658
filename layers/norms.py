"""Normalizations: RMSNorm (Zhang & Sennrich 2019, as in Llama), LayerNorm (Ba et al.
2016), the per-head norm of multi-head recurrent mixers (:class:`HeadNorm`: GroupNorm
with one group per head as in RetNet / RWKV-6, or its RMS variant) and the gated RMS
norm of Mamba-2 (:func:`gated_rms_norm`).

All normalize in fp32 whatever the compute dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax
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


class HeadNorm(nn.Module):
    """Per-head normalization of ``x [..., H, Dv]`` over Dv in fp32 with a per-channel
    affine ``[H, Dv]`` (scale 1, bias 0 at init), returned in fp32.

    ``kind="layernorm"``: GroupNorm with one group per head (mean and variance; RetNet,
    RWKV-6's ``ln_x``); ``kind="rmsnorm"``: RMS only, no bias.
    """
    kind: str = "layernorm"
    eps: float = 1e-5
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h, dv = x.shape[-2:]
        axes = ("heads", "head_dim")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, axes),
                           (h, dv), self.param_dtype)
        xf = x.astype(jnp.float32)
        if self.kind == "rmsnorm":
            return xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps) * scale
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, axes),
                          (h, dv), self.param_dtype)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def gated_rms_norm(y: Array, z: Array, scale: Array, n_norm_groups: int, eps: float) -> Array:
    """``RMSNorm(y * SiLU(z))`` over ``n_norm_groups`` equal channel groups, fp32 (Mamba-2,
    Sec. 7.1). y, z: [..., F]; scale: [F]."""
    h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    hg = h.reshape(h.shape[:-1] + (n_norm_groups, -1))
    hg = hg * jax.lax.rsqrt(jnp.mean(hg * hg, axis=-1, keepdims=True) + eps)
    return hg.reshape(h.shape) * scale.astype(jnp.float32)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def make_norm(kind: str, eps: float, dtype: DType, param_dtype: DType, name: str | None = None):
    """Builds the norm named ``kind`` ("rmsnorm" or "layernorm")."""
    if kind not in NORMS:
        raise ValueError(f"norm={kind!r} is not a norm; choose one of {sorted(NORMS)}")
    return NORMS[kind](eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
