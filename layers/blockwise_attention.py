"""Blockwise (memory-efficient / FlashAttention) softmax attention in pure JAX.

The algorithm of Rabe & Staats (2021) and Dao et al. (2022, FlashAttention-2
Alg. 1-2), written with ``lax`` loops instead of a kernel:

* forward: for each query block, scan over the key blocks it may see keeping a
  running max ``m``, normalizer ``l`` and unnormalized output ``acc``; save the
  output and the row log-sum-exp ``lse = m + log l``.
* backward (``jax.custom_vjp``): recompute ``p = exp(s - lse)`` block by block;
  pass 1 (query-block outer) accumulates dQ, pass 2 (key-block outer) accumulates
  dK and dV, with ``D = rowsum(dO * O)``. Nothing of size T x S is stored, so
  forward and backward memory are O(T * block).

Only key blocks that the mask can reach are visited: with a sliding window the
inner loop has a *fixed* trip count ``ceil((block_q + W - 1) / block_k) + 1``, so
FLOPs and time grow linearly in T; for plain causal masks blocks above the
diagonal are skipped with ``lax.cond``. GQA is computed by grouping query heads
``[B, T, K, G, Dh]`` against ``[B, S, K, Dh]``; K/V are never repeated.
Semantics (mask, zero rows) are those of ``pallas_kernels.reference_attention``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from layers.typing import Array
from pallas_kernels.flash_attention.reference import split_segment_ids

_NEG = -jnp.inf


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


def _block_mask(qi, kj, bq, bk, t, s, causal, window, q_seg, kv_seg):
    """[B or 1, bq, bk] visibility of query block qi vs key block kj (padding masked)."""
    qp = qi * bq + jnp.arange(bq)
    kp = kj * bk + jnp.arange(bk)
    d = qp[:, None] - kp[None, :]
    ok = (qp[:, None] < t) & (kp[None, :] < s)
    if causal:
        ok &= d >= 0
    if window is not None:
        ok &= d < window
        if not causal:
            ok &= -d < window
    ok = ok[None]
    if q_seg is not None:
        qs = jax.lax.dynamic_slice_in_dim(q_seg, qi * bq, bq, axis=1)
        ks = jax.lax.dynamic_slice_in_dim(kv_seg, kj * bk, bk, axis=1)
        ok = ok & (qs[:, :, None] == ks[:, None, :])
    return ok, d


def _scores(qb, kb, d, slopes, scale):
    """qb [B, bq, K, G, Dh], kb [B, bk, K, Dh] -> fp32 scores [B, K, G, bq, bk]."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale
    if slopes is not None:
        s = s - slopes[None, :, :, None, None] * jnp.abs(d).astype(jnp.float32)
    return s


