"""Linear recurrences: the shared math of SSMs, RetNet, RWKV and linear attention.

Two families of pure functions, each with a parallel form and a plain ``lax.scan``
reference (STYLE.md #3):

* **Diagonal / elementwise** ``h_t = a_t * h_{t-1} + b_t`` (Mamba's selective scan,
  chunk-level state passing): :func:`linear_scan` (``jax.lax.associative_scan`` with
  the operator ``(a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2)``; optional initial state;
  decays given as ``a`` or as ``log a``) and :func:`linear_scan_ref`. ``a`` broadcasts
  against ``b``, so the same functions serve vector states ``[B, T, Di, N]`` and
  matrix-valued states ``[B, T, H, Dk, Dv]`` with decays ``[B, T, H, Dk, 1]``.

* **Matrix-valued states** (decayed linear attention; "gated linear attention")::

      S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        S: [Dk, Dv] per head
      o_t = q_t^T S_t                                  (inclusive: linear attention,
                                                        RetNet, Mamba-2 SSD)
      o_t = q_t^T (S_{t-1} + diag(u) k_t v_t^T)        (exclusive + bonus u: RWKV-6)

  with the log-decay ``g_t <= 0`` a scalar per head (``[B, T, H]``), a vector per key
  channel (``[B, T, H, Dk]``) or absent (no decay). Forms, all equal:
  :func:`matrix_recurrence_chunked` (intra-chunk masked matmuls + inter-chunk state
  passing; Yang et al. 2024 "GLA" / Dao & Gu 2024 SSD, Sec. 6), ``parallel`` (the
  same with one chunk: the quadratic "attention" form), :func:`matrix_recurrence_associative`
  (associative scan over the full ``[B, T, H, Dk, Dv]`` states) and the reference
  :func:`matrix_recurrence_ref` (``lax.scan``; also the one-token decode step).

Numerics: everything accumulates in fp32. Decays are kept in log space; every
exponent is the sum of the log-decays over a span ``(j, i]`` computed as a cumsum of
masked entries (never as the difference of two large cumsums, which loses precision),
masked to ``j <= i`` *before* ``exp``: exponents are ``<= 0`` (no overflow, no
inf * 0) and exact for extreme decays (``g = -1e4`` or ``-inf``). Queries/keys may be grouped:
``q, k: [B, T, Hk, Dk]`` serve ``H = Hk * G`` value heads (Mamba-2's ``n_groups``).

Packed sequences: ``segment_ids [B, T]`` reset the state at every segment start (the
state entering a new segment is zero); the initial state ``h0`` belongs to the
segment of the first token.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

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
        ``[B, T, H, Dk, Dv]``); with ``log_space=True`` this is ``log a`` (``-inf``
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
    """fp32 casts, the default (zero) decay, and the head grouping G = H // Hk."""
    b, t, hk, _ = q.shape
    h = v.shape[2]
    if h % hk:
        raise ValueError(f"value heads H={h} must be a multiple of query/key heads Hk={hk}")
    if log_decay is None:
        log_decay = jnp.zeros((b, t, h), _F32)
    return q.astype(_F32), k.astype(_F32), v.astype(_F32), log_decay.astype(_F32), h // hk


def _expand_heads(x: Array, g: int) -> Array:
    """[B, T, Hk, Dk] -> [B, T, Hk * g, Dk] (each query/key head serves g value heads)."""
    return x if g == 1 else jnp.repeat(x, g, axis=2)


