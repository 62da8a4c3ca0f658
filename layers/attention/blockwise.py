"""Blockwise (memory-efficient / FlashAttention) softmax attention in pure JAX.

The algorithm of Rabe & Staats (2021) and Dao et al. (2022, FlashAttention-2
Alg. 1-2), written with ``lax`` loops instead of a kernel:

* forward: for each query block, scan over the key blocks it may see keeping a
  running max ``m``, normalizer ``l`` and unnormalized output ``acc``; save the
  output and the row log-sum-exp ``lse = m + log l``.
* backward (``jax.custom_vjp``): recompute ``p = exp(s - lse)`` block by block in
  the same order, accumulating dQ per query block and adding dK, dV into the
  visited key blocks, with ``D = rowsum(dO * O)``. Nothing of size T x S is
  stored, so forward and backward memory are O(T * block).

The loops are those of the block-sparse engine (``layers.attention.block_sparse``):
this module only builds the band-shaped list of key blocks per query block (causal
and/or sliding window) and calls the engine, by default one query block at a time.
It is the training path of ``attn_impl="blockwise"`` and of every causal or windowed
part of the pattern mixers (sliding window, Sparse Transformer, ...);
:func:`cached_attention` is the same engine for calls into a KV cache (prefill, chunked
prefill, decode), with key-block lists computed from the traced cache index.

Only key blocks that the mask can reach are visited: with a sliding window the
inner loop has a *fixed* trip count ``ceil((block_q + W - 1) / block_k) + 1``, so
FLOPs and time grow linearly in T; for plain causal masks blocks above the
diagonal are skipped with ``lax.cond``. GQA is computed by grouping query heads
``[B, T, K, G, Dh]`` against ``[B, S, K, Dh]``; K/V are never repeated.
Semantics (mask, zero rows) are those of ``pallas_kernels.reference_attention``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from layers.attention.block_sparse import Band, block_sparse_attention
from layers.typing import Array


def _delta_bounds(causal: bool, window: int | None) -> tuple[float, float]:
    """Range of ``pos_q - pos_k`` that can be visible."""
    lo = 0 if causal else (-(window - 1) if window is not None else -math.inf)
    hi = (window - 1) if window is not None else math.inf
    return lo, hi


def _inner_range(outer: Array, ob: int, ib: int, n_inner: int, lo: float, hi: float,
                 q_outer: bool) -> tuple[Array, Array, int]:
    """Inner-block range ``[first, last]`` reachable from outer block ``outer`` and a
    static trip count. ``q_outer``: outer blocks are query blocks."""
    start = outer * ob
    if q_outer:  # keys with pos_k in [pos_q - hi, pos_q - lo]
        lo_off, hi_off = -hi, -lo
    else:        # queries with pos_q in [pos_k + lo, pos_k + hi]
        lo_off, hi_off = lo, hi
    first = (0 if math.isinf(lo_off)
             else jnp.maximum(jnp.floor_divide(start + int(lo_off), ib), 0))
    last = (n_inner - 1 if math.isinf(hi_off)
            else jnp.minimum(jnp.floor_divide(start + ob - 1 + int(hi_off), ib), n_inner - 1))
    if math.isinf(lo) or math.isinf(hi):
        count = n_inner
    else:
        count = min(n_inner, (ob - 1 + int(hi - lo)) // ib + 2)
    return jnp.asarray(first, jnp.int32), jnp.asarray(last, jnp.int32), count


def band_lists(nq: int, nk: int, bq: int, bk: int, causal: bool,
               window: int | None) -> tuple[Array, Array]:
    """Key blocks a causal and/or windowed band can reach from each query block:
    ``(idx, valid)`` of shape [nq, count] with a static ``count`` (the window's trip
    count; all key blocks without a window, those above the diagonal invalid)."""
    lo, hi = _delta_bounds(causal, window)
    first, last, count = _inner_range(jnp.arange(nq), bq, bk, nk, lo, hi, q_outer=True)
    idx = jnp.broadcast_to(first, (nq,))[:, None] + jnp.arange(count)
    return idx, idx <= jnp.broadcast_to(last, (nq,))[:, None]


def blockwise_attention(q: Array, k: Array, v: Array, *, causal: bool = True,
                        window: int | None = None, segment_ids=None,
                        alibi_slopes: Array | None = None, scale: float | None = None,
                        block_q: int = 128, block_k: int = 128, query_chunk: int | None = 1,
                        unroll: int | bool = 1) -> Array:
    """Memory-efficient attention with the semantics of ``reference_attention``.

    Args:
      q: [B, T, H, Dh]; k, v: [B, S, K, Dh] with H % K == 0.
      causal, window, segment_ids, alibi_slopes, scale: as in ``reference_attention``
        (queries start at position 0: this is the training/prefill path).
      block_q, block_k: block sizes (clipped to T and S; any T works, padding is masked).
      query_chunk: query tokens processed together, rounded down to whole query blocks
        (at least one): the default 1 is the classic one-block-at-a-time loop; None = all
        blocks at once (fastest for short T, memory O(T * keys per query)).
      unroll: unroll factor of the engine's loop over key blocks.

    Returns:
      [B, T, H, Dh] in q.dtype. Gradients flow to q, k, v (custom VJP, O(T*block) memory).
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads H={q.shape[2]} must be a multiple of kv heads K={k.shape[2]}")
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block_q={block_q}, block_k={block_k}: block sizes must be positive")
    t, s = q.shape[1], k.shape[1]
    bq, bk = min(block_q, t), min(block_k, s)
    idx, valid = band_lists(-(-t // bq), -(-s // bk), bq, bk, causal, window)
    return block_sparse_attention(q, k, v, idx, valid, rule=Band(causal, window),
                                  segment_ids=segment_ids, alibi_slopes=alibi_slopes, scale=scale,
                                  block_q=bq, block_k=bk, query_chunk=query_chunk, unroll=unroll)


def cached_lists(nq: int, nk: int, bq: int, bk: int, q_offset: Array, kv_len: Array,
                 window: int | None) -> tuple[Array, Array]:
    """Key blocks each query block of a causal call into a KV cache may see: queries at
    ``q_offset + t``, keys ``s < kv_len`` (both traced). ``(idx, valid)`` [nq, count]:
    ``count`` is static (every cache block without a window, the window's trip count with
    one); blocks past ``kv_len`` or the diagonal are invalid, so the engine skips them."""
    q_first = q_offset + jnp.arange(nq, dtype=jnp.int32) * bq          # [nq]
    last = jnp.minimum((q_first + bq - 1) // bk, (kv_len - 1) // bk)
    if window is None:
        first, count = jnp.zeros_like(q_first), nk
    else:
        first = jnp.maximum(q_first - (window - 1), 0) // bk
        count = min(nk, (bq - 1 + window - 1) // bk + 2)
    idx = first[:, None] + jnp.arange(count, dtype=jnp.int32)
    return idx, (idx <= last[:, None]) & (idx < nk)


def cached_attention(q: Array, ck: Array, cv: Array, q_offset: Array, kv_len: Array, *,
                     window: int | None = None, alibi_slopes: Array | None = None,
                     scale: float | None = None, block_q: int = 128, block_k: int = 128,
                     query_chunk: int | None = 1) -> Array:
    """Causal attention of T new queries against a KV cache, blockwise (prefill, chunked
    prefill and token-by-token decode of ``attn_impl="blockwise"`` and the kernels).

    Args:
      q: [B, T, H, Dh] queries at positions ``q_offset + arange(T)``.
      ck, cv: [B, S, K, Dh] the cache (S = max_len), valid up to ``kv_len``.
      q_offset, kv_len: int32 scalars (traced).
      window, alibi_slopes, scale, block_q, block_k, query_chunk: as in
        :func:`blockwise_attention`.

    Returns:
      [B, T, H, Dh]; the values of ``reference_attention(q, ck, cv, causal=True,
      q_offset=q_offset, kv_len=kv_len, ...)``. Only key blocks below ``kv_len`` and the
      diagonal are computed (``lax.cond`` skips the rest), so prefilling T tokens into an
      empty cache costs what ``blockwise_attention`` on those T tokens costs, and a decode
      step reads the filled part of the cache only.
    """
    if q.shape[2] % ck.shape[2]:
        raise ValueError(f"q heads H={q.shape[2]} must be a multiple of kv heads K={ck.shape[2]}")
    t, s = q.shape[1], ck.shape[1]
    bq, bk = min(block_q, t), min(block_k, s)
    q_offset, kv_len = jnp.asarray(q_offset, jnp.int32), jnp.asarray(kv_len, jnp.int32)
    idx, valid = cached_lists(-(-t // bq), -(-s // bk), bq, bk, q_offset, kv_len, window)
    return block_sparse_attention(q, ck, cv, idx, valid, rule=Band(True, window),
                                  alibi_slopes=alibi_slopes, scale=scale, block_q=bq,
                                  block_k=bk, query_chunk=query_chunk, q_offset=q_offset,
                                  kv_len=kv_len)