def _prep(q, k, v, segment_ids, block_q, block_k):
    b, t, h, dh = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = min(block_q, t), min(block_k, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    qpad = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, tp, kh, h // kh, dh)
    kpad = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    vpad = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    q_seg, kv_seg = split_segment_ids(segment_ids, t, s)
    if q_seg is not None:
        q_seg = jnp.pad(q_seg, ((0, 0), (0, tp - t)), constant_values=-1)
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, sp - s)), constant_values=-2)
    return qpad, kpad, vpad, q_seg, kv_seg, (b, t, s, h, kh, dh, bq, bk, tp // bq, sp // bk)


def _forward(q, k, v, segment_ids, slopes, causal, window, scale, block_q, block_k):
    qpad, kpad, vpad, q_seg, kv_seg, dims = _prep(q, k, v, segment_ids, block_q, block_k)
    b, t, s, h, kh, dh, bq, bk, nq, nk = dims
    g = h // kh
    lo, hi = _delta_bounds(causal, window)

    def q_block(qi):
        qb = jax.lax.dynamic_slice_in_dim(qpad, qi * bq, bq, axis=1)
        first, last, count = _inner_range(qi, bq, bk, nk, lo, hi, q_outer=True)

        def step(carry, c):
            kj = first + c

            def compute(carry):
                m, l, acc = carry
                kb = jax.lax.dynamic_slice_in_dim(kpad, kj * bk, bk, axis=1)
                vb = jax.lax.dynamic_slice_in_dim(vpad, kj * bk, bk, axis=1)
                ok, d = _block_mask(qi, kj, bq, bk, t, s, causal, window, q_seg, kv_seg)
                sc = jnp.where(ok[:, None, None], _scores(qb, kb, d, slopes, scale), _NEG)
                m_new = jnp.maximum(m, sc.max(-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(sc - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                l = alpha * l + p.sum(-1)
                pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vb.dtype), vb,
                                preferred_element_type=jnp.float32)
                return m_new, l, alpha[..., None] * acc + pv

            return jax.lax.cond(kj <= last, compute, lambda c_: c_, carry), None

        init = (jnp.full((b, kh, g, bq), _NEG, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
                jnp.zeros((b, kh, g, bq, dh), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(count))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), _NEG)
        return out, lse  # [B, K, G, bq, Dh], [B, K, G, bq]

    out, lse = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, K, G, bq, Dh]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, nq * bq, dh)[:, :, :, :t]
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, nq * bq)[:, :, :, :t]
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, dh)
    return out.astype(q.dtype), lse


def _backward(q, k, v, segment_ids, slopes, out, lse, dout, causal, window, scale, block_q, block_k):
    qpad, kpad, vpad, q_seg, kv_seg, dims = _prep(q, k, v, segment_ids, block_q, block_k)
    b, t, s, h, kh, dh, bq, bk, nq, nk = dims
    g = h // kh
    lo, hi = _delta_bounds(causal, window)
    tp = nq * bq
    pad_t = lambda x: jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2))
    do = pad_t(dout).reshape(b, tp, kh, g, dh)
    # D = rowsum(dO * O), laid out [B, K, G, Tp]; lse likewise (padding rows: -inf -> p = 0).
    delta = jnp.einsum("btkgd,btkgd->bkgt", do.astype(jnp.float32),
                       pad_t(out).reshape(b, tp, kh, g, dh).astype(jnp.float32))
    lse_p = jnp.pad(lse, ((0, 0), (0, 0), (0, 0), (0, tp - t)), constant_values=_NEG)

    def probs(qi, kj, qb, kb):
        ok, d = _block_mask(qi, kj, bq, bk, t, s, causal, window, q_seg, kv_seg)
        l_blk = jax.lax.dynamic_slice_in_dim(lse_p, qi * bq, bq, axis=3)
        l_safe = jnp.where(jnp.isfinite(l_blk), l_blk, 0.0)
        sc = _scores(qb, kb, d, slopes, scale)
        return jnp.where(ok[:, None, None], jnp.exp(sc - l_safe[..., None]), 0.0)

    def dscores(qi, kj, qb, kb, vb, dob):
        p = probs(qi, kj, qb, kb)  # [B, K, G, bq, bk]
        dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, vb, preferred_element_type=jnp.float32)
        dl = jax.lax.dynamic_slice_in_dim(delta, qi * bq, bq, axis=3)
        return p, p * (dp - dl[..., None])

    def dq_block(qi):  # pass 1: dQ
        qb = jax.lax.dynamic_slice_in_dim(qpad, qi * bq, bq, axis=1)
        dob = jax.lax.dynamic_slice_in_dim(do, qi * bq, bq, axis=1)
        first, last, count = _inner_range(qi, bq, bk, nk, lo, hi, q_outer=True)

        def step(dq, c):
            kj = first + c

            def compute(dq):
                kb = jax.lax.dynamic_slice_in_dim(kpad, kj * bk, bk, axis=1)
                vb = jax.lax.dynamic_slice_in_dim(vpad, kj * bk, bk, axis=1)
                _, ds = dscores(qi, kj, qb, kb, vb, dob)
                return dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, kb.astype(jnp.float32)) * scale
            return jax.lax.cond(kj <= last, compute, lambda x: x, dq), None

        dq, _ = jax.lax.scan(step, jnp.zeros((b, bq, kh, g, dh), jnp.float32), jnp.arange(count))
        return dq

    def dkv_block(kj):  # pass 2: dK, dV
        kb = jax.lax.dynamic_slice_in_dim(kpad, kj * bk, bk, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(vpad, kj * bk, bk, axis=1)
        first, last, count = _inner_range(kj, bk, bq, nq, lo, hi, q_outer=False)

        def step(carry, c):
            qi = first + c

            def compute(carry):
                dk, dv = carry
                qb = jax.lax.dynamic_slice_in_dim(qpad, qi * bq, bq, axis=1)
                dob = jax.lax.dynamic_slice_in_dim(do, qi * bq, bq, axis=1)
                p, ds = dscores(qi, kj, qb, kb, vb, dob)
                dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p, dob.astype(jnp.float32))
                dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qb.astype(jnp.float32)) * scale
                return dk, dv
            return jax.lax.cond(qi <= last, compute, lambda x: x, carry), None

        zeros = jnp.zeros((b, bk, kh, dh), jnp.float32)
        (dk, dv), _ = jax.lax.scan(step, (zeros, zeros), jnp.arange(count))
        return dk, dv

    dq = jnp.moveaxis(jax.lax.map(dq_block, jnp.arange(nq)), 0, 1).reshape(b, tp, h, dh)[:, :t]
    dk, dv = jax.lax.map(dkv_block, jnp.arange(nk))
    dk = jnp.moveaxis(dk, 0, 1).reshape(b, nk * bk, kh, dh)[:, :s]
    dv = jnp.moveaxis(dv, 0, 1).reshape(b, nk * bk, kh, dh)[:, :s]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _attention(q, k, v, segment_ids, slopes, causal, window, scale, block_q, block_k):
    return _forward(q, k, v, segment_ids, slopes, causal, window, scale, block_q, block_k)[0]


