"""Block-sparse softmax attention: the one engine that every sparse pattern reduces to.

A pattern is given per query block ``i`` (of ``Bq`` rows) as a *static-size* list of
``n`` key-block indices ``kv_blocks[..., i, :]`` (blocks of ``Bk`` keys) with a
validity flag, plus a token-level rule evaluated inside each listed block::

    visible(t, s) = valid[i, c] & (full[i, c] | rule(t, s)) & [t < T] & [s < S]
                    & [seg_q(t) == seg_k(s)]          for s in block kv_blocks[i, c]

``rule`` is a hashable callable on flat positions (e.g. ``Band(causal, window)``);
``full`` marks slots whose whole block is visible (BigBird random blocks, routed
blocks). Sliding windows, Longformer/BigBird, Sparse Transformer, hierarchical and
content-routed patterns all build such lists; ``layers.attention.blockwise`` (causal /
sliding window) is this engine with the band list. Lists may be shared (``[nq, n]``)
or differ per batch row and kv head (``[B|1, K|1, nq, n]``, e.g. routed attention).
A block listed twice counts once (duplicates are invalidated). The dense reference
with the same arguments is ``layers.attention.block_sparse_reference``.

Algorithm (online softmax, FlashAttention-2 style, in ``lax`` loops):

* forward: query blocks are processed ``query_chunk`` tokens (whole blocks) at a time
  (``lax.map`` over chunks; one block per chunk is the classic loop, all blocks is
  fully vectorized); inside a chunk a ``lax.scan`` over the ``n`` slots gathers one
  key block per query block and updates the running max ``m``, normalizer ``l`` and
  output. Each slot is one of three kinds (``lax.switch``): invalid for the whole chunk
  (skipped), visible whole (the rule's ``block_visible``, e.g. blocks strictly below the
  causal diagonal, or ``full``; no padding, no segment ids: no mask is built or applied),
  or masked. Saved: out, lse.
* backward (``jax.custom_vjp``): one pass in the same order recomputes
  ``p = exp(s - lse)``, accumulates dQ per chunk and scatter-adds dK, dV into the
  gathered blocks (``delta = rowsum(dO * O)``).

Layout: queries are kept as ``[B, K, cq, G, Bq, Dh]`` so that the G grouped heads' rows
of a query block form one contiguous ``[G*Bq, Dh]`` matrix per kv head, and every matmul
is a ``dot_general`` in canonical (batch, rows, columns) order: XLA:CPU then needs no
transposes of the ``[G*Bq, Bk]`` score blocks (with an einsum-ordered layout it copied
each score and probability block, which cost more than the matmuls). Calls into a KV
cache pass ``q_offset`` and ``kv_len`` (traced scalars, see ``Offsets``).

Work and memory are ``O(T * n * Bk)``: no ``T x S`` score matrix or mask is ever
formed. Rows with no visible key return zeros (as ``reference_attention``). GQA:
queries are grouped ``[B, T, K, G, Dh]``; K/V are never repeated.

Note on XLA cost analysis: on CPU, ``compiled.cost_analysis()`` counts a while-loop
body once, so FLOP-scaling checks pass ``query_chunk=None`` (no chunk loop) and
``unroll=True`` (slot loop unrolled); the math is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

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

    def block_visible(self, q_lo: Array, q_hi: Array, k_lo: Array, k_hi: Array) -> Array:
        """Whether every (query, key) pair of position ranges [q_lo, q_hi] x [k_lo, k_hi]
        is visible (the engine then skips the mask of that block)."""
        ok = jnp.ones(jnp.broadcast_shapes(q_lo.shape, k_lo.shape), bool)
        if self.causal:
            ok &= k_hi <= q_lo
        if self.window is not None:
            ok &= q_hi - k_lo < self.window
            if not self.causal:
                ok &= k_hi - q_lo < self.window
        return ok


class PatternLists(NamedTuple):
    """The pattern, each ``[Bi, Ki, nq, n]`` (Bi in {1, B}, Ki in {1, K}): key-block
    index, whether the entry is used, whether its whole block is visible."""
    idx: Array
    valid: Array
    full: Array


class Static(NamedTuple):
    """Hashable (non-differentiable) settings of one call."""
    rule: Any                 # rule(q_pos, k_pos) -> bool, or None
    scale: float
    block_q: int              # Bq
    block_k: int              # Bk
    chunk_blocks: int         # query blocks per chunk (query_chunk // Bq, >= 1)
    unroll: int | bool


class Geometry(NamedTuple):
    """Sizes of one call (Python ints)."""
    batch: int                # B
    q_len: int                # T
    kv_len: int               # S
    kv_heads: int             # K
    group: int                # G = H // K
    head_dim: int             # Dh
    block_q: int              # Bq
    block_k: int              # Bk
    n_q_blocks: int           # nq = ceil(T / Bq)
    n_k_blocks: int           # nk = ceil(S / Bk)
    chunk_blocks: int         # cq: query blocks per chunk
    n_chunks: int             # NC = ceil(nq / cq)

    @property
    def padded_q_len(self) -> int:
        return self.n_chunks * self.chunk_blocks * self.block_q


class Offsets(NamedTuple):
    """Dynamic int32 scalars of a call into a KV cache: the position of query 0 and the
    number of valid keys (keys at ``s >= kv_len`` are invisible). (0, S) for self-attention."""
    q_offset: Array
    kv_len: Array


class Blocked(NamedTuple):
    """The inputs in the engine's layout."""
    q: Array                  # [NC, B, K, cq, G, Bq, Dh]   (cq = query blocks per chunk)
    k: Array                  # [B, K, nk, Bk, Dh]
    v: Array                  # [B, K, nk, Bk, Dh]
    lists: PatternLists       # each [NC, Bi, Ki, cq, n]
    q_seg: Array | None       # [NC, B, cq, Bq]
    k_seg: Array | None       # [B, 1, nk, Bk]
    slopes: Array | None      # ALiBi [K, G] fp32
    offsets: Offsets


