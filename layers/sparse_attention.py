"""Sparse and local softmax attention mixers on the block-sparse core.

Every mixer here is multi-head (GQA-capable) softmax attention whose training /
prefill path calls ``layers.block_sparse.block_sparse_attention`` with a pattern's
list of key blocks per query block, so FLOPs and memory are ``O(T * keys per query)``
and no ``T x T`` score matrix or mask is formed:

* ``sliding_window``: keys with ``0 <= t - s < W`` (Beltagy et al. 2020's local
  attention; ``|t - s| < W`` when bidirectional). Its decode cache is a ring buffer
  of ``W`` entries, so decode memory is O(W) instead of O(context).
* ``longformer`` (Beltagy et al. 2020): window + the first ``n_global`` positions as
  global tokens: every query sees them and (bidirectional) they see every key. In a
  causal model a global token ``g`` is visible to all queries after ``g`` and a
  global query sees all earlier keys (which, for prefix globals, are the window and
  the other globals).
* ``bigbird`` (Zaheer et al. 2020): window + globals + ``n_random`` random key
  blocks per query block, drawn by a hash of ``(seed, query block, key block)``
  among the blocks entirely outside the window (and, causal, entirely in the past):
  fixed per seed, independent of the sequence length (prefix-consistent, so decode
  sees the same blocks). Presets give each layer of the repeating group its own seed.

Decoding (a call with ``cache=``, causal only) is *dense over the cache* for
Longformer/BigBird: the new queries attend to the full KV cache under the pattern's
explicit mask (``visible``), O(context) per token. Positions for RoPE/xPos come
from ``positions``; the pattern itself (windows, blocks) lives on flat indices.
Bidirectional global query rows use one extra pass of ``n_global`` rows over all keys.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.attention import KVCache
from layers.block_sparse import Band, block_sparse_attention
from layers.blockwise_attention import band_lists
from layers.mixer import MixerConfig, nbytes, one_of, positive
from layers.positions import RopeConfig, alibi_slopes, apply_rope, apply_xpos
from layers.typing import Array, DType

SPARSE_POSITIONS = ("rope", "xpos", "alibi", "none")


# ----------------------------------------------------------------------------- helpers

def band_attention(q: Array, k: Array, v: Array, *, causal: bool, window: int | None,
                   segment_ids=None, slopes: Array | None = None, block_q: int = 64,
                   block_k: int = 64, chunk: int | None = None, unroll=1) -> Array:
    """Causal and/or sliding-window attention through the core (blocks clipped to T)."""
    t = q.shape[1]
    bq, bk = min(block_q, t), min(block_k, t)
    idx, valid = band_lists(-(-t // bq), -(-t // bk), bq, bk, causal, window)
    return block_sparse_attention(q, k, v, idx, valid, rule=Band(causal, window),
                                  segment_ids=segment_ids, alibi_slopes=slopes, block_q=bq,
                                  block_k=bk, chunk=chunk, unroll=unroll)


def masked_attention(q: Array, k: Array, v: Array, mask: Array, slopes: Array | None = None,
                     q_pos: Array | None = None, k_pos: Array | None = None,
                     scale: float | None = None) -> Array:
    """Dense softmax attention under an explicit mask (the decode path over a cache).

    q: [B, T, H, Dh]; k, v: [B, S, K, Dh]; mask: bool [B|1, K|1, T, S] or [T, S];
    slopes: optional ALiBi [H] with q_pos [T], k_pos [S]. Rows with no key give zeros.
    """
    b, t, h, dh = q.shape
    kh = k.shape[2]
    g = h // kh
    scale = dh ** -0.5 if scale is None else scale
    s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, kh, g, dh).astype(jnp.float32),
                   k.astype(jnp.float32)) * scale
    if slopes is not None:
        dist = jnp.abs(q_pos[:, None] - k_pos[None, :]).astype(jnp.float32)
        s = s - slopes.reshape(kh, g)[None, :, :, None, None] * dist
    mask = mask[None, None] if mask.ndim == 2 else mask
    mask = mask[:, :, None]                                            # [B|1, K|1, 1, T, S]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = p.sum(-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    return out.reshape(b, t, h, dh).astype(q.dtype)


def heads_kernel(mod: nn.Module, d_in: int, n: int, dh: int, axes: tuple[str, str], name: str) -> Array:
    """A logically partitioned [D, n, Dh] projection kernel ``name`` of ``mod``."""
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                            out_axis=(1, 2))
    return mod.param(name, nn.with_logical_partitioning(init, ("embed",) + axes), (d_in, n, dh),
                     mod.param_dtype)


def heads_proj(mod: nn.Module, x: Array, n: int, dh: int, axes: tuple[str, str], name: str) -> Array:
    """[B, T, D] -> [B, T, n, Dh] with a logically partitioned kernel ``name``."""
    w = heads_kernel(mod, x.shape[-1], n, dh, axes, name)
    return jnp.einsum("btd,dnh->btnh", x.astype(mod.dtype), w.astype(mod.dtype))


def out_proj(mod: nn.Module, out: Array, d_model: int, name: str = "o") -> Array:
    """[B, T, H, Dh] -> [B, T, D]."""
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1),
                                            out_axis=2)
    w = mod.param(name, nn.with_logical_partitioning(init, ("heads", "head_dim", "embed")),
                  out.shape[2:] + (d_model,), mod.param_dtype)
    return jnp.einsum("bthd,hdm->btm", out.astype(mod.dtype), w.astype(mod.dtype))


def apply_position(q: Array, k: Array, positions: Array, position: str, rope: RopeConfig):
    if position == "rope":
        return apply_rope(q, positions, rope), apply_rope(k, positions, rope)
    if position == "xpos":
        return apply_xpos(q, positions, rope, key=False), apply_xpos(k, positions, rope, key=True)
    return q, k


# ----------------------------------------------------------------------------- base config

@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig(MixerConfig):
    """Shared fields of the block-sparse mixers (an abstract base: no ``kind``).

    ``block_q``/``block_k``: core block sizes (clipped to T); ``chunk``: query tokens
    processed together by the core (None: the whole sequence at once).
    """
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    position: str = "rope"               # one of SPARSE_POSITIONS
    rope: RopeConfig = RopeConfig()
    block_q: int = 64
    block_k: int = 64
    chunk: int | None = 512
    positions_allowed: ClassVar[tuple[str, ...]] = SPARSE_POSITIONS

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def dh(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // self.n_heads

    def validate(self, d_model: int, path: str = "mixer") -> None:
        positive(f"{path}.n_heads", self.n_heads)
        positive(f"{path}.n_kv_heads", self.n_kv_heads, allow_none=True)
        positive(f"{path}.head_dim", self.head_dim, allow_none=True)
        positive(f"{path}.block_q", self.block_q)
        positive(f"{path}.block_k", self.block_k)
        positive(f"{path}.chunk", self.chunk, allow_none=True)
        one_of(f"{path}.position", self.position, self.positions_allowed)
        if self.n_heads % self.kv_heads:
            raise ValueError(f"{path}.n_heads={self.n_heads} must be divisible by "
                             f"{path}.n_kv_heads={self.kv_heads}")
        if self.head_dim is None and d_model % self.n_heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by {path}.n_heads="
                             f"{self.n_heads} (or set {path}.head_dim explicitly)")
        if self.position in ("rope", "xpos"):
            if self.dh(d_model) % 2:
                raise ValueError(f"{path}: head dim {self.dh(d_model)} is odd; {self.position} "
                                 "rotates channel pairs and needs an even head dim")
            self.rope.validate(f"{path}.rope")

    def make(self, d_model, dtype, param_dtype, name=None):
        return SparseAttention(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        if not self.causal:
            raise ValueError(f"{self.kind}: a bidirectional (causal=False) mixer has no decode cache")
        shape = (batch, max_len, self.kv_heads, self.dh(d_model))
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def state_size(self, d_model, seq_len, dtype=jnp.float32):
        return 2 * seq_len * self.kv_heads * self.dh(d_model) * nbytes(dtype)

    # --- pattern hooks -------------------------------------------------------------
    def attend(self, q: Array, k: Array, v: Array, segment_ids, slopes, *, unroll=1) -> Array:
        """Training/prefill path: q [B, T, H, Dh], k/v [B, T, K, Dh] -> [B, T, H, Dh]."""
        raise NotImplementedError

    def visible(self, q_pos: Array, k_pos: Array) -> Array:
        """Explicit causal-pattern mask [T, S] (or [K, T, S]) for flat positions (decode)."""
        raise NotImplementedError

    def decode_attend(self, q, ck, cv, q_pos, kv_len, slopes) -> Array:
        """Decode path: new queries at ``q_pos`` against the cache (dense, masked)."""
        k_pos = jnp.arange(ck.shape[1])
        mask = self.visible(q_pos, k_pos) & (k_pos < kv_len)
        return masked_attention(q, ck, cv, mask, slopes, q_pos, k_pos)


class SparseAttention(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new_cache or None) for any SparseAttentionConfig."""
    cfg: SparseAttentionConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache=None, train: bool = False):
        cfg = self.cfg
        h, kh, dh = cfg.n_heads, cfg.kv_heads, cfg.dh(self.d_model)
        q = heads_proj(self, x, h, dh, ("heads", "head_dim"), "q")      # [B, T, H, Dh]
        k = heads_proj(self, x, kh, dh, ("kv_heads", "head_dim"), "k")  # [B, T, K, Dh]
        v = heads_proj(self, x, kh, dh, ("kv_heads", "head_dim"), "v")
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        q, k = apply_position(q, k, positions, cfg.position, cfg.rope)
        slopes = alibi_slopes(h) if cfg.position == "alibi" else None
        t = x.shape[1]
        if cache is None:
            out, new_cache = cfg.attend(q, k, v, segment_ids, slopes), None
        elif isinstance(cache, RingCache):
            out, new_cache = ring_attend(cfg.window, q, k, v, cache, slopes)
        else:
            idx = cache.index
            ck = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), idx, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), idx, axis=1)
            out = cfg.decode_attend(q, ck, cv, idx + jnp.arange(t), idx + t, slopes)
            new_cache = KVCache(ck, cv, idx + t)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        return out_proj(self, out, self.d_model), new_cache


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
class SlidingWindowConfig(SparseAttentionConfig):
    """Local attention over the last ``window`` keys; ring-buffer decode cache of W slots."""
    kind: ClassVar[str] = "sliding_window"
    window: int = 256

    def validate(self, d_model, path="mixer"):
        super().validate(d_model, path)
        positive(f"{path}.window", self.window)

    def attend(self, q, k, v, segment_ids, slopes, *, unroll=1):
        return band_attention(q, k, v, causal=self.causal, window=self.window,
                              segment_ids=segment_ids, slopes=slopes, block_q=self.block_q,
                              block_k=self.block_k, chunk=self.chunk, unroll=unroll)

    def visible(self, q_pos, k_pos):
        return Band(True, self.window)(q_pos[:, None], k_pos[None, :])

    def init_cache(self, d_model, batch, max_len, dtype):
        if not self.causal:
            raise ValueError("sliding_window: a bidirectional (causal=False) mixer has no decode cache")
        shape = (batch, self.window, self.kv_heads, self.dh(d_model))
        return RingCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                         jnp.full((self.window,), -1, jnp.int32), jnp.zeros((), jnp.int32))

    def state_size(self, d_model, seq_len, dtype=jnp.float32):
        w = min(self.window, seq_len)
        return 2 * w * self.kv_heads * self.dh(d_model) * nbytes(dtype) + 4 * w


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
                                     segment_ids=segment_ids, block_q=bq, chunk=self.chunk, **kw)
        if self.causal:
            return out
        # Bidirectional global queries see every key: one extra pass of n_global rows.
        ng = min(self.n_global, t)
        nk = -(-t // bk)
        seg = None if segment_ids is None else (segment_ids[:, :ng], segment_ids)
        out_g = block_sparse_attention(q[:, :ng], k, v, jnp.arange(nk)[None], jnp.ones((1, nk), bool),
                                       segment_ids=seg, block_q=ng, chunk=None, **kw)
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
