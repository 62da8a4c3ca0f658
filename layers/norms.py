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

from layers import initializers as init
from layers.typing import Array, DType


def rms_normalize(x: Array, eps: float) -> Array:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, in fp32."""
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def standardize(x: Array, eps: float) -> Array:
    """``(x - mean) / sqrt(var + eps)`` over the last axis, in fp32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    return (xf - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * scale``; x: [..., D]."""
    eps: float = 1e-5
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = init.param(self, "scale", init.ones, (d,), ("norm",))
        return (rms_normalize(x, self.eps) * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """``y = (x - mean) / sqrt(var + eps) * scale + bias``; x: [..., D]."""
    eps: float = 1e-5
    use_bias: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = init.param(self, "scale", init.ones, (d,), ("norm",))
        y = standardize(x, self.eps) * scale.astype(jnp.float32)
        if self.use_bias:
            y = y + init.param(self, "bias", init.zeros, (d,), ("norm",)).astype(jnp.float32)
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
        scale = init.param(self, "scale", init.ones, (h, dv), axes).astype(jnp.float32)
        if self.kind == "rmsnorm":
            return rms_normalize(x, self.eps) * scale
        bias = init.param(self, "bias", init.zeros, (h, dv), axes)
        return standardize(x, self.eps) * scale + bias.astype(jnp.float32)


def gated_rms_norm(y: Array, z: Array, scale: Array, n_norm_groups: int, eps: float) -> Array:
    """``RMSNorm(y * SiLU(z))`` over ``n_norm_groups`` equal channel groups, fp32 (Mamba-2,
    Sec. 7.1). y, z: [..., F]; scale: [F]."""
    h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    hg = h.reshape(h.shape[:-1] + (n_norm_groups, -1))
    return rms_normalize(hg, eps).reshape(h.shape) * scale.astype(jnp.float32)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def make_norm(kind: str, eps: float, dtype: DType, param_dtype: DType, name: str | None = None):
    """Builds the norm named ``kind`` ("rmsnorm" or "layernorm")."""
    if kind not in NORMS:
        raise ValueError(f"norm={kind!r} is not a norm; choose one of {sorted(NORMS)}")
    return NORMS[kind](eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