class Chunk(NamedTuple):
    """One chunk of query blocks (the ``xs`` of the chunk loop); backward-only fields
    are None in the forward pass."""
    index: Array              # int32 []
    q: Array                  # [B, K, cq, G, Bq, Dh]
    lists: PatternLists       # each [Bi, Ki, cq, n]
    q_seg: Array | None       # [B, cq, Bq]
    dout: Array | None = None    # [B, K, cq, G, Bq, Dh]
    delta: Array | None = None   # [B, K, cq, G, Bq] rowsum(dO * O)
    lse: Array | None = None     # [B, K, cq, G, Bq]


# ----------------------------------------------------------------------------- layout

def _geometry(q: Array, k: Array, static: Static) -> Geometry:
    b, t, h, dh = q.shape
    s, kh = k.shape[1], k.shape[2]
    nq, nk = -(-t // static.block_q), -(-s // static.block_k)
    cq = static.chunk_blocks
    return Geometry(b, t, s, kh, h // kh, dh, static.block_q, static.block_k, nq, nk, cq,
                    -(-nq // cq))


def _pad_axis1(x: Array, n: int, value=0) -> Array:
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2),
                   constant_values=value)


def _chunked(x: Array, geo: Geometry, value=0) -> Array:
    """[B, T, ...] -> [NC, B, cq, Bq, ...] (padded with ``value``)."""
    x = _pad_axis1(x, geo.padded_q_len, value)
    x = x.reshape((geo.batch, geo.n_chunks, geo.chunk_blocks, geo.block_q) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _rows_in(x: Array, geo: Geometry) -> Array:
    """Grouped per-token values [B, T, K, G, ...] -> the engine's row layout
    [NC, B, K, cq, G, Bq, ...]: every query block's rows of one kv head are the
    contiguous (G, Bq) rows of one matmul, so score blocks need no transposes."""
    x = _chunked(x, geo)                                               # [NC, B, cq, Bq, K, G, ...]
    return jnp.transpose(x, (0, 1, 4, 2, 5, 3) + tuple(range(6, x.ndim)))


def _rows_out(x: Array, geo: Geometry) -> Array:
    """Inverse of :func:`_rows_in`: [NC, B, K, cq, G, Bq, ...] -> [B, T, K, G, ...]."""
    x = jnp.transpose(x, (1, 0, 3, 5, 2, 4) + tuple(range(6, x.ndim)))
    x = x.reshape((geo.batch, geo.padded_q_len) + x.shape[4:])
    return x[:, :geo.q_len]


def _layout(q, k, v, lists: PatternLists, q_seg, kv_seg, slopes, offsets: Offsets,
            geo: Geometry) -> Blocked:
    """Pads and blocks the inputs."""
    b, kh, dh, nk, bk = geo.batch, geo.kv_heads, geo.head_dim, geo.n_k_blocks, geo.block_k
    blk = lambda x: _pad_axis1(x, nk * bk).reshape(b, nk, bk, kh, dh).transpose(0, 3, 1, 2, 4)

    def chunk_list(x):  # [Bi, Ki, nq, n] -> [NC, Bi, Ki, cq, n]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, geo.n_chunks * geo.chunk_blocks - geo.n_q_blocks), (0, 0)))
        return jnp.moveaxis(x.reshape(x.shape[:2] + (geo.n_chunks, geo.chunk_blocks, x.shape[3])), 2, 0)
    qs = ks = None
    if q_seg is not None:
        qs = _chunked(q_seg, geo, -1)
        ks = _pad_axis1(kv_seg, nk * bk, -2).reshape(b, nk, bk)[:, None]
    qc = _rows_in(q.reshape(b, geo.q_len, kh, geo.group, dh), geo)
    return Blocked(qc, blk(k), blk(v), PatternLists(*map(chunk_list, lists)), qs, ks, slopes,
                   offsets)


def _take_blocks(x: Array, kj: Array) -> Array:
    """x [B, K, nk, ...] blocks, kj [Bi, Ki, cq] -> [B, K, cq, ...]."""
    b, kh = x.shape[:2]
    if kj.shape[0] == 1 and kj.shape[1] == 1:
        return jnp.take(x, kj[0, 0], axis=2)
    kj = jnp.broadcast_to(kj, (b, kh, kj.shape[2]))
    return x[jnp.arange(b)[:, None, None], jnp.arange(kh)[None, :, None], kj]


def _add_blocks(acc: Array, kj: Array, val: Array) -> Array:
    """Scatter-add ``val`` [B, K, cq, ...] into ``acc`` [B, K, nk, ...] at blocks ``kj``."""
    b, kh = acc.shape[:2]
    if kj.shape[0] == 1 and kj.shape[1] == 1:
        return acc.at[:, :, kj[0, 0]].add(val)
    kj = jnp.broadcast_to(kj, (b, kh, kj.shape[2]))
    return acc.at[jnp.arange(b)[:, None, None], jnp.arange(kh)[None, :, None], kj].add(val)


def _bmm(x: Array, y: Array, contract: tuple[int, int]) -> Array:
    """Batched matmul over the three leading axes (B, K, cq) of 5-d operands, with
    G-grouped rows flattened: x [B, K, cq, G, Bq, X] or [B, K, cq, R, X]. fp32 result."""
    flat = lambda z: z.reshape(z.shape[:3] + (-1, z.shape[-1])) if z.ndim == 6 else z
    dims = (((contract[0],), (contract[1],)), ((0, 1, 2), (0, 1, 2)))
    return jax.lax.dot_general(flat(x), flat(y), dims, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- one slot

class Slot(NamedTuple):
    """What slot ``c`` of a chunk sees."""
    ok: Array | None          # bool [Bi|B, Ki|K, cq, 1, Bq, Bk]; None: the whole block is visible
    kj: Array                 # int32 [Bi, Ki, cq] key blocks
    k: Array                  # [B, K, cq, Bk, Dh] gathered keys
    v: Array                  # [B, K, cq, Bk, Dh] gathered values
    scores: Array             # fp32 [B, K, cq, G, Bq, Bk] (unmasked)


def _mm(bq: int, x: Array) -> Array:
    """Operands of one-row blocks go to fp32: XLA:CPU has no bf16 x bf16 -> fp32
    matrix-vector dot (and such products are bandwidth-bound anyway)."""
    return x.astype(jnp.float32) if bq == 1 else x


def _positions(chunk: Chunk, c, blk: Blocked, geo: Geometry):
    """(q_idx [1, 1, cq, Bq, 1] local rows, q_pos (+ q_offset), k_pos [Bi, Ki, cq, 1, Bk], kj)."""
    bq, bk, cq = geo.block_q, geo.block_k, geo.chunk_blocks
    kj = chunk.lists.idx[..., c]
    q_idx = ((chunk.index * cq + jnp.arange(cq))[:, None] * bq + jnp.arange(bq))[None, None, :, :, None]
    k_pos = (kj[..., None] * bk + jnp.arange(bk))[:, :, :, None, :]
    return q_idx, q_idx + blk.offsets.q_offset, k_pos, kj


def _slot(blk: Blocked, chunk: Chunk, c, geo: Geometry, static: Static, masked: bool) -> Slot:
    """Gathers the key block of slot ``c`` for every query block of ``chunk``;
    ``masked=False`` (a block the chunk sees whole, see :func:`_slot_kind`) skips the mask."""
    lists = chunk.lists
    q_idx, q_pos, k_pos, kj = _positions(chunk, c, blk, geo)
    ok = None
    if masked:
        ok = (q_idx < geo.q_len) & (k_pos < blk.offsets.kv_len) & lists.valid[..., c][..., None, None]
        if static.rule is not None:
            ok &= lists.full[..., c][..., None, None] | static.rule(q_pos, k_pos)
        if chunk.q_seg is not None:
            ks = _take_blocks(jnp.broadcast_to(blk.k_seg, (geo.batch, kj.shape[1]) + blk.k_seg.shape[2:]), kj)
            ok &= chunk.q_seg[:, None, :, :, None] == ks[:, :, :, None, :]
        ok = ok[:, :, :, None]                                         # broadcast over G
    bq = geo.block_q
    kg, vg = _mm(bq, _take_blocks(blk.k, kj)), _mm(bq, _take_blocks(blk.v, kj))
    sc = _bmm(_mm(bq, chunk.q), kg, (4, 4)).reshape(chunk.q.shape[:-1] + (geo.block_k,))
    sc = sc * static.scale
    if blk.slopes is not None:
        dist = jnp.abs(q_pos - k_pos).astype(jnp.float32)[:, :, :, None]
        sc = sc - blk.slopes[None, :, None, :, None, None] * dist
    return Slot(ok, kj, kg, vg, sc)


def _slot_kind(chunk: Chunk, c, blk: Blocked, geo: Geometry, static: Static) -> Array:
    """0: slot ``c`` is invalid for the whole chunk (skipped); 1: every listed block is
    visible whole (no mask needed: rule's ``block_visible`` or ``full``, no padding, no
    segment ids); 2: masked."""
    lists = chunk.lists
    valid = lists.valid[..., c]
    whole = jnp.asarray(False)
    if chunk.q_seg is None:
        q_idx, q_pos, k_pos, _ = _positions(chunk, c, blk, geo)
        inside = (q_idx[..., -1, :].max() < geo.q_len) & (k_pos[..., -1].max() < blk.offsets.kv_len)
        block_ok = lists.full[..., c]
        rule_whole = getattr(static.rule, "block_visible", None)
        if static.rule is None:
            block_ok = jnp.ones_like(block_ok)
        elif rule_whole is not None:
            q_lo, q_hi = q_pos[..., 0, 0], q_pos[..., -1, 0]             # [1, 1, cq]
            k_lo, k_hi = k_pos[..., 0, 0], k_pos[..., 0, -1]             # [Bi, Ki, cq]
            block_ok |= rule_whole(q_lo, q_hi, k_lo, k_hi)
        whole = inside & jnp.all(valid & block_ok)
    return jnp.where(jnp.any(valid), jnp.where(whole, 1, 2), 0)


def _switch_slot(chunk: Chunk, c, blk, geo, static, compute, carry):
    """Runs ``compute(carry, c, masked)`` for the slot's kind (:func:`_slot_kind`)."""
    kind = _slot_kind(chunk, c, blk, geo, static)
    return jax.lax.switch(kind, (lambda x: x, lambda x: compute(x, c, False),
                                 lambda x: compute(x, c, True)), carry)


def _map_chunks(fn, xs: Chunk, n_chunks: int):
    """``lax.map(fn, xs)`` (no loop when there is one chunk)."""
    if n_chunks == 1:
        return jax.tree.map(lambda x: x[None], fn(jax.tree.map(lambda x: x[0], xs)))
    return jax.lax.map(fn, xs)


# ----------------------------------------------------------------------------- forward

def _forward_chunk(chunk: Chunk, blk: Blocked, geo: Geometry, static: Static):
    """Online softmax over the slots: (out [B, K, cq, G, Bq, Dh], lse [B, K, cq, G, Bq])."""
    def compute(carry, c, masked):
        m, l, acc = carry
        sl = _slot(blk, chunk, c, geo, static, masked)
        sc = sl.scores if sl.ok is None else jnp.where(sl.ok, sl.scores, _NEG)
        m_new = jnp.maximum(m, sc.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0) if masked else m_new
        p = jnp.exp(sc - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        pv = _bmm(p.astype(sl.v.dtype), sl.v, (4, 3)).reshape(acc.shape)
        return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    def slot(carry, c):
        return _switch_slot(chunk, c, blk, geo, static, compute, carry), None

    shape = (geo.batch, geo.kv_heads, geo.chunk_blocks, geo.group, geo.block_q)
    init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (geo.head_dim,), jnp.float32))
    n = chunk.lists.idx.shape[-1]
    (m, l, acc), _ = jax.lax.scan(slot, init, jnp.arange(n), unroll=static.unroll)
    l_safe = jnp.where(l > 0, l, 1.0)
    return acc / l_safe[..., None], jnp.where(l > 0, m + jnp.log(l_safe), _NEG)


def _forward(q, k, v, lists, q_seg, kv_seg, slopes, offsets, static: Static):
    """(out [B, T, H, Dh] in q.dtype, lse fp32 [B, T, K, G])."""
    geo = _geometry(q, k, static)
    blk = _layout(q, k, v, lists, q_seg, kv_seg, slopes, offsets, geo)
    xs = Chunk(jnp.arange(geo.n_chunks), blk.q, blk.lists, blk.q_seg)
    out, lse = _map_chunks(lambda ch: _forward_chunk(ch, blk, geo, static), xs, geo.n_chunks)
    out = _rows_out(out, geo).reshape(geo.batch, geo.q_len, -1, geo.head_dim)
    return out.astype(q.dtype), _rows_out(lse, geo)


# ----------------------------------------------------------------------------- backward

def _backward_chunk(carry, chunk: Chunk, blk: Blocked, geo: Geometry, static: Static):
    """dQ of one chunk; dK, dV (blocked, fp32) accumulated in ``carry``."""
    def compute(carry, c, masked):
        dq, dkb, dvb = carry
        sl = _slot(blk, chunk, c, geo, static, masked)
        p = jnp.exp(sl.scores - chunk.lse[..., None])
        if sl.ok is not None:
            p = jnp.where(sl.ok, p, 0.0)
        dout = _mm(geo.block_q, chunk.dout)
        dp = _bmm(dout, sl.v, (4, 4)).reshape(p.shape)
        ds = p * (dp - chunk.delta[..., None])
        dq = dq + _bmm(ds, sl.k.astype(jnp.float32), (4, 3)).reshape(dq.shape) * static.scale
        dk = _bmm(ds, chunk.q.astype(jnp.float32), (3, 3)) * static.scale   # [B, K, cq, Bk, Dh]
        dv = _bmm(p, chunk.dout.astype(jnp.float32), (3, 3))
        return dq, _add_blocks(dkb, sl.kj, dk), _add_blocks(dvb, sl.kj, dv)

    def slot(carry, c):
        return _switch_slot(chunk, c, blk, geo, static, compute, carry), None

    dq0 = jnp.zeros(chunk.q.shape, jnp.float32)                       # [B, K, cq, G, Bq, Dh]
    n = chunk.lists.idx.shape[-1]
    (dq, dkb, dvb), _ = jax.lax.scan(slot, (dq0,) + carry, jnp.arange(n), unroll=static.unroll)
    return (dkb, dvb), dq


def _backward(q, k, v, lists, q_seg, kv_seg, slopes, offsets, out, lse, dout, static: Static):
    geo = _geometry(q, k, static)
    blk = _layout(q, k, v, lists, q_seg, kv_seg, slopes, offsets, geo)
    b, t, kh, g, dh = geo.batch, geo.q_len, geo.kv_heads, geo.group, geo.head_dim
    grouped = lambda x: x.reshape(b, t, kh, g, dh)
    delta = jnp.einsum("btkgd,btkgd->btkg", grouped(dout).astype(jnp.float32),
                       grouped(out).astype(jnp.float32))
    lse_c = _rows_in(jnp.where(jnp.isfinite(lse), lse, jnp.inf), geo)  # empty rows: p = 0
    xs = Chunk(jnp.arange(geo.n_chunks), blk.q, blk.lists, blk.q_seg,
               _rows_in(grouped(dout), geo), _rows_in(delta, geo), lse_c)
    zeros = jnp.zeros((b, kh, geo.n_k_blocks, geo.block_k, dh), jnp.float32)
    run = lambda carry, ch: _backward_chunk(carry, ch, blk, geo, static)
    if geo.n_chunks == 1:
        (dkb, dvb), dq = run((zeros, zeros), jax.tree.map(lambda x: x[0], xs))
        dq = dq[None]
    else:
        (dkb, dvb), dq = jax.lax.scan(run, (zeros, zeros), xs)
    dq = _rows_out(dq, geo).reshape(b, t, kh * g, dh)
    unblk = lambda x: x.transpose(0, 2, 3, 1, 4).reshape(b, geo.n_k_blocks * geo.block_k, kh, dh)
    s = geo.kv_len
    return dq.astype(q.dtype), unblk(dkb)[:, :s].astype(k.dtype), unblk(dvb)[:, :s].astype(v.dtype)


# ----------------------------------------------------------------------------- custom VJP

def _zero_ct(x):
    if x is None:
        return None
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return jnp.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _attention(q, k, v, lists, q_seg, kv_seg, slopes, offsets, static):
    return _forward(q, k, v, lists, q_seg, kv_seg, slopes, offsets, static)[0]


def _attention_fwd(q, k, v, lists, q_seg, kv_seg, slopes, offsets, static):
    out, lse = _forward(q, k, v, lists, q_seg, kv_seg, slopes, offsets, static)
    return out, (q, k, v, lists, q_seg, kv_seg, slopes, offsets, out, lse)


def _attention_bwd(static, res, dout):
    q, k, v, lists, q_seg, kv_seg, slopes, offsets, out, lse = res
    dq, dk, dv = _backward(q, k, v, lists, q_seg, kv_seg, slopes, offsets, out, lse, dout, static)
    return (dq, dk, dv, jax.tree.map(_zero_ct, lists), _zero_ct(q_seg), _zero_ct(kv_seg),
            _zero_ct(slopes), jax.tree.map(_zero_ct, offsets))


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- public API

def dedupe(idx: Array, valid: Array) -> Array:
    """``valid`` with every repeat of an earlier valid index in the last axis cleared."""
    n = idx.shape[-1]
    same = idx[..., :, None] == idx[..., None, :]                      # [..., n, n]
    earlier = jnp.tril(jnp.ones((n, n), bool), -1)
    dup = jnp.any(same & earlier & valid[..., None, :], axis=-1)
    return valid & ~dup


def pattern_lists(kv_blocks, kv_valid, kv_full, *, batch: int, kv_heads: int, n_q_blocks: int,
                  n_k_blocks: int) -> PatternLists:
    """Checks and normalizes the lists to ``[Bi, Ki, nq, n]`` (duplicates invalidated,
    indices clipped into range). Shared by the engine and its dense reference."""
    as4 = lambda x: x[None, None] if x.ndim == 2 else x
    idx, valid = as4(jnp.asarray(kv_blocks, jnp.int32)), as4(jnp.asarray(kv_valid, bool))
    full = jnp.zeros_like(valid) if kv_full is None else as4(jnp.asarray(kv_full, bool))
    if (idx.ndim != 4 or idx.shape[2] != n_q_blocks or idx.shape[0] not in (1, batch)
            or idx.shape[1] not in (1, kv_heads)):
        raise ValueError(f"kv_blocks shape {tuple(jnp.shape(kv_blocks))}: expected [nq={n_q_blocks}, n] "
                         f"or [1|B={batch}, 1|K={kv_heads}, nq={n_q_blocks}, n]")
    idx, valid, full = jnp.broadcast_arrays(idx, valid, full)
    return PatternLists(jnp.clip(idx, 0, n_k_blocks - 1), dedupe(idx, valid), full)


def check_heads_and_blocks(q: Array, k: Array, block_q: int, block_k: int) -> None:
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads H={q.shape[2]} must be a multiple of kv heads K={k.shape[2]}")
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block_q={block_q}, block_k={block_k}: block sizes must be positive")


def block_sparse_attention(q: Array, k: Array, v: Array, kv_blocks: Array, kv_valid: Array, *,
                           rule=None, kv_full: Array | None = None, segment_ids=None,
                           alibi_slopes: Array | None = None, scale: float | None = None,
                           block_q: int = 64, block_k: int = 64, query_chunk: int | None = None,
                           unroll: int | bool = 1, q_offset: Array | int = 0,
                           kv_len: Array | int | None = None) -> Array:
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
      query_chunk: query tokens processed together, rounded down to whole query blocks
        (at least one); None = all.
      unroll: unroll factor of the slot loop (``True`` unrolls fully).
      q_offset: position of query 0 (a call into a KV cache; may be traced): the rule and
        ALiBi see ``q_offset + t``.
      kv_len: number of valid keys (may be traced); keys at ``s >= kv_len`` are masked.

    Returns:
      [B, T, H, Dh] in q.dtype; gradients flow to q, k, v (custom VJP, no T x S state).
    """
    check_heads_and_blocks(q, k, block_q, block_k)
    b, t, h, _ = q.shape
    s, kh = k.shape[1], k.shape[2]
    nq = -(-t // block_q)
    lists = pattern_lists(kv_blocks, kv_valid, kv_full, batch=b, kv_heads=kh, n_q_blocks=nq,
                          n_k_blocks=-(-s // block_k))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    slopes = None
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(kh, h // kh)
    q_seg, kv_seg = split_segment_ids(tuple(segment_ids) if isinstance(segment_ids, list)
                                      else segment_ids, t, s)
    cq = nq if query_chunk is None else max(1, min(nq, query_chunk // block_q))
    static = Static(rule, scale, block_q, block_k, cq, unroll)
    offsets = Offsets(jnp.asarray(q_offset, jnp.int32),
                      jnp.asarray(s if kv_len is None else kv_len, jnp.int32))
    return _attention(q, k, v, lists, q_seg, kv_seg, slopes, offsets, static)
