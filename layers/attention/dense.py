"""Dense softmax attention, fused for XLA: the ``attn_impl="dense"`` path.

Same semantics as the oracle ``pallas_kernels.reference_attention`` (mask structure,
``q_offset``/``kv_len`` for calls into a KV cache, ALiBi, rows with no visible key
are zero), computed with fewer passes over the ``[B, K, G, T, S]`` fp32 scores:

* the mask is applied once, inside the fusion that takes the row max (XLA builds
  it from iotas in registers; no ``[T, S]`` mask is read per head);
* ``p = exp(s - m)`` is left unnormalized: the PV matmul runs on ``p`` and the
  ``[.., T, Dh]`` output is divided by the row sum ``l``, instead of dividing the
  ``[.., T, S]`` probabilities (the reference normalizes ``p`` first, which is the
  obvious form);
* empty rows are handled on ``[.., T]`` vectors (``m`` and ``l``), never by a second
  ``where`` over the scores.

On the Llama shapes of ``archlab bench vs-torch`` this is what HF's eager attention
does in PyTorch (matmul, additive mask, softmax, matmul) at fewer memory passes;
it materializes the scores, so memory is O(T * S) per head: use ``"blockwise"`` for
long sequences (BENCHMARKS.md has where each wins). Gradients are JAX's autodiff of
these few lines (it saves ``p``, as any dense attention does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.typing import Array
from pallas_kernels.attention.reference import split_segment_ids, visible


def dense_attention(q: Array, k: Array, v: Array, *, causal: bool = True,
                    window: int | None = None, segment_ids=None,
                    q_offset: Array | int = 0, kv_len: Array | int | None = None,
                    alibi_slopes: Array | None = None, scale: float | None = None) -> Array:
    """Masked softmax attention with the signature and values of ``reference_attention``.

    Args:
      q: [B, T, H, Dh]; k, v: [B, S, K, Dh] with H % K == 0.
      causal, window, segment_ids, q_offset, kv_len, alibi_slopes, scale: as in
        ``pallas_kernels.reference_attention``.

    Returns:
      [B, T, H, Dh] in q.dtype (scores, softmax and PV accumulate in fp32).
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h % kh:
        raise ValueError(f"q heads H={h} must be a multiple of kv heads K={kh}")
    g = h // kh
    scale = d ** -0.5 if scale is None else scale
    f32 = jnp.float32
    # q [B, K, G*T, Dh] . k [B, K, S, Dh] -> [B, K, G*T, S]: dot_general in the canonical
    # (batch, lhs rows, rhs rows) order, so XLA:CPU needs no transposes of the scores.
    qg = jnp.transpose((q.astype(f32) * scale).reshape(b, t, kh, g, d), (0, 2, 3, 1, 4))
    kt = jnp.transpose(k.astype(f32), (0, 2, 1, 3))                             # [B, K, S, Dh]
    vt = jnp.transpose(v.astype(f32), (0, 2, 1, 3))
    scores = jax.lax.dot_general(qg.reshape(b, kh, g * t, d), kt, (((3,), (3,)), ((0, 1), (0, 1))))
    scores = scores.reshape(b, kh, g, t, s)                                     # [B, K, G, T, S]
    q_pos, k_pos = q_offset + jnp.arange(t), jnp.arange(s)
    if alibi_slopes is not None:
        dist = jnp.abs(q_pos[:, None] - k_pos[None, :]).astype(f32)            # [T, S]
        scores = scores - alibi_slopes.astype(f32).reshape(kh, g)[None, :, :, None, None] * dist
    q_seg, kv_seg = split_segment_ids(segment_ids, t, s)
    mask = visible(q_pos, k_pos, causal=causal, window=window, kv_len=kv_len,
                   q_seg=q_seg, k_seg=kv_seg)                                   # [T, S] | [B, T, S]
    mask = mask[:, None, None] if mask.ndim == 3 else mask
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)                                # [B, K, G, T, 1]
    p = jnp.exp(scores - jnp.where(m > -jnp.inf, m, 0.0))                      # 0 where masked
    l = jnp.sum(p, axis=-1)                                                    # [B, K, G, T]
    out = jax.lax.dot_general(p.reshape(b, kh, g * t, s), vt, (((3,), (2,)), ((0, 1), (0, 1))))
    out = out.reshape(b, kh, g, t, d) / jnp.where(l > 0, l, 1.0)[..., None]     # [B, K, G, T, Dh]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(q.dtype)
