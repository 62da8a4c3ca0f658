"""Block-sparse softmax attention: the one core that every sparse pattern reduces to.

A pattern is given per query block ``i`` (of ``block_q`` rows) as a *static-size*
list of ``n`` key-block indices ``kv_blocks[..., i, :]`` (blocks of ``block_k``
keys) with a validity flag, plus a token-level rule evaluated inside each listed
block::

    visible(t, s) = valid[i, c] & (full[i, c] | rule(t, s)) & [t < T] & [s < S]
                    & [seg_q(t) == seg_k(s)]          for s in block kv_blocks[i, c]

``rule`` is a hashable callable on flat positions (e.g. ``Band(causal, window)``);
``full`` marks slots whose whole block is visible (BigBird random blocks, routed
blocks). Sliding windows, Longformer/BigBird, Sparse-Transformer, hierarchical
and content-routed patterns all build such lists; ``layers.blockwise_attention``
(causal / sliding window) is this core with the band list. Lists may be shared
(``[nq, n]``) or differ per batch row and kv head (``[B|1, K|1, nq, n]``, e.g. routed
attention). A block listed twice counts once (duplicates are invalidated).

Algorithm (online softmax, FlashAttention-2 style, in ``lax`` loops):

* forward: query blocks are processed ``chunk`` at a time (``lax.map`` over chunks;
  one chunk = one block reproduces the classic loop, all blocks = fully vectorized);
  inside a chunk a ``lax.scan`` over the ``n`` slots gathers one key block per query
  block and updates the running max ``m``, normalizer ``l`` and output; slots that
  are invalid for the whole chunk are skipped with ``lax.cond``. Saved: out, lse.
* backward (``jax.custom_vjp``): one pass in the same order recomputes
  ``p = exp(s - lse)``, accumulates dQ per chunk and scatter-adds dK, dV into the
  gathered blocks (``D = rowsum(dO * O)``).

Work and memory are ``O(T * n * block_k)``: no ``T x S`` score matrix or mask is
ever formed. Rows with no visible key return zeros (as ``reference_attention``).
GQA: queries are grouped ``[B, T, K, G, Dh]``; K/V are never repeated.

Note on XLA cost analysis: on CPU, ``compiled.cost_analysis()`` counts a while-loop
body once, so FLOP-scaling checks pass ``chunk=None`` (no chunk loop) and
``unroll=True`` (slot loop unrolled); the math is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from layers.typing import Array
from pallas_kernels.attention.reference import split_segment_ids

_NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Band:
    """Causal and/or sliding-window rule on flat positions (``reference_attention``'s)."""
    causal: bool = True
    window: int | None = None

    def __call__(self, qp: Array, kp: Array) -> Array:
        d = qp - kp
        ok = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
        if self.causal:
            ok &= d >= 0
        if self.window is not None:
            ok &= d < self.window
            if not self.causal:
                ok &= -d < self.window
        return ok


def dedupe(idx: Array, valid: Array) -> Array:
    """``valid`` with every repeat of an earlier valid index in the last axis cleared."""
    n = idx.shape[-1]
    same = idx[..., :, None] == idx[..., None, :]                      # [..., n, n]
    earlier = jnp.tril(jnp.ones((n, n), bool), -1)
    dup = jnp.any(same & earlier & valid[..., None, :], axis=-1)
    return valid & ~dup


def _take_blocks(x: Array, kj: Array) -> Array:
    """x [B, K, nk, ...] blocks, kj [Bi, Ki, c] -> [B, K, c, ...]."""
    b, kh = x.shape[:2]
    if kj.shape[0] == 1 and kj.shape[1] == 1:
        return jnp.take(x, kj[0, 0], axis=2)
    kj = jnp.broadcast_to(kj, (b, kh, kj.shape[2]))
    return x[jnp.arange(b)[:, None, None], jnp.arange(kh)[None, :, None], kj]


def _add_blocks(acc: Array, kj: Array, val: Array) -> Array:
    """Scatter-add ``val`` [B, K, c, ...] into ``acc`` [B, K, nk, ...] at blocks ``kj``."""
    b, kh = acc.shape[:2]
    if kj.shape[0] == 1 and kj.shape[1] == 1:
        return acc.at[:, :, kj[0, 0]].add(val)
    kj = jnp.broadcast_to(kj, (b, kh, kj.shape[2]))
    return acc.at[jnp.arange(b)[:, None, None], jnp.arange(kh)[None, :, None], kj].add(val)


def _layout(q, k, v, lists, q_seg, kv_seg, bq, bk, cq):
    """Pads and blocks the inputs; returns chunked views and dims."""
    b, t, h, dh = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    nq, nk = -(-t // bq), -(-s // bk)
    nch = -(-nq // cq)
    tp, sp = nch * cq * bq, nk * bk
    qc = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, nch, cq, bq, kh, g, dh)
    qc = jnp.moveaxis(qc, 1, 0)                                        # [nch, B, cq, bq, K, G, Dh]
    blk = lambda x: jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, 0))).reshape(
        b, nk, bk, kh, dh).transpose(0, 3, 1, 2, 4)                    # [B, K, nk, bk, Dh]
    idx, valid, full = (jnp.moveaxis(jnp.pad(x, ((0, 0), (0, 0), (0, nch * cq - nq), (0, 0))).reshape(
        x.shape[0], x.shape[1], nch, cq, x.shape[3]), 2, 0) for x in lists)  # [nch, Bi, Ki, cq, n]
    segs = None
    if q_seg is not None:
        qs = jnp.pad(q_seg, ((0, 0), (0, tp - t)), constant_values=-1).reshape(b, nch, cq, bq)
        ks = jnp.pad(kv_seg, ((0, 0), (0, sp - s)), constant_values=-2).reshape(b, nk, bk)
        segs = (jnp.moveaxis(qs, 1, 0), ks[:, None])                   # [nch, B, cq, bq], [B, 1, nk, bk]
    return qc, blk(k), blk(v), (idx, valid, full), segs, (b, t, s, h, kh, g, dh, nq, nk, nch)


