"""Causal depthwise short convolution (H3, Fu et al. 2023; Mamba's conv1d; Zoology's
"BASED recipe" places one before every mixer).

``y[t, c] = sum_{j<W} w[j, c] * x[t - W + 1 + j, c] + b[c]`` for every channel ``c``
(W: the conv width, a window of W tokens): each channel sees only the current and
previous W - 1 tokens. Channels are written Di below (D for ``ShortConv``, the inner
width in Mamba). Decode keeps the last W - 1 inputs as state,
so prefill + one-token steps equal the full convolution.

:class:`ShortConv` is the block-level conv (``BlockSpec.short_conv``);
:func:`conv_params` creates the conv1d parameters of the Mamba / Mamba-2 blocks.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import initializers as init
from layers.typing import Array, DType


def causal_conv(x: Array, w: Array, b: Array | None, state: Array | None = None,
                segment_ids: Array | None = None) -> tuple[Array, Array]:
    """Depthwise causal conv. x: [B, T, Di]; w: [W, Di]; b: [Di];
    state: [B, W-1, Di] (previous inputs).

    Returns ``(y [B, T, Di], new_state [B, W-1, Di])``. With ``segment_ids [B, T]``,
    inputs from an earlier segment are zeroed (packed sequences do not leak).
    """
    width = w.shape[0]
    bsz, t, di = x.shape
    if state is None:
        state = jnp.zeros((bsz, width - 1, di), x.dtype)
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, W-1+T, Di]
    y = jnp.zeros((bsz, t, di), jnp.float32)
    for j in range(width):
        tap = jax.lax.dynamic_slice_in_dim(xp, j, t, axis=1).astype(jnp.float32)
        if segment_ids is not None and j < width - 1:
            # tap j reads x[t - (W-1-j)]; keep it only if that token is in t's segment.
            lag = width - 1 - j
            seg_prev = jnp.pad(segment_ids, ((0, 0), (lag, 0)), constant_values=-1)[:, :t]
            tap = tap * (seg_prev == segment_ids)[..., None]
        y = y + tap * w[j].astype(jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    new_state = xp[:, xp.shape[1] - (width - 1):]
    return y.astype(x.dtype), new_state


def conv_params(module: nn.Module, width: int, channels: int) -> tuple[Array, Array]:
    """Depthwise conv1d kernel ``conv_kernel [W, Di]`` and bias ``conv_bias [Di]`` of
    ``module`` (logical axes ("conv", "mlp")), both with PyTorch's default init
    U(+-1/sqrt(W)) as in the Mamba reference code."""
    bound = 1.0 / math.sqrt(width)
    w = init.param(module, "conv_kernel", init.uniform(bound), (width, channels), ("conv", "mlp"))
    b = init.param(module, "conv_bias", init.uniform(bound), (channels,), ("mlp",))
    return w, b


class ShortConv(nn.Module):
    """x [B, T, D] -> (y, new_state); identity-ish init (last tap 1) keeps early training stable."""
    width: int = 4
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, state: Array | None = None,
                 segment_ids: Array | None = None) -> tuple[Array, Array]:
        d = x.shape[-1]

        def near_identity(key, shape, dtype):
            return init.normal(0.02)(key, shape, dtype).at[-1].add(1.0)
        w = init.param(self, "kernel", near_identity, (self.width, d), ("conv", "embed"))
        b = init.param(self, "bias", init.zeros, (d,), ("embed",))
        return causal_conv(x.astype(self.dtype), w, b, state, segment_ids)
