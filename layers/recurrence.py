"""Linear recurrences: the shared math of the recurrent mixers (Mamba, Mamba-2, RetNet,
RWKV-6, linear attention, Performer) and of TransNormer.

Two families of pure functions, each with a parallel form and a plain ``lax.scan``
reference beside it (docs/conventions.md):

* **Diagonal / elementwise** ``h_t = a_t * h_{t-1} + b_t`` (Mamba's selective scan,
  chunk-level state passing): :func:`linear_scan` (``jax.lax.associative_scan`` with
  the operator ``(a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2)``; optional initial state;
  decays given as ``a`` or as ``log a``) and :func:`linear_scan_ref`. ``a`` broadcasts
  against ``b``, so the same functions serve vector states ``[B, T, Di, N]`` and
  matrix-valued states ``[B, T, H, Dh, Dv]`` with decays ``[B, T, H, Dh, 1]``.

* **Matrix-valued states** (decayed linear attention; "gated linear attention")::

      S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        S: [Dh, Dv] per head
      o_t = q_t^T S_t                                  (inclusive: linear attention,
                                                        RetNet, Mamba-2 SSD)
      o_t = q_t^T (S_{t-1} + diag(u) k_t v_t^T)        (exclusive + bonus u: RWKV-6)

  with the log-decay ``g_t <= 0`` a scalar per head (``[B, T, H]``), a vector per key
  channel (``[B, T, H, Dh]``) or absent (no decay). Queries and keys may have fewer
  heads than values: ``q, k: [B, T, K, Dh]`` serve ``H = K * G`` value heads (value
  head ``h`` reads q/k head ``h // G``; Mamba-2's B/C heads, like the kv heads of GQA).
  Forms, all equal (``scan_impl``, one of :data:`MATRIX_IMPLS`):
  :func:`matrix_recurrence_chunked` (intra-chunk masked matmuls + inter-chunk state
  passing; Yang et al. 2024 "GLA" / Dao & Gu 2024 SSD, Sec. 6), ``parallel`` (the
  same with one chunk: the quadratic "attention" form),
  :func:`matrix_recurrence_associative` (associative scan over the full
  ``[B, T, H, Dh, Dv]`` states) and the reference :func:`matrix_recurrence_ref`
  (``lax.scan``; also the one-token decode step).

Numerics: everything accumulates in fp32. Decays are kept in log space; every
exponent is the sum of the log-decays over a span ``(j, i]`` computed as a cumsum of
masked entries (never as the difference of two large cumsums, which loses precision),
masked to ``j <= i`` *before* ``exp``: exponents are ``<= 0`` (no overflow, no
inf * 0) and exact for extreme decays (``g = -1e4`` or ``-inf``).

Packed sequences: ``segment_ids [B, T]`` reset the state at every segment start (the
state entering a new segment is zero); the initial state ``h0`` belongs to the
segment of the first token.

Verified (tests/layers/recurrent/test_recurrence.py, CPU): every form equals the
reference in outputs, final states and gradients (grouped heads, segments, T not a
multiple of the chunk, initial states, extreme decays, bf16 inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from layers.heads import expand_kv
from layers.typing import Array

MATRIX_IMPLS = ("chunked", "parallel", "associative", "sequential")
_F32 = jnp.float32


# ----------------------------------------------------------------------------------------
# Diagonal (elementwise) recurrence h_t = a_t * h_{t-1} + b_t
# ----------------------------------------------------------------------------------------

def _combine(c1, c2):
    a1, b1 = c1
    a2, b2 = c2
    return a1 * a2, a2 * b1 + b2


def _combine_log(c1, c2):
    la1, b1 = c1
    la2, b2 = c2
    return la1 + la2, jnp.exp(la2) * b1 + b2


def linear_scan(a: Array, b: Array, h0: Array | None = None, *, log_space: bool = False,
                axis: int = 1) -> tuple[Array, Array]:
    """``h_t = a_t * h_{t-1} + b_t`` by ``jax.lax.associative_scan`` (fp32).

    Args:
      a: decays, broadcastable to ``b`` (e.g. ``[B, T, H, 1, 1]`` against
        ``[B, T, H, Dh, Dv]``); with ``log_space=True`` this is ``log a`` (``-inf``
        allowed: a reset) and products of decays are sums, so they never underflow.
      b: inputs ``[B, T, ...]`` (time along ``axis``).
      h0: initial state, ``b`` without the time axis; zeros when None.
    Returns:
      ``(h [same shape as b], h_last)`` with ``h_last`` the state after the last step.
    """
    a = a.astype(_F32)
    b = b.astype(_F32)
    if h0 is not None:
        # Fold the initial state into the first input: b_0 <- b_0 + a_0 * h0.
        a0 = jax.lax.index_in_dim(a, 0, axis, keepdims=False)
        a0 = jnp.exp(a0) if log_space else a0
        first = jax.lax.index_in_dim(b, 0, axis, keepdims=False) + a0 * h0.astype(_F32)
        b = jnp.concatenate([jnp.expand_dims(first, axis),
                             jax.lax.slice_in_dim(b, 1, b.shape[axis], axis=axis)], axis=axis)
    _, h = jax.lax.associative_scan(_combine_log if log_space else _combine, (a, b), axis=axis)
    return h, jax.lax.index_in_dim(h, h.shape[axis] - 1, axis, keepdims=False)


def linear_scan_ref(a: Array, b: Array, h0: Array | None = None, *, log_space: bool = False,
                    axis: int = 1) -> tuple[Array, Array]:
    """Reference for :func:`linear_scan`: a sequential ``lax.scan`` over ``axis``."""
    a = jnp.moveaxis(jnp.broadcast_to(a.astype(_F32), b.shape), axis, 0)
    a = jnp.exp(a) if log_space else a
    b = jnp.moveaxis(b.astype(_F32), axis, 0)
    h0 = jnp.zeros(b.shape[1:], _F32) if h0 is None else h0.astype(_F32)

    def step(h, ab):
        h = ab[0] * h + ab[1]
        return h, h
    h_last, h = jax.lax.scan(step, h0, (a, b))
    return jnp.moveaxis(h, 0, axis), h_last


def segment_resets(segment_ids: Array | None, batch: int, t: int) -> Array:
    """bool ``[B, T]``: True where a new segment starts (never at t = 0)."""
    if segment_ids is None:
        return jnp.zeros((batch, t), bool)
    return jnp.concatenate([jnp.zeros((batch, 1), bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


# ----------------------------------------------------------------------------------------
# Matrix-valued state recurrence (decayed linear attention)
# ----------------------------------------------------------------------------------------

def _prepare(q, k, v, log_decay):
    """fp32 casts, the default (zero) decay, and G = H // K value heads per q/k head."""
    b, t, kh, _ = q.shape
    h = v.shape[2]
    if h % kh:
        raise ValueError(f"value heads H={h} must be a multiple of the query/key heads K={kh}")
    if log_decay is None:
        log_decay = jnp.zeros((b, t, h), _F32)
    return q.astype(_F32), k.astype(_F32), v.astype(_F32), log_decay.astype(_F32), h // kh


