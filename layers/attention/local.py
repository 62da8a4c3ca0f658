"""Local softmax attention: sliding window, Longformer and BigBird.

* ``sliding_window``: keys with ``0 <= t - s < W`` (Beltagy et al. 2020's local
  attention; ``|t - s| < W`` when bidirectional). It is :class:`AttentionConfig` with
  a window (one sliding-window computation: ``attn_impl="blockwise"`` by default, the
  band on the block-sparse engine; ``"dense"`` and the kernels work too) whose decode
  cache is a ring buffer of ``W`` entries, so decode memory is O(W), not O(context).
* ``longformer`` (Beltagy et al. 2020): window + the first ``n_global`` positions as
  global tokens: every query sees them and (bidirectional) they see every key. In a
  causal model a global token ``g`` is visible to all queries after ``g`` and a
  global query sees all earlier keys (which, for prefix globals, are the window and
  the other globals).
* ``bigbird`` (Zaheer et al. 2020): window + globals + ``n_random`` random key
  blocks per query block, drawn by a hash of ``(seed, query block, key block)``
  among the blocks entirely outside the window (and, causal, entirely in the past):
  fixed per seed, independent of the sequence length (prefix-consistent, so decode
  sees the same blocks). Presets give each layer its own seed.

Longformer/BigBird run on the block-sparse engine (``layers.attention.sparse``);
decoding is dense over the KV cache under the pattern's explicit mask (``visible``).
Bidirectional global query rows use one extra pass of ``n_global`` rows over all keys.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from layers.attention.block_sparse import Band, block_sparse_attention
from layers.attention.block_sparse_reference import masked_attention
from layers.attention.blockwise import band_lists
from layers.attention.softmax import AttentionConfig
from layers.attention.sparse import SparseAttentionConfig
from layers.contracts import nbytes, positive
from layers.typing import Array


# ----------------------------------------------------------------------------- sliding window

class RingCache(NamedTuple):
    """Sliding-window decode state. k, v: [B, W, K, Dh]; pos: int32 [W] position held by
    each slot (-1 = empty); index: int32 [] tokens seen so far."""
    k: Array
    v: Array
    pos: Array
    index: Array


def ring_attend(window: int, q, k, v, cache: RingCache, slopes):
    """New tokens attend to [ring; themselves] with the window mask; the last W are kept."""
    t, w = q.shape[1], window
    i0 = cache.index
    q_pos = i0 + jnp.arange(t)
    keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)  # [B, W + T, K, Dh]
    vals = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
    k_pos = jnp.concatenate([cache.pos, q_pos])
    d = q_pos[:, None] - k_pos[None, :]
    mask = (k_pos[None, :] >= 0) & (d >= 0) & (d < w)
    out = masked_attention(q, keys, vals, mask, slopes, q_pos, k_pos)
    slot = jnp.where(jnp.arange(t) >= t - w, q_pos % w, w)             # older ones: dropped
    nk = cache.k.at[:, slot].set(k.astype(cache.k.dtype), mode="drop")
    nv = cache.v.at[:, slot].set(v.astype(cache.v.dtype), mode="drop")
    npos = cache.pos.at[slot].set(q_pos, mode="drop")
    return out, RingCache(nk, nv, npos, i0 + t)


@dataclasses.dataclass(frozen=True)
class SlidingWindowConfig(AttentionConfig):
    """Attention over the last ``window`` keys with a ring-buffer decode cache of W slots."""
    kind: ClassVar[str] = "sliding_window"
    attn_impl: str = "blockwise"
    window: int = 256
    block_q: int = 64
    block_k: int = 64
    query_chunk: int | None = 512

    def validate(self, d_model, path="mixer"):
        positive(f"{path}.window", self.window)
        super().validate(d_model, path)

    def init_cache(self, d_model, batch, max_len, dtype):
        if not self.causal:
            raise ValueError("sliding_window: a bidirectional (causal=False) mixer has no decode cache")
        shape = (batch, self.window, self.kv_heads, self.head_dim_for(d_model))
        return RingCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                         jnp.full((self.window,), -1, jnp.int32), jnp.zeros((), jnp.int32))

    def decode(self, q, k, v, cache, slopes):
        return ring_attend(self.window, q, k, v, cache, slopes)

    def state_size(self, d_model, seq_len, dtype=jnp.float32):
        w = min(self.window, seq_len)
        return 2 * w * self.kv_heads * self.head_dim_for(d_model) * nbytes(dtype) + 4 * w


# ----------------------------------------------------------------------------- Longformer / BigBird

@dataclasses.dataclass(frozen=True)
class LocalGlobal:
    """Window + prefix globals rule on flat positions (causality applied on top)."""
    causal: bool
    window: int
    n_global: int

    def __call__(self, qp, kp):
        ok = Band(self.causal, self.window)(qp, kp) | (kp < self.n_global) | (qp < self.n_global)
        return ok & (qp >= kp) if self.causal else ok


def _hash_uniform(seed: int, a: Array, b: Array) -> Array:
    """Deterministic uniforms in [0, 1) from integer triples (a murmur3-style mix)."""
    h = (jnp.uint32(seed) * jnp.uint32(0x9E3779B1)) ^ (a.astype(jnp.uint32) * jnp.uint32(0x85EBCA77))
    h = h ^ (b.astype(jnp.uint32) * jnp.uint32(0xC2B2AE3D))
    for shift, mul in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = (h ^ (h >> shift)) * jnp.uint32(mul)
    h = h ^ (h >> 16)
    return (h >> 8).astype(jnp.float32) / float(1 << 24)


@dataclasses.dataclass(frozen=True)
class LongformerConfig(SparseAttentionConfig):
    """Sliding window of ``window`` + the first ``n_global`` positions as global tokens."""
    kind: ClassVar[str] = "longformer"
    window: int = 128
    n_global: int = 1

    def validate(self, d_model, path="mixer"):
        super().validate(d_model, path)
        positive(f"{path}.window", self.window)
        positive(f"{path}.n_global", self.n_global)

    def rule(self):
        return LocalGlobal(self.causal, self.window, self.n_global)

    def lists(self, nq, nk, bq, bk):
        """(idx, valid, full) [nq, n]: window blocks + global blocks (+ random in BigBird)."""
        idx, valid = band_lists(nq, nk, bq, bk, self.causal, self.window)
        ng = min(-(-self.n_global // bk), nk)
        gidx = jnp.broadcast_to(jnp.arange(ng), (nq, ng))
        gval = jnp.ones((nq, ng), bool)
        if self.causal:
            gval = gidx * bk <= (jnp.arange(nq) * bq + bq - 1)[:, None]
        idx, valid = jnp.concatenate([idx, gidx], 1), jnp.concatenate([valid, gval], 1)
        return idx, valid, jnp.zeros_like(valid)

    def blocks(self, t: int) -> tuple[int, int]:
        """Core block sizes at length t (clipped: the pattern is token-level)."""
        return min(self.block_q, t), min(self.block_k, t)

    def attend(self, q, k, v, segment_ids, slopes, *, unroll=1):
        t = q.shape[1]
        bq, bk = self.blocks(t)
        idx, valid, full = self.lists(-(-t // bq), -(-t // bk), bq, bk)
        kw = dict(alibi_slopes=slopes, block_k=bk, unroll=unroll)
        out = block_sparse_attention(q, k, v, idx, valid, kv_full=full, rule=self.rule(),
                                     segment_ids=segment_ids, block_q=bq,
                                     query_chunk=self.query_chunk, **kw)
        if self.causal:
            return out
        # Bidirectional global queries see every key: one extra pass of n_global rows.
        ng = min(self.n_global, t)
        nk = -(-t // bk)
        seg = None if segment_ids is None else (segment_ids[:, :ng], segment_ids)
        out_g = block_sparse_attention(q[:, :ng], k, v, jnp.arange(nk)[None], jnp.ones((1, nk), bool),
                                       segment_ids=seg, block_q=ng, query_chunk=None, **kw)
        return jnp.concatenate([out_g, out[:, ng:]], axis=1)

    def visible(self, q_pos, k_pos):
        return self.rule()(q_pos[:, None], k_pos[None, :])


@dataclasses.dataclass(frozen=True)
class BigBirdConfig(LongformerConfig):
    """Longformer + ``n_random`` random key blocks per query block (fixed by ``seed``)."""
    kind: ClassVar[str] = "bigbird"
    n_random: int = 2
    seed: int = 0

    def validate(self, d_model, path="mixer"):
        super().validate(d_model, path)
        positive(f"{path}.n_random", self.n_random)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{path}.seed={self.seed!r} must be a non-negative integer")

    def blocks(self, t):
        return self.block_q, self.block_k   # not clipped: random blocks are defined per block

    def random_blocks(self, qi: Array, nk: int, bq: int, bk: int):
        """Random key blocks (idx, valid) [len(qi), n_random] of query blocks ``qi``:
        the top-``n_random`` hash scores among blocks wholly outside the window and the
        global blocks (and, causal, wholly before the query block)."""
        kb = jnp.arange(nk)
        lo_q, hi_q = qi * bq, qi * bq + bq - 1                          # query range of the block
        ng = -(-self.n_global // bk)
        before = (kb[None] + 1) * bk - 1 <= lo_q[:, None] - self.window
        cand = before if self.causal else before | (kb[None] * bk >= hi_q[:, None] + self.window)
        cand &= kb[None] >= ng
        u = jnp.where(cand, _hash_uniform(self.seed, qi[:, None], kb[None]), -1.0)
        r = min(self.n_random, nk)
        score, idx = jax.lax.top_k(u, r)
        return idx, score >= 0

    def lists(self, nq, nk, bq, bk):
        idx, valid, full = super().lists(nq, nk, bq, bk)
        ridx, rval = self.random_blocks(jnp.arange(nq), nk, bq, bk)
        return (jnp.concatenate([idx, ridx], 1), jnp.concatenate([valid, rval], 1),
                jnp.concatenate([full, rval], 1))

    def visible(self, q_pos, k_pos):
        bq, bk = self.block_q, self.block_k
        nk = -(-k_pos.shape[0] // bk)
        ridx, rval = self.random_blocks(q_pos // bq, nk, bq, bk)        # [T, r]
        in_rand = jnp.any((ridx[:, None, :] == (k_pos // bk)[None, :, None]) & rval[:, None, :], -1)
        return (super().visible(q_pos, k_pos) | in_rand) & (k_pos[None, :] <= q_pos[:, None])
