"""Attention through ``tokamax.dot_product_attention`` (the ``"tokamax"`` impl).

tokamax (the ``tokamax`` extra) is a Pallas kernel library whose
``dot_product_attention`` follows ``jax.nn.dot_product_attention`` and picks a
kernel per backend (Mosaic TPU, Mosaic GPU, Triton or cuDNN; XLA otherwise). On
CPU only its XLA path runs, and that is what the tests compare with
``reference.reference_attention``.

How archlab's attention features map onto tokamax's (``reference.visible``):

=====================  ==================================================================
archlab                tokamax
=====================  ==================================================================
GQA / MQA              native: ``key``/``value`` carry K heads, ``H % K == 0``
causal                 ``is_causal=True`` (query ``t`` sees keys ``s <= t``; q_offset 0)
window ``w``           ``local_window_size=(w - 1, 0)`` causal, ``(w - 1, w - 1)`` not
                       (tokamax counts keys before/after the query, archlab the
                       distance ``|pos_q - pos_k| < w``)
kv_len                 ``key_value_seq_lengths`` (``[B]``; a scalar is broadcast)
segment_ids            no native feature: a dense boolean ``mask [B, 1, T, S]``
                       (``q_seg == kv_seg``), O(B T S) memory, like the XLA reference
rows with no key       zeroed here (tokamax does not promise zeros for them)
scale                  ``scale``
q_offset != 0          refused (ValueError): tokamax has no query offset
alibi_slopes           refused (ValueError): would need a dense ``[B, H, T, S]`` bias
=====================  ==================================================================

Verified: values and gradients against ``reference_attention`` on CPU (tokamax
0.0.17, its XLA path): causal, window, GQA, segment ids, kv_len, fp32 and bf16
(tests/pallas_kernels/test_tokamax.py). Its TPU/GPU kernels have not run here.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from pallas_kernels.attention.reference import split_segment_ids
from pallas_kernels.dispatch import import_tokamax

Array = jax.Array


def tokamax_attention(q: Array, k: Array, v: Array, *, causal: bool = True,
                      window: int | None = None, segment_ids=None, impl=None,
                      q_offset: Array | int = 0, kv_len: Array | int | None = None,
                      alibi_slopes: Array | None = None, scale: float | None = None,
                      implementation: str | None = None) -> Array:
    """Softmax attention by ``tokamax.dot_product_attention`` with archlab's semantics.

    Args:
      q: [B, T, H, Dh] queries.
      k: [B, S, K, Dh] keys, H % K == 0.
      v: [B, S, K, Dh] values.
      causal: mask keys after the query position.
      window: None or int >= 1: a query sees keys with ``pos_q - pos_k < window``
        (and ``pos_k - pos_q < window`` when not causal).
      segment_ids: None, [B, T] (T == S), or a pair ([B, T], [B, S]) of int ids
        (passed to tokamax as a dense mask).
      impl: accepted for signature parity with ``reference_attention``; must be
        None or "tokamax".
      q_offset: must be 0 (tokamax has no query offset).
      kv_len: None, an int or a [B] int array: keys at ``s >= kv_len`` are masked.
      alibi_slopes: must be None.
      scale: score scale, default ``Dh ** -0.5``.
      implementation: tokamax's own kernel choice (None: its default for the
        backend; e.g. "xla", "mosaic", "triton", "cudnn").

    Returns:
      [B, T, H, Dh] in q.dtype; rows with no visible key are zero.
    """
    if impl not in (None, "tokamax"):
        raise ValueError(f"tokamax_attention: impl={impl!r} not allowed; use None or 'tokamax'")
    if not (isinstance(q_offset, numbers.Integral) and q_offset == 0):
        raise ValueError(f"tokamax_attention: q_offset={q_offset!r} is not supported "
                         "(tokamax has no query offset); use impl='xla'")
    if alibi_slopes is not None:
        raise ValueError("tokamax_attention: alibi_slopes is not supported (tokamax would need "
                         "a dense [B, H, T, S] bias); use impl='xla'")
    if window is not None and (not isinstance(window, numbers.Integral) or window < 1):
        raise ValueError(f"tokamax_attention: window={window!r} must be None or an int >= 1")
    tokamax = import_tokamax()
    b, t, h, _ = q.shape
    s = k.shape[1]
    q_seg, kv_seg = split_segment_ids(segment_ids, t, s)
    local = None
    if window is not None:
        local = (int(window) - 1, 0 if causal else int(window) - 1)
    mask = None
    if q_seg is not None:
        mask = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]  # [B, 1, T, S]
    lengths = None
    if kv_len is not None:
        lengths = jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (b,))
    out = tokamax.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=causal, key_value_seq_lengths=lengths,
        local_window_size=local, implementation=implementation)
    has_key = _rows_with_a_key(t, s, causal, local, mask, lengths)
    if has_key is not None:
        out = jnp.where(has_key[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out.astype(q.dtype)


def _rows_with_a_key(t: int, s: int, causal: bool, local, mask, lengths):
    """``[B, T]`` bool: rows that see at least one key, or None when every row does.

    Without segments or ``kv_len`` every row sees its diagonal key (or key 0 when
    T > S causal), so only those two features can empty a row.
    """
    if mask is None and lengths is None:
        return None
    q_pos = jnp.arange(t)[:, None]
    k_pos = jnp.arange(s)[None, :]
    ok = jnp.ones((t, s), bool)
    if causal:
        ok &= k_pos <= q_pos
    if local is not None:
        ok &= (q_pos - k_pos <= local[0]) & (k_pos - q_pos <= local[1])
    ok = ok[None]  # [1, T, S]
    if lengths is not None:
        ok = ok & (k_pos[None] < lengths[:, None, None])
    if mask is not None:
        ok = ok & mask[:, 0]
    return ok.any(-1)
