"""Linformer (Wang et al. 2020): low-rank projection of keys and values along the length.

``K' = E^T K`` and ``V' = F^T V`` with learned ``E, F: [max_len, proj_len]`` (shared by
the heads), so every query attends to ``proj_len`` mixed "keys": O(T * proj_len)
work and memory. A sequence of length T < max_len uses the first T rows of E, F.

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

from layers.mixer import MixerConfig, nbytes, one_of, positive
from layers.positions import RopeConfig
from layers.sparse_attention import apply_position, heads_proj, masked_attention, out_proj
from layers.typing import Array, DType


@dataclasses.dataclass(frozen=True)
class LinformerConfig(MixerConfig):
    """Bidirectional attention over ``proj_len`` length-projected keys/values."""
    kind: ClassVar[str] = "linformer"
    causal: bool = False
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    proj_len: int = 64                 # k in the paper
    max_len: int = 16384               # rows of E, F: the longest sequence accepted
    position: str = "none"             # "none" (E, F see absolute positions) | "rope" | "xpos"
    rope: RopeConfig = RopeConfig()

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def dh(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // self.n_heads

    def validate(self, d_model, path="mixer"):
        if self.causal:
            raise ValueError(
                f"{path}.causal=True is not allowed for linformer: its projection E^T K mixes all "
                "positions, so a causal model would leak future tokens into every prediction. "
                "Use linformer in an encoder (causal=False) or pick a causal mixer (e.g. "
                "sliding_window, transnormer)")
        positive(f"{path}.n_heads", self.n_heads)
        positive(f"{path}.n_kv_heads", self.n_kv_heads, allow_none=True)
        positive(f"{path}.head_dim", self.head_dim, allow_none=True)
        positive(f"{path}.proj_len", self.proj_len)
        positive(f"{path}.max_len", self.max_len)
        one_of(f"{path}.position", self.position, ("none", "rope", "xpos"))
        if self.n_heads % self.kv_heads:
            raise ValueError(f"{path}.n_heads={self.n_heads} must be divisible by kv heads={self.kv_heads}")
        if self.head_dim is None and d_model % self.n_heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by {path}.n_heads={self.n_heads}")
        if self.position != "none" and self.dh(d_model) % 2:
            raise ValueError(f"{path}: head dim {self.dh(d_model)} must be even for {self.position}")

    def make(self, d_model, dtype, param_dtype, name=None):
        return Linformer(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        raise ValueError("linformer is bidirectional (encoder-style): it has no decode cache")

    def state_size(self, d_model, seq_len, dtype=jnp.float32):
        return 2 * self.proj_len * self.kv_heads * self.dh(d_model) * nbytes(dtype)


def linformer_attention(q: Array, k: Array, v: Array, e: Array, f: Array) -> Array:
    """q: [B, T, H, Dh]; k, v: [B, T, K, Dh]; e, f: [T, R] -> [B, T, H, Dh]."""
    kp = jnp.einsum("bskd,sr->brkd", k, e.astype(k.dtype))            # [B, R, K, Dh]
    vp = jnp.einsum("bskd,sr->brkd", v, f.astype(v.dtype))
    mask = jnp.ones((q.shape[1], kp.shape[1]), bool)
    return masked_attention(q, kp, vp, mask)


class Linformer(nn.Module):
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
        if t > cfg.max_len:
            raise ValueError(f"linformer: sequence length {t} exceeds mixer.max_len={cfg.max_len}")
        h, kh, dh = cfg.n_heads, cfg.kv_heads, cfg.dh(self.d_model)
        q = heads_proj(self, x, h, dh, ("heads", "head_dim"), "q")
        k = heads_proj(self, x, kh, dh, ("kv_heads", "head_dim"), "k")
        v = heads_proj(self, x, kh, dh, ("kv_heads", "head_dim"), "v")
        q, k = apply_position(q, k, positions, cfg.position, cfg.rope)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=1)
        e = self.param("e", nn.with_logical_partitioning(init, (None, None)),
                       (cfg.max_len, cfg.proj_len), self.param_dtype)
        f = self.param("f", nn.with_logical_partitioning(init, (None, None)),
                       (cfg.max_len, cfg.proj_len), self.param_dtype)
        out = linformer_attention(q, k, v, e[:t], f[:t])
        return out_proj(self, out, self.d_model), None