def matrix_recurrence_ref(q: Array, k: Array, v: Array, log_decay: Array | None = None, *,
                          bonus: Array | None = None, h0: Array | None = None,
                          segment_ids: Array | None = None) -> tuple[Array, Array]:
    """Sequential reference (``lax.scan`` over T) and the decode step.

    Args:
      q, k: [B, T, K, Dh]; v: [B, T, H, Dv] with H a multiple of K.
      log_decay: None, [B, T, H] (scalar per head) or [B, T, H, Dh] (per key channel); <= 0.
      bonus: None for the inclusive form ``o_t = q_t S_t``; ``u [H, Dh]`` for the
        exclusive RWKV form ``o_t = q_t (S_{t-1} + diag(u) k_t v_t^T)``.
      h0: initial state [B, H, Dh, Dv] (zeros when None).
      segment_ids: None or [B, T]; the state is reset at segment starts.
    Returns:
      ``(o [B, T, H, Dv] fp32, S_T [B, H, Dh, Dv] fp32)``.
    """
    q, k, v, ld, g = _prepare(q, k, v, log_decay)
    q, k = expand_kv(q, g), expand_kv(k, g)
    bsz, t, h, dh = q.shape
    keep = 1.0 - segment_resets(segment_ids, bsz, t).astype(_F32)
    s0 = jnp.zeros((bsz, h, dh, v.shape[-1]), _F32) if h0 is None else h0.astype(_F32)
    decay = jnp.exp(ld)
    decay = decay[..., None, None] if ld.ndim == 3 else decay[..., None]  # [B, T, H, Dh|1, 1]

    def step(s, xs):
        qt, kt, vt, at, kp = xs
        s = s * kp[:, None, None, None]
        kv = jnp.einsum("bhd,bhv->bhdv", kt, vt)
        if bonus is None:
            s = at * s + kv
            o = jnp.einsum("bhd,bhdv->bhv", qt, s)
        else:
            o = jnp.einsum("bhd,bhdv->bhv", qt, s)
            o = o + jnp.einsum("bhd,hd,bhd->bh", qt, bonus.astype(_F32), kt)[..., None] * vt
            s = at * s + kv
        return s, o

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, decay, keep))
    s_last, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1), s_last


