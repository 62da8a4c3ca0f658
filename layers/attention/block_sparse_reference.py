"""Dense references of the block-sparse engine (``layers.attention.block_sparse``).

* :func:`masked_attention`: fp32 softmax attention under an explicit boolean mask,
  with optional ALiBi; rows with no visible key give zeros. It is also the decode path
  of every pattern mixer (new queries against the whole KV cache).
* :func:`pattern_mask`: the ``[B|1, K|1, T, S]`` mask that a block-sparse call's lists,
  rule, ``kv_full`` flags and segment ids describe (the engine's module docstring
  gives the formula).
* :func:`block_sparse_reference`: ``masked_attention`` under ``pattern_mask`` -- the
  same arguments and the same function as ``block_sparse_attention``, computed by
  materializing ``[B, H, T, S]`` scores (for tests and documentation, O(T S) memory).
"""

from __future__ import annotations

import jax.numpy as jnp

from layers.attention.block_sparse import check_heads_and_blocks, pattern_lists
from layers.typing import Array
from pallas_kernels.attention.reference import split_segment_ids


def masked_attention(q: Array, k: Array, v: Array, mask: Array, slopes: Array | None = None,
                     q_pos: Array | None = None, k_pos: Array | None = None,
                     scale: float | None = None) -> Array:
    """Dense softmax attention under an explicit mask.

    Args:
      q: [B, T, H, Dh]; k, v: [B, S, K, Dh].
      mask: bool [B|1, K|1, T, S] or [T, S].
      slopes: optional ALiBi [H] with q_pos [T], k_pos [S] (bias ``-slope * |q_pos - k_pos|``).
      scale: default ``Dh ** -0.5``.

    Returns:
      [B, T, H, Dh] in q.dtype; rows with no visible key are zero.
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


def pattern_mask(t: int, s: int, kv_blocks: Array, kv_valid: Array, *, batch: int, kv_heads: int,
                 rule=None, kv_full: Array | None = None, segment_ids=None, block_q: int = 64,
                 block_k: int = 64) -> Array:
    """bool [B|1, K|1, T, S]: key ``s`` visible to query ``t`` under the block-sparse
    arguments (as ``block_sparse_attention`` takes them)."""
    nq, nk = -(-t // block_q), -(-s // block_k)
    lists = pattern_lists(kv_blocks, kv_valid, kv_full, batch=batch, kv_heads=kv_heads,
                          n_q_blocks=nq, n_k_blocks=nk)
    q_pos, k_pos = jnp.arange(t), jnp.arange(s)
    # listed[bi, ki, t, s]: some valid entry of t's query block lists s's key block
    hit = lists.idx[:, :, q_pos // block_q, :, None] == (k_pos // block_k)[None, None, None, None, :]
    valid = lists.valid[:, :, q_pos // block_q, :, None]
    full = lists.full[:, :, q_pos // block_q, :, None]
    listed = jnp.any(hit & valid, axis=3)                              # [Bi, Ki, T, S]
    if rule is None:
        mask = listed
    else:
        whole = jnp.any(hit & valid & full, axis=3)
        mask = listed & (whole | rule(q_pos[:, None], k_pos[None, :]))
    q_seg, kv_seg = split_segment_ids(tuple(segment_ids) if isinstance(segment_ids, list)
                                      else segment_ids, t, s)
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]
    return mask


def block_sparse_reference(q: Array, k: Array, v: Array, kv_blocks: Array, kv_valid: Array, *,
                           rule=None, kv_full: Array | None = None, segment_ids=None,
                           alibi_slopes: Array | None = None, scale: float | None = None,
                           block_q: int = 64, block_k: int = 64, query_chunk: int | None = None,
                           unroll: int | bool = 1) -> Array:
    """``block_sparse_attention`` computed densely: same arguments and result
    (``query_chunk`` and ``unroll`` only schedule the engine's loops; ignored here)."""
    del query_chunk, unroll
    check_heads_and_blocks(q, k, block_q, block_k)
    (b, t), (s, kh) = q.shape[:2], k.shape[1:3]
    mask = pattern_mask(t, s, kv_blocks, kv_valid, batch=b, kv_heads=kh, rule=rule,
                        kv_full=kv_full, segment_ids=segment_ids, block_q=block_q, block_k=block_k)
    return masked_attention(q, k, v, mask, alibi_slopes, jnp.arange(t), jnp.arange(s), scale)
