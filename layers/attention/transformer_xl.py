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

from layers import initializers as init
from layers.contracts import MixerConfig, nbytes, no_aux, positive
from layers.heads import HeadsConfig, head_kernel, project_out
from layers.typing import Array, DType


class XLCache(NamedTuple):
    """mem: [B, buffer_len, D] stop-gradient mixer inputs of positions
    ``index - buffer_len .. index - 1`` (buffer_len = mem_len + segment_len - 1; negative
    positions are empty); index: int32 []."""
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

    q: [B, T, H, Dh]; k, v: [B, S, H, Dh]; r: [n_dist, H, Dh] (projected R for
    distances 0..n_dist-1); u, vb: [H, Dh]; dist: int [T, S] distance index of each pair;
    mask: bool [B|1, T, S]. Returns [B, T, H, Dh]; rows with no visible key are zero.
    """
    f32 = lambda x: x.astype(jnp.float32)
    scale = q.shape[-1] ** -0.5
    ac = jnp.einsum("bthd,bshd->bhts", f32(q) + f32(u), f32(k))
    bd = jnp.einsum("bthd,jhd->bhtj", f32(q) + f32(vb), f32(r))
    bd = jnp.take_along_axis(bd, jnp.clip(dist, 0, r.shape[0] - 1)[None, None], axis=-1)
    s = jnp.where(mask[:, None], (ac + bd) * scale, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask[:, None], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = p.sum(-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    return jnp.einsum("bhts,bshd->bthd", p, f32(v)).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class TransformerXLConfig(MixerConfig, HeadsConfig):
    """Transformer-XL attention with memory ``mem_len`` over segments of ``segment_len``
    (multi-head: ``n_kv_heads`` must be None or ``n_heads``)."""
    kind: ClassVar[str] = "transformer_xl"
    mem_len: int = 64
    segment_len: int = 64

    @property
    def buffer_len(self) -> int:
        return self.mem_len + self.segment_len - 1

    def validate(self, d_model, path="mixer"):
        if not self.causal:
            raise ValueError(f"{path}.causal=False: transformer_xl is a causal (decoder) mixer")
        self.validate_heads(d_model, path)
        if self.kv_heads != self.n_heads:
            raise ValueError(f"{path}.n_kv_heads={self.n_kv_heads}: transformer_xl has one key/value "
                             f"head per query head; leave it None (or {self.n_heads})")
        positive(f"{path}.mem_len", self.mem_len)
        positive(f"{path}.segment_len", self.segment_len)

    def make(self, d_model, dtype, param_dtype, name=None):
        return TransformerXL(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        return XLCache(jnp.zeros((batch, self.buffer_len, d_model), dtype), jnp.zeros((), jnp.int32))

    def state_size(self, d_model, seq_len, dtype=jnp.float32):
        return self.buffer_len * d_model * nbytes(dtype)


class TransformerXL(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new XLCache or None, {})."""
    cfg: TransformerXLConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x, *, positions=None, segment_ids=None, cache=None, train=False):
        cfg = self.cfg
        h, dh, m, ts = cfg.n_heads, cfg.head_dim_for(self.d_model), cfg.mem_len, cfg.segment_len

        def proj(name):  # one [D, H, Dh] kernel, applied to several inputs
            w = head_kernel(self, name, self.d_model, h, dh).astype(self.dtype)
            return lambda y: jnp.einsum("btd,dnh->btnh", y.astype(self.dtype), w)
        pq, pk, pv = proj("q"), proj("k"), proj("v")
        u = init.param(self, "u", init.zeros, (h, dh), ("heads", "head_dim"))
        vb = init.param(self, "v_bias", init.zeros, (h, dh), ("heads", "head_dim"))
        # r: [mem_len + segment_len, H, Dh], the projected encodings of every distance
        r = proj("r")(rel_sinusoid(m + ts, self.d_model)[None].astype(self.dtype))[0]
        if cache is None:
            out = self._segments(x, pq, pk, pv, r, u, vb, segment_ids)
            new_cache = None
        else:
            if segment_ids is not None:
                raise ValueError("transformer_xl: segment_ids with a cache are not supported "
                                 "(the memory does not record segments)")
            out, new_cache = self._with_memory(x, cache, pq, pk, pv, r, u, vb)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        return project_out(self, out, self.d_model), new_cache, no_aux()

    def _with_memory(self, x, cache: XLCache, pq, pk, pv, r, u, vb):
        """Tokens x attend to [memory; x] with the segment pattern; returns the new memory."""
        cfg = self.cfg
        t, lb, i0 = x.shape[1], cfg.buffer_len, cache.index
        hh = jnp.concatenate([jax.lax.stop_gradient(cache.mem).astype(x.dtype), x], axis=1)
        qp = i0 + jnp.arange(t)
        kp = i0 - lb + jnp.arange(lb + t)
        start = (qp // cfg.segment_len) * cfg.segment_len
        mask = (kp[None] >= 0) & (kp[None] <= qp[:, None]) & (kp[None] >= start[:, None] - cfg.mem_len)
        dist = jnp.arange(t)[:, None] + lb - jnp.arange(lb + t)[None]
        out = xl_attention(pq(x), pk(hh), pv(hh), r, u, vb, dist, mask[None])
        return out, XLCache(jax.lax.stop_gradient(hh[:, t:]).astype(cache.mem.dtype), i0 + t)

    def _segments(self, x, pq, pk, pv, r, u, vb, segment_ids):
        """Parallel form: all segments at once, memory keys from stop_gradient(x). Each
        segment's queries see ``span = mem_len + segment_len`` keys (memory, then itself)."""
        cfg = self.cfg
        m, ts = cfg.mem_len, cfg.segment_len
        b, t, _ = x.shape
        n_seg = -(-t // ts)
        tp = n_seg * ts
        pad_r = lambda y, c=0: jnp.pad(y, ((0, 0), (0, tp - t)) + ((0, 0),) * (y.ndim - 2),
                                       constant_values=c)
        xs = jax.lax.stop_gradient(x)
        mem_idx = (jnp.arange(n_seg) * ts)[:, None] + jnp.arange(m)[None]  # into left-padded coords
        memk = lambda y: jnp.take(jnp.pad(pad_r(y), ((0, 0), (m, 0), (0, 0), (0, 0))), mem_idx, axis=1)
        seg = lambda y: pad_r(y).reshape((b, n_seg, ts) + y.shape[2:])
        keys = jnp.concatenate([memk(pk(xs)), seg(pk(x))], axis=2)     # [B, n_seg, span, H, Dh]
        vals = jnp.concatenate([memk(pv(xs)), seg(pv(x))], axis=2)
        q = seg(pq(x))                                                  # [B, n_seg, segment_len, H, Dh]
        kpos = (jnp.arange(n_seg) * ts)[:, None] - m + jnp.arange(m + ts)[None]   # [n_seg, span]
        dist = jnp.arange(ts)[:, None] + m - jnp.arange(m + ts)[None]   # [segment_len, span] static
        mask = (dist >= 0)[None] & (kpos >= 0)[:, None] & (kpos < t)[:, None]   # [n_seg, segment_len, span]
        mask = jnp.broadcast_to(mask[None], (b,) + mask.shape)
        if segment_ids is not None:
            sq = pad_r(segment_ids, -1).reshape(b, n_seg, ts)
            sk = jnp.take(jnp.pad(segment_ids, ((0, 0), (m, tp - t)), constant_values=-2),
                          kpos + m, axis=1)                             # [B, n_seg, span]
            mask = mask & (sq[..., :, None] == sk[..., None, :])
        fold = lambda y: y.reshape((b * n_seg,) + y.shape[2:])
        out = xl_attention(fold(q), fold(keys), fold(vals), r, u, vb, dist, fold(mask))
        return out.reshape(b, tp, cfg.n_heads, -1)[:, :t]
