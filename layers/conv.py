"""Causal depthwise short convolution (H3, Fu et al. 2023; Mamba's conv1d; Zoology's
"BASED recipe" places one before every mixer).

``y[t, c] = sum_{j<W} w[j, c] * x[t - W + 1 + j, c] + b[c]``: each channel sees only
the current and previous W - 1 tokens. Decode keeps the last W - 1 inputs as state,
so prefill + one-token steps equal the full convolution.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.typing import Array, DType


def causal_conv(x: Array, w: Array, b: Array | None, state: Array | None = None,
                segment_ids: Array | None = None) -> tuple[Array, Array]:
    """Depthwise causal conv. x: [B, T, C]; w: [W, C]; state: [B, W-1, C] (previous inputs).

    Returns ``(y [B, T, C], new_state [B, W-1, C])``. With ``segment_ids [B, T]``,
    inputs from an earlier segment are zeroed (packed sequences do not leak).
    """
    width = w.shape[0]
    bsz, t, c = x.shape
    if state is None:
        state = jnp.zeros((bsz, width - 1, c), x.dtype)
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, W-1+T, C]
    y = jnp.zeros((bsz, t, c), jnp.float32)
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


class ShortConv(nn.Module):
    """x [B, T, C] -> (y, new_state); identity-ish init (last tap 1) keeps early training stable."""
    width: int = 4
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, state: Array | None = None,
                 segment_ids: Array | None = None) -> tuple[Array, Array]:
        c = x.shape[-1]

        def init(key, shape, dtype):
            w = nn.initializers.normal(0.02)(key, shape, dtype)
            return w.at[-1].add(1.0)
        w = self.param("kernel", nn.with_logical_partitioning(init, ("conv", "embed")),
                       (self.width, c), self.param_dtype)
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                       (c,), self.param_dtype)
        return causal_conv(x.astype(self.dtype), w, b, state, segment_ids)