def matrix_recurrence_associative(q: Array, k: Array, v: Array, log_decay: Array | None = None,
                                  *, bonus: Array | None = None, h0: Array | None = None,
                                  segment_ids: Array | None = None) -> tuple[Array, Array]:
    """Same result as :func:`matrix_recurrence_ref` via :func:`linear_scan` over the
    materialized states ``[B, T, H, Dh, Dv]`` (memory O(T Dh Dv); for comparison)."""
    q, k, v, ld, g = _prepare(q, k, v, log_decay)
    q, k = expand_kv(q, g), expand_kv(k, g)
    bsz, t = q.shape[:2]
    keep = 1.0 - segment_resets(segment_ids, bsz, t).astype(_F32)
    a = jnp.exp(ld) * (keep[..., None, None] if ld.ndim == 4 else keep[..., None])
    a = a[..., None, None] if ld.ndim == 3 else a[..., None]
    kv = jnp.einsum("bthd,bthv->bthdv", k, v)
    states, s_last = linear_scan(a, kv, h0)
    if bonus is None:
        return jnp.einsum("bthd,bthdv->bthv", q, states), s_last
    s0 = jnp.zeros_like(states[:, :1]) if h0 is None else h0.astype(_F32)[:, None]
    prev = jnp.concatenate([s0, states[:, :-1]], axis=1) * keep[:, :, None, None, None]
    o = jnp.einsum("bthd,bthdv->bthv", q, prev)
    o = o + jnp.einsum("bthd,hd,bthd->bth", q, bonus.astype(_F32), k)[..., None] * v
    return o, s_last


# --- the chunked form, in phases. Arrays carry leading dims [B, NC] (NC chunks of C
# tokens); einsums write them as "..."; i and j index tokens within a chunk.

class _Chunks(NamedTuple):
    """The inputs split into NC chunks of C tokens."""
    q: Array          # [B, NC, C, K, Dh]
    k: Array          # [B, NC, C, K, Dh]
    v: Array          # [B, NC, C, K, G, Dv]: value heads grouped by their q/k head
    ld: Array         # [B, NC, C, H] or [B, NC, C, H, Dh] log-decays
    seg: Array        # [B, NC, C] int32: segment index (0 at t = 0)
    seg_prev: Array   # [B, NC]: segment of the token before the chunk (0 for the first)
    seg_last: Array   # [B, NC]: segment of the chunk's last token


