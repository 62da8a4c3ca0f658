"""Linformer (Wang et al. 2020): low-rank projection of keys and values along the length.

``K' = E^T K`` and ``V' = F^T V`` with learned ``E, F: [input_len, proj_len]`` (shared
by the heads), so every query attends to ``proj_len`` (R) mixed "keys": O(T * R) work
and memory. A sequence of length T < input_len uses the first T rows of E, F.

Linformer is bidirectional only. Every projected key mixes *all* positions, future
ones included, so in a causal model position t would read tokens after t: such a
configuration is refused at validation (there is no sound causal variant of a
length projection without giving up its cost). Packed sequences are refused for the
same reason (the projection mixes segments). There is no decode cache.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from layers import initializers as init
from layers.attention.block_sparse_reference import masked_attention
from layers.attention.softmax import apply_position
from layers.contracts import MixerConfig, nbytes, no_aux, one_of, positive
from layers.heads import HeadsConfig, project_heads, project_out
from layers.positions import RopeConfig
from layers.typing import Array, DType


@dataclasses.dataclass(frozen=True)
class LinformerConfig(MixerConfig, HeadsConfig):
    """Bidirectional attention over ``proj_len`` length-projected keys/values."""
    kind: ClassVar[str] = "linformer"
    causal: bool = False
    proj_len: int = 64                 # R (k in the paper)
    input_len: int = 16384             # rows of E, F: the longest sequence accepted
    position: str = "none"             # "none" (E, F see absolute positions) | "rope" | "xpos"
    rope: RopeConfig = RopeConfig()

    def validate(self, d_model, path="mixer"):
        if self.causal:
            raise ValueError(
                f"{path}.causal=True is not allowed for linformer: its projection E^T K mixes all "
                "positions, so a causal model would leak future tokens into every prediction. "
                "Use linformer in an encoder (causal=False) or pick a causal mixer (e.g. "
                "sliding_window, transnormer)")
        rotary = self.position != "none"
        self.validate_heads(d_model, path, even_head_dim=self.position if rotary else None)
        positive(f"{path}.proj_len", self.proj_len)
        positive(f"{path}.input_len", self.input_len)
        one_of(f"{path}.position", self.position, ("none", "rope", "xpos"))

    def make(self, d_model, dtype, param_dtype, name=None):
        return Linformer(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        raise ValueError("linformer is bidirectional (encoder-style): it has no decode cache")

    def state_size(self, d_model, seq_len, dtype=jnp.float32):
        return 2 * self.proj_len * self.kv_heads * self.head_dim_for(d_model) * nbytes(dtype)


def linformer_attention(q: Array, k: Array, v: Array, e: Array, f: Array) -> Array:
    """q: [B, T, H, Dh]; k, v: [B, T, K, Dh]; e, f: [T, R] -> [B, T, H, Dh]."""
    kp = jnp.einsum("bskd,sr->brkd", k, e.astype(k.dtype))            # [B, R, K, Dh]
    vp = jnp.einsum("bskd,sr->brkd", v, f.astype(v.dtype))
    mask = jnp.ones((q.shape[1], kp.shape[1]), bool)
    return masked_attention(q, kp, vp, mask)


class Linformer(nn.Module):
    """x [B, T, D] -> (y [B, T, D], None, {})."""
    cfg: LinformerConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, train=False):
        cfg = self.cfg
        t = x.shape[1]
        if cache is not None:
            raise ValueError("linformer is bidirectional: decoding with a cache is not supported")
        if segment_ids is not None:
            raise ValueError("linformer: packed sequences (segment_ids) are not supported; the "
                             "length projection mixes every position of the row")
        if t > cfg.input_len:
            raise ValueError(f"linformer: sequence length {t} exceeds mixer.input_len={cfg.input_len}")
        h, kh, dh = cfg.n_heads, cfg.kv_heads, cfg.head_dim_for(self.d_model)
        q = project_heads(self, x, h, dh, "q")                         # [B, T, H, Dh]
        k = project_heads(self, x, kh, dh, "k", kv=True)               # [B, T, K, Dh]
        v = project_heads(self, x, kh, dh, "v", kv=True)
        q, k = apply_position(q, k, positions, cfg.position, cfg.rope)
        proj_init = init.fan_in(1.0, in_axis=0, out_axis=1)
        e = init.param(self, "e", proj_init, (cfg.input_len, cfg.proj_len), (None, None))
        f = init.param(self, "f", proj_init, (cfg.input_len, cfg.proj_len), (None, None))
        out = linformer_attention(q, k, v, e[:t], f[:t])
        return project_out(self, out, self.d_model), None, no_aux()