def matrix_recurrence_ref(q: Array, k: Array, v: Array, log_decay: Array | None = None, *,
                          bonus: Array | None = None, h0: Array | None = None,
                          segment_ids: Array | None = None) -> tuple[Array, Array]:
    """Sequential reference (``lax.scan`` over T) and the decode step.

    Args:
      q, k: [B, T, Hk, Dk]; v: [B, T, H, Dv] with H a multiple of Hk.
      log_decay: None, [B, T, H] (scalar per head) or [B, T, H, Dk] (per key channel); <= 0.
      bonus: None for the inclusive form ``o_t = q_t S_t``; ``u [H, Dk]`` for the
        exclusive RWKV form ``o_t = q_t (S_{t-1} + diag(u) k_t v_t^T)``.
      h0: initial state [B, H, Dk, Dv] (zeros when None).
      segment_ids: None or [B, T]; the state is reset at segment starts.
    Returns:
      ``(o [B, T, H, Dv] fp32, S_T [B, H, Dk, Dv] fp32)``.
    """
    q, k, v, ld, g = _prepare(q, k, v, log_decay)
    q, k = _expand_heads(q, g), _expand_heads(k, g)
    bsz, t, h, dk = q.shape
    dv = v.shape[-1]
    keep = 1.0 - segment_resets(segment_ids, bsz, t).astype(_F32)
    s0 = jnp.zeros((bsz, h, dk, dv), _F32) if h0 is None else h0.astype(_F32)
    decay = jnp.exp(ld)
    decay = decay[..., None, None] if ld.ndim == 3 else decay[..., None]  # [B, T, H, Dk|1, 1]

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
    materialized states ``[B, T, H, Dk, Dv]`` (memory O(T Dk Dv); for comparison)."""
    q, k, v, ld, g = _prepare(q, k, v, log_decay)
    q, k = _expand_heads(q, g), _expand_heads(k, g)
    bsz, t, h, dk = q.shape
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


def matrix_recurrence_chunked(q: Array, k: Array, v: Array, log_decay: Array | None = None, *,
                              bonus: Array | None = None, h0: Array | None = None,
                              segment_ids: Array | None = None,
                              chunk: int = 64) -> tuple[Array, Array]:
    """Chunked form: within a chunk of C tokens a masked ``[C, C]`` "attention" matmul,
    between chunks the ``[H, Dk, Dv]`` states passed by :func:`linear_scan`.

    With inclusive log-decay cumsum ``G_i`` inside a chunk (``Gq_i = G_i``, or
    ``G_{i-1}`` in the exclusive form), ``o_i = sum_{j<=i} (q_i . k_j exp(Gq_i - G_j)) v_j
    + (q_i exp(Gq_i)) S_chunk_start``; the chunk adds ``sum_j (k_j exp(G_C - G_j)) v_j^T``
    to the state decayed by ``exp(G_C)`` (each ``Gx - Gy`` evaluated as a masked span sum,
    :func:`_segsum`). Per-channel decays use a ``[C, C, Dk]`` factor (no ``exp(+G)``
    rescaling of q/k, so no overflow at any decay). T need not be a multiple of
    ``chunk`` (zero padding: k = v = 0, g = 0 leaves the state unchanged).
    Arguments and result as :func:`matrix_recurrence_ref`.
    """
    decayed = log_decay is not None
    q, k, v, ld, g = _prepare(q, k, v, log_decay)
    bsz, t, hk, dk = q.shape
    h, dv = v.shape[2:]
    vector = ld.ndim == 4
    if vector:  # per-channel decays are per value head: expand grouped q/k
        q, k, hk, g = _expand_heads(q, g), _expand_heads(k, g), h, 1
    c = max(1, min(chunk, t))
    n = -(-t // c)
    pad = n * c - t
    resets = segment_resets(segment_ids, bsz, t)
    seg = jnp.cumsum(resets.astype(jnp.int32), axis=1)  # canonical segment index, 0 at t=0
    if pad:
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, ld = padt(q), padt(k), padt(v), padt(ld)
        seg = jnp.pad(seg, ((0, 0), (0, pad)), mode="edge")
    split = lambda x: x.reshape((bsz, n, c) + x.shape[2:])
    q, k, v, ld, seg = split(q), split(k), split(v), split(ld), split(seg)
    # q, k: [B, N, C, Hk, Dk]; v: [B, N, C, H, Dv]; ld: [B, N, C, H(, Dk)]; seg: [B, N, C]
    vg = v.reshape(v.shape[:3] + (hk, g, dv))             # value heads grouped by q/k head
    seg_last = seg[:, :, -1]                               # [B, N]
    seg_prev = jnp.concatenate([jnp.zeros_like(seg[:, :1, 0]), seg[:, :-1, -1]], axis=1)
    mask = jnp.tril(jnp.ones((c, c), bool), k=0 if bonus is None else -1)
    mask = mask & (seg[:, :, :, None] == seg[:, :, None, :])  # [B, N, Ci, Cj]
    in_last = (seg == seg_last[:, :, None]).astype(_F32)  # [B, N, C]: j in the chunk's last segment

    # Every exponent below is a sum of log-decays (never a difference of cumsums), so it
    # is <= 0, exact for extreme decays and -inf-safe. Without decays all factors are 1.
    if decayed:
        shift_r = jnp.concatenate([jnp.zeros_like(ld[:, :, :1]), ld[:, :, :-1]], axis=2)
        shift_l = jnp.concatenate([ld[:, :, 1:], jnp.zeros_like(ld[:, :, :1])], axis=2)
        q_decay = jnp.exp(jnp.cumsum(ld if bonus is None else shift_r, axis=2))  # start -> i (i-1)
        k_decay = jnp.exp(jnp.flip(jnp.cumsum(jnp.flip(shift_l, 2), axis=2), 2))  # j -> chunk end
        a_chunk = jnp.exp(jnp.sum(ld, axis=2))             # whole chunk: [B, N, H(, Dk)]
        maskd = mask.reshape(mask.shape + (1,) * (ld.ndim - 3))
        decay = jnp.exp(jnp.where(maskd, _segsum(ld, exclusive=bonus is not None), -jnp.inf))
    if vector:                                             # decay: [B, N, Ci, Cj, H, Dk]
        scores = jnp.einsum("bnihd,bnjhd,bnijhd->bnhij", q, k, decay)
        o = jnp.einsum("bnhij,bnjhv->bnihv", scores, v)
    else:
        scores = jnp.einsum("bnikd,bnjkd->bnkij", q, k)      # shared by the G heads of a group
        if decayed:                                        # decay: [B, N, Ci, Cj, H]
            decay = decay.reshape(decay.shape[:4] + (hk, g))
            o = jnp.einsum("bnkij,bnijkg,bnjkgv->bnikgv", scores, decay, vg).reshape(v.shape)
        else:
            o = jnp.einsum("bnkij,bnjkgv->bnikgv", scores * mask[:, :, None], vg).reshape(v.shape)
    if bonus is not None:  # diagonal term q_i diag(u) k_i v_i^T
        qk = jnp.einsum("bnihd,hd,bnihd->bnih", _expand_heads_n(q, g), bonus.astype(_F32),
                        _expand_heads_n(k, g))
        o = o + qk[..., None] * v

    # Chunk summaries -> chunk-start states (associative scan over the N chunks).
    keep_state = (seg_last == seg_prev).astype(_F32)[:, :, None, None, None]  # no reset in chunk
    if vector:
        d_state = jnp.einsum("bnjhd,bnjhv->bnhdv", k * k_decay * in_last[..., None, None], v)
        a_chunk = a_chunk[..., None] * keep_state          # [B, N, H, Dk, 1]
    else:
        w_in = in_last[..., None]                          # [B, N, C, 1 or H]
        if decayed:
            w_in = (k_decay * w_in).reshape(k_decay.shape[:3] + (hk, g))
            a_chunk = a_chunk[..., None, None] * keep_state  # [B, N, H, 1, 1]
        else:
            w_in = jnp.broadcast_to(w_in[..., None], w_in.shape[:3] + (hk, g))
            a_chunk = jnp.broadcast_to(keep_state, (bsz, n, h, 1, 1))
        d_state = jnp.einsum("bnjkd,bnjkg,bnjkgv->bnkgdv", k, w_in, vg).reshape(bsz, n, h, dk, dv)
    ends, s_last = linear_scan(a_chunk, d_state, h0)     # state after each chunk
    s0 = jnp.zeros_like(ends[:, :1]) if h0 is None else h0.astype(_F32)[:, None]
    starts = jnp.concatenate([s0, ends[:, :-1]], axis=1)  # [B, N, H, Dk, Dv]

    gate = (seg == seg_prev[:, :, None]).astype(_F32)     # no reset since the chunk start
    if vector:
        o_inter = jnp.einsum("bnihd,bnhdv->bnihv", q * q_decay, starts)
    else:
        o_inter = jnp.einsum("bnikd,bnkgdv->bnikgv", q, starts.reshape(bsz, n, hk, g, dk, dv))
        if decayed:
            o_inter = o_inter * q_decay.reshape(bsz, n, c, hk, g)[..., None]
        o_inter = o_inter.reshape(v.shape)
    o = o + o_inter * gate[..., None, None]
    return o.reshape(bsz, n * c, h, dv)[:, :t], s_last


def _segsum(ld: Array, exclusive: bool) -> Array:
    """``[B, N, C, ...] -> [B, N, Ci, Cj, ...]``: ``sum_{j < s <= i} g_s`` (exclusive:
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


def _expand_heads_n(x: Array, g: int) -> Array:
    """[B, N, C, Hk, Dk] -> [B, N, C, Hk * g, Dk]."""
    return x if g == 1 else jnp.repeat(x, g, axis=3)


def matrix_recurrence(q: Array, k: Array, v: Array, log_decay: Array | None = None, *,
                      bonus: Array | None = None, h0: Array | None = None,
                      segment_ids: Array | None = None, impl: str = "chunked",
                      chunk: int = 64) -> tuple[Array, Array]:
    """Dispatches to one of ``MATRIX_IMPLS`` (all compute the same function):
    ``chunked`` (default), ``parallel`` (one chunk: the quadratic masked form),
    ``associative`` and ``sequential`` (the reference). A single token (decode step)
    always takes the sequential step. Arguments as :func:`matrix_recurrence_ref`."""
    kw = dict(bonus=bonus, h0=h0, segment_ids=segment_ids)
    if impl not in MATRIX_IMPLS:
        raise ValueError(f"impl={impl!r} is not allowed; choose one of {list(MATRIX_IMPLS)}")
    if impl == "sequential" or q.shape[1] == 1:
        return matrix_recurrence_ref(q, k, v, log_decay, **kw)
    if impl == "associative":
        return matrix_recurrence_associative(q, k, v, log_decay, **kw)
    c = q.shape[1] if impl == "parallel" else chunk
    return matrix_recurrence_chunked(q, k, v, log_decay, chunk=c, **kw)


def check_chunk(path: str, chunk: int) -> None:
    """Chunk lengths must be positive ints (powers of two are fastest)."""
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
        raise ValueError(f"{path}={chunk!r} must be a positive integer")

