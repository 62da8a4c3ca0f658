"""Dense softmax attention: the fp32 oracle for every attention path.

The mask is *structure*, not an array argument (docs/design.md): ``causal``,
``window``, ``segment_ids`` and the query offset describe which key ``s``
query ``t`` may see (see :func:`visible`)::

    visible(t, s) = [seg_q(t) == seg_k(s)]
                  & [not causal or pos_k(s) <= pos_q(t)]
                  & [window is None or pos_q(t) - pos_k(s) < window]
                  & [s < kv_len]

with ``pos_q(t) = q_offset + t`` and ``pos_k(s) = s``. A row with no visible key
returns zeros (never NaN). ``alibi_slopes`` adds the ALiBi bias
``-slope_h * (pos_q - pos_k)`` (Press et al. 2022). This function materializes the
``[B, H, T, S]`` scores, so it is the test oracle and the short-sequence path;
blockwise and Pallas paths must match it in values and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def split_segment_ids(segment_ids, t: int, s: int):
    """Normalizes ``segment_ids`` to ``(q_seg [B, T], kv_seg [B, S])`` or ``(None, None)``.

    Accepts ``None``, one ``[B, T]`` array (self-attention, T == S) or a pair.
    """
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    else:
        if t != s:
            raise ValueError(
                f"segment_ids: a single [B, T] array needs T == S (got T={t}, S={s}); "
                "pass (q_segment_ids, kv_segment_ids) instead")
        q_seg = kv_seg = segment_ids
    return q_seg, kv_seg


def visible(q_pos: Array, k_pos: Array, *, causal: bool, window: int | None,
            q_seg: Array | None = None, k_seg: Array | None = None,
            kv_len: Array | int | None = None) -> Array:
    """Boolean visibility for query positions ``q_pos [..., T]`` and key positions ``k_pos [..., S]``.

    Returns ``[..., T, S]`` (leading dims broadcast; segment ids are ``[B, T]``/``[B, S]``).
    """
    qp = q_pos[..., :, None]
    kp = k_pos[..., None, :]
    ok = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
    if causal:
        ok &= kp <= qp
    if window is not None:
        ok &= (qp - kp) < window
        if not causal:
            ok &= (kp - qp) < window
    if kv_len is not None:
        ok &= kp < kv_len
    if q_seg is not None:
        ok = ok & (q_seg[..., :, None] == k_seg[..., None, :])
    return ok


def reference_attention(q: Array, k: Array, v: Array, *, causal: bool = True,
                        window: int | None = None, segment_ids=None, impl=None,
                        q_offset: Array | int = 0, kv_len: Array | int | None = None,
                        alibi_slopes: Array | None = None, scale: float | None = None) -> Array:
    """Dense masked softmax attention in fp32.

    Args:
      q: [B, T, H, Dh] queries.
      k: [B, S, K, Dh] keys, H % K == 0 (GQA/MQA without repeating K/V).
      v: [B, S, K, Dh] values.
      causal: mask keys after the query position.
      window: if set, a query sees only keys with ``pos_q - pos_k < window``
        (and ``pos_k - pos_q < window`` when not causal).
      segment_ids: None, [B, T] (T == S), or a pair ([B, T], [B, S]); tokens
        attend only within their segment (packed sequences).
      impl: accepted for signature parity with ``flash_attention``; must be None or "xla".
      q_offset: position of query 0 (decode into a cache); scalar.
      kv_len: number of valid keys (cache fill level); keys at s >= kv_len are masked.
      alibi_slopes: [H] optional ALiBi slopes.
      scale: score scale, default ``Dh ** -0.5``.

    Returns:
      [B, T, H, Dh] in q.dtype; rows with no visible key are zero.
    """
    if impl not in (None, "xla"):
        raise ValueError(f"reference_attention: impl={impl!r} not allowed; use None or 'xla'")
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h % kh:
        raise ValueError(f"q heads H={h} must be a multiple of kv heads K={kh}")
    g = h // kh
    scale = d ** -0.5 if scale is None else scale
    qf = q.astype(jnp.float32).reshape(b, t, kh, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32)) * scale
    q_pos = q_offset + jnp.arange(t)
    k_pos = jnp.arange(s)
    if alibi_slopes is not None:
        dist = (q_pos[:, None] - k_pos[None, :]).astype(jnp.float32)  # [T, S]
        slopes = alibi_slopes.astype(jnp.float32).reshape(kh, g)
        scores = scores - slopes[None, :, :, None, None] * jnp.abs(dist)
    q_seg, kv_seg = split_segment_ids(segment_ids, t, s)
    mask = visible(q_pos, k_pos, causal=causal, window=window, kv_len=kv_len,
                   q_seg=q_seg, k_seg=kv_seg)  # [T, S] or [B, T, S]
    mask = mask[:, None, None] if mask.ndim == 3 else mask[None, None, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(scores - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)
