"""Transformer-XL attention (Dai et al. 2019): segment-level recurrence with a
stop-gradient memory and relative positional attention with the u/v biases.

Score of query i and key j (eq. in section 3.3, terms (a)-(d))::

    A_ij = q_i.k_j  +  q_i.W_R R_{i-j}  +  u.k_j  +  v.W_R R_{i-j}
         =  (q_i + u).k_j  +  (q_i + v).r_{i-j}

with ``R`` the sinusoid encoding of the distance ``i - j`` and ``r = W_R R`` (per head).
Keys/values are computed from ``[SG(memory); segment]`` with the current weights,
where the memory holds the mixer *inputs* (the layer's hidden states) of earlier
positions, under ``stop_gradient``.

Pattern. Positions are cut into segments of ``segment_len``; query ``p`` in the
segment starting at ``s(p)`` sees keys ``max(0, s(p) - mem_len) <= j <= p``, where
keys before ``s(p)`` are memory (stop-gradient). The parallel form computes all
segments at once (one dense ``[segment_len, mem_len + segment_len]`` block per
segment: O(T * (M + segment_len)) work, no ``T x T`` array) and equals running the
segments one after another through the cache in values and gradients.

Cache (``init_cache``): the stop-gradient inputs of the last ``mem_len + segment_len - 1``
positions and the token index, a fixed size independent of ``max_len``. A call with
``cache=`` on T tokens attends to [memory; tokens] with the same pattern and returns
the updated memory, so any split into calls (a training "segment mode" carrying the
cache, prefill, one-token decode) gives the same values as the parallel form; with
calls of exactly ``segment_len`` aligned tokens only the last ``mem_len`` memory
positions are visible, i.e. the paper's recurrence. Gradients flow to the parameters
through the current call's tokens and through the recomputed memory keys.
``positions`` are not used (distances come from the token index).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.mixer import MixerConfig, nbytes, positive
from layers.sparse_attention import heads_kernel, out_proj
from layers.typing import Array, DType


class XLCache(NamedTuple):
    """mem: [B, L, D] stop-gradient mixer inputs of positions ``index - L .. index - 1``
    (L = mem_len + segment_len - 1; negative positions are empty); index: int32 []."""
    mem: Array
    index: Array


def rel_sinusoid(n: int, d: int) -> Array:
    """R[dist] for dist = 0..n-1: ``[sin(dist * f), cos(dist * f)]`` with ``f = 10000^(-2i/d)``."""
    inv = 1.0 / (10000.0 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = jnp.arange(n, dtype=jnp.float32)[:, None] * inv[None]
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)[:, :d]


def xl_attention(q: Array, k: Array, v: Array, r: Array, u: Array, vb: Array, dist: Array,
                 mask: Array) -> Array:
    """Relative-position attention, dense over the given keys.

    q: [B, T, H, Dh]; k, v: [B, S, H, Dh]; r: [L, H, Dh] (projected R for distances
    0..L-1); u, vb: [H, Dh]; dist: int [T, S] distance index of each pair; mask: bool
    [B|1, T, S]. Returns [B, T, H, Dh]; rows with no visible key are zero.
    """
    f32 = lambda x: x.astype(jnp.float32)
    scale = q.shape[-1] ** -0.5
    ac = jnp.einsum("bthd,bshd->bhts", f32(q) + f32(u), f32(k))
    bd = jnp.einsum("bthd,lhd->bhtl", f32(q) + f32(vb), f32(r))
    bd = jnp.take_along_axis(bd, jnp.clip(dist, 0, r.shape[0] - 1)[None, None], axis=-1)
    s = jnp.where(mask[:, None], (ac + bd) * scale, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask[:, None], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = p.sum(-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    return jnp.einsum("bhts,bshd->bthd", p, f32(v)).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class TransformerXLConfig(MixerConfig):
    """Transformer-XL attention with memory ``mem_len`` over segments of ``segment_len``."""
    kind: ClassVar[str] = "transformer_xl"
    n_heads: int = 4
    head_dim: int | None = None
    mem_len: int = 64
    segment_len: int = 64

    def dh(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // self.n_heads

    @property
    def buffer_len(self) -> int:
        return self.mem_len + self.segment_len - 1

    def validate(self, d_model, path="mixer"):
        if not self.causal:
            raise ValueError(f"{path}.causal=False: transformer_xl is a causal (decoder) mixer")
        positive(f"{path}.n_heads", self.n_heads)
        positive(f"{path}.head_dim", self.head_dim, allow_none=True)
        positive(f"{path}.mem_len", self.mem_len)
        positive(f"{path}.segment_len", self.segment_len)
        if self.head_dim is None and d_model % self.n_heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by {path}.n_heads={self.n_heads}")

    def make(self, d_model, dtype, param_dtype, name=None):
        return TransformerXL(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        return XLCache(jnp.zeros((batch, self.buffer_len, d_model), dtype), jnp.zeros((), jnp.int32))

    def state_size(self, d_model, seq_len, dtype=jnp.float32):
        return self.buffer_len * d_model * nbytes(dtype)


class TransformerXL(nn.Module):
    cfg: TransformerXLConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x, *, positions=None, segment_ids=None, cache=None, train=False):
        cfg = self.cfg
        h, dh, m, ts = cfg.n_heads, cfg.dh(self.d_model), cfg.mem_len, cfg.segment_len
        def proj(name):  # one kernel, applied to several inputs
            w = heads_kernel(self, self.d_model, h, dh, ("heads", "head_dim"), name).astype(self.dtype)
            return lambda y: jnp.einsum("btd,dnh->btnh", y.astype(self.dtype), w)
        pq, pk, pv = proj("q"), proj("k"), proj("v")
        u = self.param("u", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")),
                       (h, dh), self.param_dtype)
        vb = self.param("v_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")),
                        (h, dh), self.param_dtype)
        r = proj("r")(rel_sinusoid(m + ts, self.d_model)[None].astype(self.dtype))[0]   # [M+Ts, H, Dh]
        b, t, _ = x.shape
        if cache is None:
            out = self._segments(x, pq, pk, pv, r, u, vb, segment_ids)
            new_cache = None
        else:
            if segment_ids is not None:
                raise ValueError("transformer_xl: segment_ids with a cache are not supported "
                                 "(the memory does not record segments)")
            lb, i0 = cfg.buffer_len, cache.index
            hh = jnp.concatenate([jax.lax.stop_gradient(cache.mem).astype(x.dtype), x], axis=1)
            qp = i0 + jnp.arange(t)
            kp = i0 - lb + jnp.arange(lb + t)
            start = (qp // ts) * ts
            mask = (kp[None] >= 0) & (kp[None] <= qp[:, None]) & (kp[None] >= start[:, None] - m)
            dist = jnp.arange(t)[:, None] + lb - jnp.arange(lb + t)[None]
            out = xl_attention(pq(x), pk(hh), pv(hh), r, u, vb, dist, mask[None])
            new_cache = XLCache(jax.lax.stop_gradient(hh[:, t:]).astype(cache.mem.dtype), i0 + t)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        return out_proj(self, out, self.d_model), new_cache

    def _segments(self, x, pq, pk, pv, r, u, vb, segment_ids):
        """Parallel form: all segments at once, memory keys from stop_gradient(x)."""
        cfg = self.cfg
        m, ts = cfg.mem_len, cfg.segment_len
        b, t, d = x.shape
        ns = -(-t // ts)
        tp = ns * ts
        pad_r = lambda y, c=0: jnp.pad(y, ((0, 0), (0, tp - t)) + ((0, 0),) * (y.ndim - 2), constant_values=c)
        xs = jax.lax.stop_gradient(x)
        mem_idx = (jnp.arange(ns) * ts)[:, None] + jnp.arange(m)[None]      # into left-padded coords
        memk = lambda y: jnp.take(jnp.pad(pad_r(y), ((0, 0), (m, 0), (0, 0), (0, 0))), mem_idx, axis=1)
        seg = lambda y: pad_r(y).reshape((b, ns, ts) + y.shape[2:])
        keys = jnp.concatenate([memk(pk(xs)), seg(pk(x))], axis=2)         # [B, ns, M+Ts, H, Dh]
        vals = jnp.concatenate([memk(pv(xs)), seg(pv(x))], axis=2)
        q = seg(pq(x))                                                      # [B, ns, Ts, H, Dh]
        kpos = (jnp.arange(ns) * ts)[:, None] - m + jnp.arange(m + ts)[None]   # [ns, M+Ts]
        dist = jnp.arange(ts)[:, None] + m - jnp.arange(m + ts)[None]       # [Ts, M+Ts] static
        mask = (dist >= 0)[None] & (kpos >= 0)[:, None] & (kpos < t)[:, None]   # [ns, Ts, M+Ts]
        mask = jnp.broadcast_to(mask[None], (b,) + mask.shape)
        if segment_ids is not None:
            sq = pad_r(segment_ids, -1).reshape(b, ns, ts)
            sk = jnp.take(jnp.pad(segment_ids, ((0, 0), (m, tp - t)), constant_values=-2),
                          kpos + m, axis=1)                                 # [B, ns, M+Ts]
            mask = mask & (sq[..., :, None] == sk[..., None, :])
        fold = lambda y: y.reshape((b * ns,) + y.shape[2:])
        out = xl_attention(fold(q), fold(keys), fold(vals), r, u, vb, dist, fold(mask))
        return out.reshape(b, tp, cfg.n_heads, -1)[:, :t]