def _slot_mask(ci, c, lists_c, segs_c, ks_all, dims, rule, bq, bk, cq):
    """Mask [B|1, K|1, cq, bq, bk] and (qpos - kpos) for slot ``c`` of chunk ``ci``."""
    idx_c, valid_c, full_c = lists_c
    b, t, s = dims[:3]
    kj = idx_c[..., c]                                                 # [Bi, Ki, cq]
    qpos = ((ci * cq + jnp.arange(cq))[:, None] * bq + jnp.arange(bq))[None, None, :, :, None]
    kpos = (kj[..., None] * bk + jnp.arange(bk))[:, :, :, None, :]     # [Bi, Ki, cq, 1, bk]
    ok = (qpos < t) & (kpos < s) & valid_c[..., c][..., None, None]
    if rule is not None:
        ok &= full_c[..., c][..., None, None] | rule(qpos, kpos)
    if segs_c is not None:
        ks = _take_blocks(jnp.broadcast_to(ks_all, (b, kj.shape[1]) + ks_all.shape[2:]), kj)
        ok &= segs_c[:, None, :, :, None] == ks[:, :, :, None, :]
    return ok, kj, qpos - kpos


def _mm(bq: int, x: Array) -> Array:
    """Operands of one-row blocks go to fp32: XLA:CPU has no bf16 x bf16 -> fp32
    matrix-vector dot (and such products are bandwidth-bound anyway)."""
    return x.astype(jnp.float32) if bq == 1 else x


def _scores(qc, kg, d, slopes, scale):
    """qc [B, cq, bq, K, G, Dh], kg [B, K, cq, bk, Dh] -> fp32 [B, K, G, cq, bq, bk]."""
    sc = jnp.einsum("bnqkgd,bknsd->bkgnqs", qc, kg, preferred_element_type=jnp.float32) * scale
    if slopes is not None:
        sc = sc - slopes[None, :, :, None, None, None] * jnp.abs(d).astype(jnp.float32)[:, :, None]
    return sc