def _attention_fwd(q, k, v, segment_ids, slopes, causal, window, scale, block_q, block_k):
    out, lse = _forward(q, k, v, segment_ids, slopes, causal, window, scale, block_q, block_k)
    return out, (q, k, v, segment_ids, slopes, out, lse)


def _attention_bwd(causal, window, scale, block_q, block_k, res, dout):
    q, k, v, segment_ids, slopes, out, lse = res
    dq, dk, dv = _backward(q, k, v, segment_ids, slopes, out, lse, dout,
                           causal, window, scale, block_q, block_k)
    seg_ct = jax.tree.map(lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0),
                          segment_ids)
    slopes_ct = None if slopes is None else jnp.zeros_like(slopes)
    return dq, dk, dv, seg_ct, slopes_ct


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q: Array, k: Array, v: Array, *, causal: bool = True,
                        window: int | None = None, segment_ids=None,
                        alibi_slopes: Array | None = None, scale: float | None = None,
                        block_q: int = 128, block_k: int = 128) -> Array:
    """Memory-efficient attention with the semantics of ``reference_attention``.

    Args:
      q: [B, T, H, Dh]; k, v: [B, S, K, Dh] with H % K == 0.
      causal, window, segment_ids, alibi_slopes, scale: as in ``reference_attention``
        (queries start at position 0: this is the training/prefill path).
      block_q, block_k: block sizes (clipped to T and S; any T works, padding is masked).

    Returns:
      [B, T, H, Dh] in q.dtype. Gradients flow to q, k, v (custom VJP, O(T*block) memory).
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads H={q.shape[2]} must be a multiple of kv heads K={k.shape[2]}")
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block_q={block_q}, block_k={block_k}: block sizes must be positive")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.astype(jnp.float32).reshape(k.shape[2], q.shape[2] // k.shape[2])
    if isinstance(segment_ids, list):
        segment_ids = tuple(segment_ids)
    return _attention(q, k, v, segment_ids, slopes, causal, window, scale, block_q, block_k)