class _Decays(NamedTuple):
    """``exp`` of log-decay sums over spans (all exponents <= 0)."""
    intra: Array      # [B, NC, Ci, Cj, H(, Dh)]: j -> i, zero outside the causal mask
    to_query: Array   # [B, NC, C, H(, Dh)]: chunk start -> i (i - 1 when exclusive)
    to_end: Array     # [B, NC, C, H(, Dh)]: j -> chunk end
    whole: Array      # [B, NC, H(, Dh)]: the whole chunk


def _split_chunks(q, k, v, ld, segment_ids, c: int, g: int) -> _Chunks:
    """Pads T to a multiple of C (k = v = 0 and g = 0: the state is unchanged) and splits."""
    bsz, t = q.shape[:2]
    nc = -(-t // c)
    pad = nc * c - t
    seg = jnp.cumsum(segment_resets(segment_ids, bsz, t).astype(jnp.int32), axis=1)
    if pad:
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, ld = padt(q), padt(k), padt(v), padt(ld)
        seg = jnp.pad(seg, ((0, 0), (0, pad)), mode="edge")
    split = lambda x: x.reshape((bsz, nc, c) + x.shape[2:])
    q, k, v, ld, seg = split(q), split(k), split(v), split(ld), split(seg)
    v = v.reshape(v.shape[:3] + (v.shape[3] // g, g, v.shape[4]))
    seg_prev = jnp.concatenate([jnp.zeros_like(seg[:, :1, 0]), seg[:, :-1, -1]], axis=1)
    return _Chunks(q, k, v, ld, seg, seg_prev, seg[:, :, -1])


def _segsum(ld: Array, exclusive: bool) -> Array:
    """``[B, NC, C, ...] -> [B, NC, Ci, Cj, ...]``: ``sum_{j < s <= i} g_s`` (exclusive:
    ``j < s < i``) as a masked cumsum, so no two large cumsums are ever subtracted.
    Entries outside j <= i (j < i when exclusive) are meaningless; callers mask them."""
    c = ld.shape[2]
    x = jnp.broadcast_to(ld[:, :, :, None], ld.shape[:3] + (c,) + ld.shape[3:])  # (s, j) -> g_s
    above = jnp.arange(c)[:, None] > jnp.arange(c)[None, :]                      # s > j
    x = jnp.where(above.reshape(above.shape + (1,) * (ld.ndim - 3)), x, 0.0)
    out = jnp.cumsum(x, axis=2)                                                  # (i, j)
    if exclusive:
        out = jnp.concatenate([jnp.zeros_like(out[:, :, :1]), out[:, :, :-1]], axis=2)
    return out


def _chunk_decays(ld: Array, mask: Array, exclusive: bool) -> _Decays:
    """Every exponent is a sum of log-decays (never a difference of cumsums), so it is
    <= 0, exact for extreme decays and -inf-safe. mask: [B, NC, Ci, Cj]."""
    zero = jnp.zeros_like(ld[:, :, :1])
    shift_r = jnp.concatenate([zero, ld[:, :, :-1]], axis=2)       # g_{i-1}
    shift_l = jnp.concatenate([ld[:, :, 1:], zero], axis=2)        # g_{j+1}
    to_query = jnp.exp(jnp.cumsum(shift_r if exclusive else ld, axis=2))
    to_end = jnp.exp(jnp.flip(jnp.cumsum(jnp.flip(shift_l, 2), axis=2), 2))
    maskd = mask.reshape(mask.shape + (1,) * (ld.ndim - 3))
    intra = jnp.exp(jnp.where(maskd, _segsum(ld, exclusive), -jnp.inf))
    return _Decays(intra, to_query, to_end, jnp.exp(jnp.sum(ld, axis=2)))


def _intra_chunk(ch: _Chunks, dec: _Decays | None, mask: Array, bonus: Array | None) -> Array:
    """Within-chunk outputs ``o_i = sum_{j (mask)} (q_i . k_j decay_ij) v_j`` (plus the
    RWKV bonus term ``q_i diag(u) k_i v_i^T``): [B, NC, C, K, G, Dv]."""
    kh, g = ch.v.shape[3:5]
    if ch.ld.ndim == 5:      # per-channel decays (G = 1): the factor sits inside q . k
        scores = jnp.einsum("...ikd,...jkd,...ijkd->...kij", ch.q, ch.k, dec.intra)
        o = jnp.einsum("...kij,...jkgv->...ikgv", scores, ch.v)
    else:                    # q . k shared by the G value heads of a q/k head
        scores = jnp.einsum("...ikd,...jkd->...kij", ch.q, ch.k)
        if dec is None:
            o = jnp.einsum("...kij,...jkgv->...ikgv", scores * mask[:, :, None], ch.v)
        else:
            decay = dec.intra.reshape(dec.intra.shape[:4] + (kh, g))
            o = jnp.einsum("...kij,...ijkg,...jkgv->...ikgv", scores, decay, ch.v)
    if bonus is not None:
        u = bonus.astype(_F32).reshape(kh, g, -1)
        o = o + jnp.einsum("...ikd,kgd,...ikd->...ikg", ch.q, u, ch.k)[..., None] * ch.v
    return o


def _chunk_starts(ch: _Chunks, dec: _Decays | None, h0: Array | None) -> tuple[Array, Array]:
    """The state entering every chunk, ``[B, NC, H, Dh, Dv]``, and the final state: each
    chunk's contribution (its keys in its last segment, decayed to the chunk end) and
    its decay (zero if a segment starts in it) composed by :func:`linear_scan`."""
    bsz, nc = ch.seg_last.shape
    kh, g, dv = ch.v.shape[3:]
    h, dh = kh * g, ch.q.shape[-1]
    in_last = (ch.seg == ch.seg_last[..., None]).astype(_F32)             # [B, NC, C]
    keep = (ch.seg_last == ch.seg_prev).astype(_F32)[..., None, None, None]  # [B, NC, 1, 1, 1]
    if ch.ld.ndim == 5:
        k_in = ch.k * dec.to_end * in_last[..., None, None]
        d_state = jnp.einsum("...jkd,...jkgv->...kgdv", k_in, ch.v)
        a_chunk = dec.whole[..., None] * keep                              # [B, NC, H, Dh, 1]
    else:
        if dec is None:
            w_in = jnp.broadcast_to(in_last[..., None, None], in_last.shape + (kh, g))
            a_chunk = jnp.broadcast_to(keep, (bsz, nc, h, 1, 1))
        else:
            w_in = (dec.to_end * in_last[..., None]).reshape(in_last.shape + (kh, g))
            a_chunk = dec.whole[..., None, None] * keep                    # [B, NC, H, 1, 1]
        d_state = jnp.einsum("...jkd,...jkg,...jkgv->...kgdv", ch.k, w_in, ch.v)
    ends, s_last = linear_scan(a_chunk, d_state.reshape(bsz, nc, h, dh, dv), h0)
    s0 = jnp.zeros_like(ends[:, :1]) if h0 is None else h0.astype(_F32)[:, None]
    return jnp.concatenate([s0, ends[:, :-1]], axis=1), s_last


def _inter_chunk(ch: _Chunks, dec: _Decays | None, starts: Array) -> Array:
    """Outputs from the chunk-start states, ``q_i decay(start -> i) S_start``, zero after
    a segment start inside the chunk: [B, NC, C, K, G, Dv]."""
    kh, g, dv = ch.v.shape[3:]
    if ch.ld.ndim == 5:
        o = jnp.einsum("...ikd,...kdv->...ikv", ch.q * dec.to_query, starts)[..., None, :]
    else:
        grouped = starts.reshape(starts.shape[:2] + (kh, g) + starts.shape[3:])
        o = jnp.einsum("...ikd,...kgdv->...ikgv", ch.q, grouped)
        if dec is not None:
            o = o * dec.to_query.reshape(dec.to_query.shape[:3] + (kh, g))[..., None]
    gate = (ch.seg == ch.seg_prev[..., None]).astype(_F32)   # no reset since the chunk start
    return o * gate[..., None, None, None]


def matrix_recurrence_chunked(q: Array, k: Array, v: Array, log_decay: Array | None = None, *,
                              bonus: Array | None = None, h0: Array | None = None,
                              segment_ids: Array | None = None,
                              chunk: int = 64) -> tuple[Array, Array]:
    """Chunked form: within a chunk of C tokens a masked ``[C, C]`` "attention" matmul,
    between chunks the ``[H, Dh, Dv]`` states passed by :func:`linear_scan`.

    With inclusive log-decay cumsum ``L_i`` inside a chunk (``Lq_i = L_i``, or
    ``L_{i-1}`` in the exclusive form), ``o_i = sum_{j<=i} (q_i . k_j exp(Lq_i - L_j)) v_j
    + (q_i exp(Lq_i)) S_chunk_start``; the chunk adds ``sum_j (k_j exp(L_C - L_j)) v_j^T``
    to the state decayed by ``exp(L_C)`` (each ``Lx - Ly`` evaluated as a masked span
    sum, :func:`_segsum`). Per-channel decays use a ``[C, C, Dh]`` factor (no
    ``exp(+L)`` rescaling of q/k, so no overflow at any decay). T need not be a
    multiple of ``chunk``. Arguments and result as :func:`matrix_recurrence_ref`.
    """
    decayed = log_decay is not None
    q, k, v, ld, g = _prepare(q, k, v, log_decay)
    if ld.ndim == 4:   # per-channel decays are per value head: expand the q/k heads
        q, k, g = expand_kv(q, g), expand_kv(k, g), 1
    t = q.shape[1]
    c = max(1, min(chunk, t))
    ch = _split_chunks(q, k, v, ld, segment_ids, c, g)
    mask = jnp.tril(jnp.ones((c, c), bool), k=0 if bonus is None else -1)
    mask = mask & (ch.seg[:, :, :, None] == ch.seg[:, :, None, :])      # [B, NC, Ci, Cj]
    dec = _chunk_decays(ch.ld, mask, exclusive=bonus is not None) if decayed else None
    starts, s_last = _chunk_starts(ch, dec, h0)
    o = _intra_chunk(ch, dec, mask, bonus) + _inter_chunk(ch, dec, starts)
    bsz, nc, _, kh, g, dv = o.shape
    return o.reshape(bsz, nc * c, kh * g, dv)[:, :t], s_last


def matrix_recurrence(q: Array, k: Array, v: Array, log_decay: Array | None = None, *,
                      bonus: Array | None = None, h0: Array | None = None,
                      segment_ids: Array | None = None, scan_impl: str = "chunked",
                      chunk: int = 64) -> tuple[Array, Array]:
    """Dispatches to one of :data:`MATRIX_IMPLS` (all compute the same function):
    ``chunked`` (default), ``parallel`` (one chunk: the quadratic masked form),
    ``associative`` and ``sequential`` (the reference). A single token (decode step)
    always takes the sequential step. Arguments as :func:`matrix_recurrence_ref`."""
    kw = dict(bonus=bonus, h0=h0, segment_ids=segment_ids)
    if scan_impl not in MATRIX_IMPLS:
        raise ValueError(f"scan_impl={scan_impl!r} is not allowed; choose one of "
                         f"{list(MATRIX_IMPLS)}")
    if scan_impl == "sequential" or q.shape[1] == 1:
        return matrix_recurrence_ref(q, k, v, log_decay, **kw)
    if scan_impl == "associative":
        return matrix_recurrence_associative(q, k, v, log_decay, **kw)
    c = q.shape[1] if scan_impl == "parallel" else chunk
    return matrix_recurrence_chunked(q, k, v, log_decay, chunk=c, **kw)