def _forward(q, k, v, lists, q_seg, kv_seg, slopes, static):
    rule, scale, bq, bk, cq, unroll = static
    qc, kb, vb, lists_c, segs, dims = _layout(q, k, v, lists, q_seg, kv_seg, bq, bk, cq)
    b, t, s, h, kh, g, dh, nq, nk, nch = dims
    n = lists[0].shape[-1]

    def chunk(xs):
        ci, qcc, lc, sc_ = xs

        def slot(carry, c):
            def compute(carry):
                m, l, acc = carry
                ok, kj, d = _slot_mask(ci, c, lc, sc_, None if segs is None else segs[1],
                                       dims, rule, bq, bk, cq)
                kg, vg = _mm(bq, _take_blocks(kb, kj)), _mm(bq, _take_blocks(vb, kj))
                sc = jnp.where(ok[:, :, None], _scores(_mm(bq, qcc), kg, d, slopes, scale), _NEG)
                m_new = jnp.maximum(m, sc.max(-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(sc - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                pv = jnp.einsum("bkgnqs,bknsd->bkgnqd", p.astype(vg.dtype), vg,
                                preferred_element_type=jnp.float32)
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv
            return jax.lax.cond(jnp.any(lc[1][..., c]), compute, lambda x: x, carry), None

        shape = (b, kh, g, cq, bq)
        init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape + (dh,), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(slot, init, jnp.arange(n), unroll=unroll)
        l_safe = jnp.where(l > 0, l, 1.0)
        return acc / l_safe[..., None], jnp.where(l > 0, m + jnp.log(l_safe), _NEG)

    xs = (jnp.arange(nch), qc, lists_c, None if segs is None else segs[0])
    if nch == 1:
        out, lse = jax.tree.map(lambda x: x[None], chunk(jax.tree.map(lambda x: x[0], xs)))
    else:
        out, lse = jax.lax.map(chunk, xs)                                # [nch, B, K, G, cq, bq(, Dh)]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, nch * cq * bq, dh)[:, :, :, :t]
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, nch * cq * bq)[:, :, :, :t]
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, dh)
    return out.astype(q.dtype), lse                                     # lse: [B, K, G, T]


def _backward(q, k, v, lists, q_seg, kv_seg, slopes, out, lse, dout, static):
    rule, scale, bq, bk, cq, unroll = static
    qc, kb, vb, lists_c, segs, dims = _layout(q, k, v, lists, q_seg, kv_seg, bq, bk, cq)
    b, t, s, h, kh, g, dh, nq, nk, nch = dims
    n = lists[0].shape[-1]
    tp = nch * cq * bq
    chunked = lambda x: jnp.moveaxis(jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2)).reshape(
        (b, nch, cq, bq) + x.shape[2:]), 1, 0)
    do = chunked(dout.reshape(b, t, kh, g, dh))                        # [nch, B, cq, bq, K, G, Dh]
    delta = jnp.einsum("btkgd,btkgd->btkg", dout.reshape(b, t, kh, g, dh).astype(jnp.float32),
                       out.reshape(b, t, kh, g, dh).astype(jnp.float32))
    delta = jnp.moveaxis(chunked(delta), (4, 5), (2, 3))               # [nch, B, K, G, cq, bq]
    lse_c = jnp.moveaxis(chunked(jnp.moveaxis(lse, 3, 1)), (4, 5), (2, 3))
    lse_c = jnp.where(jnp.isfinite(lse_c), lse_c, jnp.inf)             # padding / empty rows: p = 0

    def chunk(carry, xs):
        ci, qcc, lc, sc_, doc, dl, lsec = xs

        def slot(carry, c):
            def compute(carry):
                dq, dkb, dvb = carry
                ok, kj, d = _slot_mask(ci, c, lc, sc_, None if segs is None else segs[1],
                                       dims, rule, bq, bk, cq)
                kg, vg = _mm(bq, _take_blocks(kb, kj)), _mm(bq, _take_blocks(vb, kj))
                p = jnp.where(ok[:, :, None], jnp.exp(_scores(_mm(bq, qcc), kg, d, slopes, scale)
                                                      - lsec[..., None]), 0.0)
                dp = jnp.einsum("bnqkgd,bknsd->bkgnqs", _mm(bq, doc), vg,
                                preferred_element_type=jnp.float32)
                ds = p * (dp - dl[..., None])
                dq = dq + jnp.einsum("bkgnqs,bknsd->bnqkgd", ds, kg.astype(jnp.float32)) * scale
                dk = jnp.einsum("bkgnqs,bnqkgd->bknsd", ds, qcc.astype(jnp.float32)) * scale
                dv = jnp.einsum("bkgnqs,bnqkgd->bknsd", p, doc.astype(jnp.float32))
                return dq, _add_blocks(dkb, kj, dk), _add_blocks(dvb, kj, dv)
            return jax.lax.cond(jnp.any(lc[1][..., c]), compute, lambda x: x, carry), None

        dq0 = jnp.zeros((b, cq, bq, kh, g, dh), jnp.float32)
        (dq, dkb, dvb), _ = jax.lax.scan(slot, (dq0,) + carry, jnp.arange(n), unroll=unroll)
        return (dkb, dvb), dq

    zeros = jnp.zeros((b, kh, nk, bk, dh), jnp.float32)
    xs = (jnp.arange(nch), qc, lists_c, None if segs is None else segs[0], do, delta, lse_c)
    if nch == 1:
        (dkb, dvb), dq = chunk((zeros, zeros), jax.tree.map(lambda x: x[0], xs))
        dq = dq[None]
    else:
        (dkb, dvb), dq = jax.lax.scan(chunk, (zeros, zeros), xs)
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, tp, h, dh)[:, :t]
    unblk = lambda x: x.transpose(0, 2, 3, 1, 4).reshape(b, nk * bk, kh, dh)[:, :s]
    return dq.astype(q.dtype), unblk(dkb).astype(k.dtype), unblk(dvb).astype(v.dtype)


