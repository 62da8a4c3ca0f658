"""``flash_attention`` dispatcher: validates at the edge, then picks an implementation.

``impl``:

* ``None``: ``"pallas"`` on GPU, ``"xla"`` on CPU and TPU (the kernel's
  ``[B, T, H, Dh]`` blocks do not satisfy Mosaic TPU's tiling rule, so it has not
  been lowered for TPU).
* ``"pallas"``: ``pallas.flash_attention_pallas``; compiled through Pallas Triton
  on GPU, interpret mode on CPU (slow; for tests). Refused on TPU.
* ``"xla"``: ``reference.reference_attention``, dense masked softmax in fp32.
  It materializes ``[B, H, T, S]`` fp32 scores: O(T S) memory, fine for short
  sequences. For long sequences without a GPU use the pure-JAX blockwise path
  (``layers.blockwise_attention``, the attention layer's ``impl="blockwise"``).

All paths share the semantics of ``reference_attention`` (q_offset 0, every key
valid); rows with no visible key are 0.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from pallas_kernels.attention.pallas import flash_attention_pallas
from pallas_kernels.attention.reference import reference_attention, split_segment_ids

Array = jax.Array
IMPLS = ("pallas", "xla")

# (block_q, block_k, block_q_bwd, block_k_bwd) per backend. The GPU values are
# untuned guesses (no GPU was available when this was written); interpret mode
# on CPU is fastest with few, large blocks.
_GPU_BLOCKS = (128, 64, 64, 64)
_CPU_BLOCKS = (128, 128, 128, 128)


def _resolve_impl(impl: str | None, backend: str) -> str:
    if impl is None:
        return "pallas" if backend == "gpu" else "xla"
    if impl not in IMPLS:
        raise ValueError(f"flash_attention: impl={impl!r} is not one of {(None,) + IMPLS}")
    if impl == "pallas" and backend not in ("gpu", "cpu"):
        raise ValueError(f"flash_attention: impl='pallas' cannot run on backend {backend!r} "
                         "(Triton kernel; allowed: 'gpu', or 'cpu' in interpret mode); "
                         "use impl='xla'")
    return impl


def _validate(q, k, v, window, q_seg, kv_seg) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"flash_attention: q must be [B, T, H, Dh] and k, v [B, S, K, Dh]; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v shapes differ: {k.shape} vs {v.shape}")
    (b, t, h, d), (bk, s, kh, dk) = q.shape, k.shape
    if b != bk:
        raise ValueError(f"flash_attention: batch differs: q has B={b}, k has B={bk}")
    if d != dk:
        raise ValueError(f"flash_attention: head dim differs: q has Dh={d}, k/v have Dh={dk}")
    if h % kh:
        raise ValueError(f"flash_attention: q heads H={h} must be a multiple of kv heads K={kh}")
    if window is not None and (not isinstance(window, numbers.Integral) or window < 1):
        raise ValueError(f"flash_attention: window={window!r} must be None or an int >= 1")
    for x in (q, k, v):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"flash_attention: inputs must be floating point; got {x.dtype}")
    if q_seg is not None:
        if q_seg.shape != (b, t) or kv_seg.shape != (b, s):
            raise ValueError(f"flash_attention: segment ids must be [B, T]={(b, t)} and "
                             f"[B, S]={(b, s)}; got {q_seg.shape} and {kv_seg.shape}")


def flash_attention(q: Array, k: Array, v: Array, *, causal: bool = True,
                    window: int | None = None, segment_ids=None, impl: str | None = None,
                    scale: float | None = None, block_q: int | None = None,
                    block_k: int | None = None, block_q_bwd: int | None = None,
                    block_k_bwd: int | None = None, interpret: bool | None = None) -> Array:
    """Softmax attention with structured masks; FlashAttention-2 kernels on GPU.

    Same semantics as ``reference_attention`` (see reference.py): GQA/MQA without
    repeating K/V; rows with no visible key return 0, never NaN. Differentiable
    (custom VJP with backward kernels on the Pallas path).

    Args:
      q: [B, T, H, Dh] queries.
      k: [B, S, K, Dh] keys, H % K == 0.
      v: [B, S, K, Dh] values.
      causal: mask keys after the query position (pos_k > pos_q).
      window: None or int >= 1: a query sees keys with ``pos_q - pos_k < window``
        (and ``pos_k - pos_q < window`` when not causal).
      segment_ids: None, [B, T] (T == S), or a pair ([B, T], [B, S]) of int ids.
      impl: None (by backend), "pallas" or "xla" (see the module docstring).
      scale: score scale, default ``Dh ** -0.5``.
      block_q, block_k: forward tiles; block_q_bwd, block_k_bwd: backward tiles
        (Pallas only; powers of two >= 16; None: per-backend defaults).
      interpret: force/forbid Pallas interpret mode (None: interpret on CPU only).

    Returns:
      [B, T, H, Dh] in the inputs' result dtype.
    """
    q_seg, kv_seg = split_segment_ids(segment_ids, q.shape[1], k.shape[1])
    _validate(q, k, v, window, q_seg, kv_seg)
    backend = jax.default_backend()
    impl = _resolve_impl(impl, backend)
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if impl == "xla":
        return reference_attention(q, k, v, causal=causal, window=window,
                                   segment_ids=segment_ids, scale=scale)
    if interpret is None:
        interpret = backend == "cpu"
    if backend == "cpu" and not interpret:
        raise ValueError("flash_attention: impl='pallas' with interpret=False cannot run on "
                         "CPU; use interpret=None/True or impl='xla'")
    defaults = _GPU_BLOCKS if backend == "gpu" else _CPU_BLOCKS
    blocks = {}
    for name, given, default in zip(("block_q", "block_k", "block_q_bwd", "block_k_bwd"),
                                    (block_q, block_k, block_q_bwd, block_k_bwd), defaults):
        b = default if given is None else given
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"flash_attention: {name}={b!r} must be a power of two >= 16")
        blocks[name] = b
    window = None if window is None else int(window)
    return flash_attention_pallas(q, k, v, q_seg, kv_seg, causal=causal, window=window,
                                  scale=scale, interpret=interpret, **blocks)