def _zero_ct(x):
    if x is None:
        return None
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return jnp.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, lists, q_seg, kv_seg, slopes, static):
    return _forward(q, k, v, lists, q_seg, kv_seg, slopes, static)[0]


def _attention_fwd(q, k, v, lists, q_seg, kv_seg, slopes, static):
    out, lse = _forward(q, k, v, lists, q_seg, kv_seg, slopes, static)
    return out, (q, k, v, lists, q_seg, kv_seg, slopes, out, lse)


def _attention_bwd(static, res, dout):
    q, k, v, lists, q_seg, kv_seg, slopes, out, lse = res
    dq, dk, dv = _backward(q, k, v, lists, q_seg, kv_seg, slopes, out, lse, dout, static)
    return (dq, dk, dv, jax.tree.map(_zero_ct, lists), _zero_ct(q_seg), _zero_ct(kv_seg),
            _zero_ct(slopes))


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(q: Array, k: Array, v: Array, kv_blocks: Array, kv_valid: Array, *,
                           rule=None, kv_full: Array | None = None, segment_ids=None,
                           alibi_slopes: Array | None = None, scale: float | None = None,
                           block_q: int = 64, block_k: int = 64, chunk: int | None = None,
                           unroll: int | bool = 1) -> Array:
    """Softmax attention over the listed key blocks of every query block.

    Args:
      q: [B, T, H, Dh]; k, v: [B, S, K, Dh] with H % K == 0. Query ``t`` and key ``s``
        sit at flat positions ``t`` and ``s`` (what ``rule`` and ALiBi see).
      kv_blocks: int [nq, n] or [B|1, K|1, nq, n], nq = ceil(T / block_q): key-block
        indices (blocks of ``block_k`` keys) listed for each query block.
      kv_valid: bool, same shape: which list entries are used.
      rule: hashable ``rule(q_pos, k_pos) -> bool`` (broadcasting) applied inside listed
        blocks, e.g. ``Band(causal=True, window=W)``; None = all keys of a listed block.
      kv_full: bool like kv_valid: entries whose whole block is visible (rule skipped).
      segment_ids: None, [B, T] (T == S) or a pair ([B, T], [B, S]).
      alibi_slopes: [H] optional; bias ``-slope * |t - s|``.
      scale: score scale, default ``Dh ** -0.5``.
      block_q, block_k: block sizes (used as given: build the lists with the same ones).
      chunk: query tokens processed together (rounded to whole blocks); None = all.
      unroll: unroll factor of the slot loop (``True`` unrolls fully).

    Returns:
      [B, T, H, Dh] in q.dtype; gradients flow to q, k, v (custom VJP, no T x S state).
    """
    b, t, h, _ = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h % kh:
        raise ValueError(f"q heads H={h} must be a multiple of kv heads K={kh}")
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block_q={block_q}, block_k={block_k}: block sizes must be positive")
    nq = -(-t // block_q)
    as4 = lambda x: x[None, None] if x.ndim == 2 else x
    idx, valid = as4(jnp.asarray(kv_blocks, jnp.int32)), as4(jnp.asarray(kv_valid, bool))
    full = jnp.zeros_like(valid) if kv_full is None else as4(jnp.asarray(kv_full, bool))
    if idx.shape[2] != nq or idx.shape[0] not in (1, b) or idx.shape[1] not in (1, kh):
        raise ValueError(f"kv_blocks shape {kv_blocks.shape}: expected [nq={nq}, n] or "
                         f"[1|B={b}, 1|K={kh}, nq={nq}, n] for T={t}, block_q={block_q}")
    idx, valid, full = jnp.broadcast_arrays(idx, valid, full)
    valid = dedupe(idx, valid)
    idx = jnp.clip(idx, 0, -(-s // block_k) - 1)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    slopes = None
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(kh, h // kh)
    q_seg, kv_seg = split_segment_ids(tuple(segment_ids) if isinstance(segment_ids, list)
                                      else segment_ids, t, s)
    cq = nq if chunk is None else max(1, min(nq, chunk // block_q))
    static = (rule, scale, block_q, block_k, cq, unroll)
    return _attention(q, k, v, (idx, valid, full), q_seg, kv_seg, slopes, static)
