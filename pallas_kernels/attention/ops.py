"""``flash_attention`` dispatcher: validates at the edge, then picks an implementation.

``impl`` names one meaning on every backend (the backend is the platform of the
abstract mesh's device when one is set, e.g. for a deviceless compile, else
``jax.default_backend()``):

==================  =============================  ===========================  ==============
impl                CPU                            GPU                          TPU
==================  =============================  ===========================  ==============
None                "xla"                          "pallas_gpu"                 "pallas_tpu"
"xla"               ``reference_attention``        same                         same
"pallas"            "pallas_triton" (interpreter)  "pallas_gpu"                 "pallas_tpu"
"pallas_tpu"        TPU interpret mode             refused                      Mosaic TPU
"pallas_gpu"        Mosaic GPU interpreter         Mosaic GPU on sm_90+,        refused
                                                   else "pallas_triton"
"pallas_triton"     generic Pallas interpreter     Triton                       refused
"tokamax"           tokamax                        tokamax                      tokamax
==================  =============================  ===========================  ==============

* "xla": ``reference.reference_attention``, dense masked softmax in fp32; it
  materializes ``[B, H, T, S]`` scores (O(T S) memory, fine for short sequences;
  for long ones without a kernel use the attention layer's blockwise path).
* "pallas_tpu": ``pallas_tpu.flash_attention_tpu`` (Mosaic TPU). On CPU it runs in
  TPU interpret mode (``interpret=True`` or a ``pltpu.InterpretParams``, e.g. with
  ``detect_races=True``); ``interpret=False`` on CPU only lowers for TPU.
* "pallas_triton": ``pallas_triton.flash_attention_pallas`` (Pallas Triton); on
  CPU the generic Pallas interpreter (slow; for tests).
* "pallas_gpu": ``mosaic_gpu.flash_attention_mosaic_gpu`` (Mosaic GPU, warpgroup
  MMA; sm_90+) for bf16/fp16 inputs; on CPU it runs in the Mosaic GPU
  interpreter (``interpret=True`` or a ``plgpu.InterpretGPUParams``). fp32 inputs
  (wgmma has no fp32 operands) and pre-Hopper GPUs take the "pallas_triton" path.
* "tokamax": ``tokamax.tokamax_attention`` (``tokamax.dot_product_attention``, the
  tokamax extra; its XLA path on CPU); which features map is listed there.

An impl a backend cannot run is refused with a ValueError listing those it can.
All paths share the semantics of ``reference_attention`` (q_offset 0, every key
valid); rows with no visible key are 0.

Adding an implementation: write ``run(q, k, v, q_seg, kv_seg, *, causal, window,
scale, blocks, interpret, backend) -> [B, T, H, Dh]`` and add it to ``KERNELS``
(and its backends to ``RUNS_ON`` if they differ). Backend detection, the impl
names and the ``interpret`` checks are shared with the gmm dispatcher
(``pallas_kernels.dispatch``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.attention.mosaic_gpu import flash_attention_mosaic_gpu
from pallas_kernels.attention.pallas_triton import flash_attention_pallas
from pallas_kernels.attention.pallas_tpu import DEFAULT_BLOCKS, flash_attention_tpu
from pallas_kernels.attention.reference import reference_attention, split_segment_ids
from pallas_kernels.dispatch import (BEST, IMPLS, OWN, current_backend,
                                     gpu_is_hopper_or_newer, tpu_interpret,
                                     triton_interpret)

Array = jax.Array
RUNS_ON = {
    "cpu": ("xla", "pallas_tpu", "pallas_gpu", "pallas_triton", "tokamax"),
    "gpu": ("xla", "pallas_gpu", "pallas_triton", "tokamax"),
    "tpu": ("xla", "pallas_tpu", "tokamax"),
}
_BLOCK_NAMES = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")

# Triton (block_q, block_k, block_q_bwd, block_k_bwd) per backend. The GPU values are
# untuned guesses (no GPU was available when this was written); the generic
# interpreter on CPU is fastest with few, large blocks.
_TRITON_GPU_BLOCKS = (128, 64, 64, 64)
_TRITON_CPU_BLOCKS = (128, 128, 128, 128)


def _run_triton(q, k, v, q_seg, kv_seg, *, causal, window, scale, blocks, interpret,
                backend):
    interpret = triton_interpret(interpret, backend, "flash_attention")
    defaults = _TRITON_GPU_BLOCKS if backend == "gpu" else _TRITON_CPU_BLOCKS
    sizes = {}
    for name, default in zip(_BLOCK_NAMES, defaults):
        b = default if blocks[name] is None else blocks[name]
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"flash_attention: {name}={b!r} must be a power of two >= 16")
        sizes[name] = b
    return flash_attention_pallas(q, k, v, q_seg, kv_seg, causal=causal, window=window,
                                  scale=scale, interpret=interpret, **sizes)


def _run_tpu(q, k, v, q_seg, kv_seg, *, causal, window, scale, blocks, interpret, backend):
    interpret = tpu_interpret(interpret, backend, "flash_attention")
    sizes = {n: DEFAULT_BLOCKS[n] if blocks[n] is None else blocks[n] for n in _BLOCK_NAMES}
    return flash_attention_tpu(q, k, v, q_seg, kv_seg, causal=causal, window=window,
                               scale=scale, interpret=interpret, **sizes)


def _run_mosaic_gpu(q, k, v, q_seg, kv_seg, *, causal, window, scale, blocks, interpret,
                    backend):
    if q.dtype not in (jnp.bfloat16, jnp.float16):  # wgmma takes 16-bit operands only
        return _run_triton(q, k, v, q_seg, kv_seg, causal=causal, window=window, scale=scale,
                           blocks=blocks, interpret=interpret, backend=backend)
    if interpret is None:
        interpret = backend == "cpu"
    if backend == "cpu" and interpret is False:
        raise ValueError("flash_attention: impl='pallas_gpu' with interpret=False cannot run "
                         "on CPU; use interpret=None/True or impl='xla'")
    sizes = {n: blocks[n] for n in _BLOCK_NAMES if blocks[n] is not None}
    return flash_attention_mosaic_gpu(q, k, v, q_seg, kv_seg, causal=causal, window=window,
                                      scale=scale, interpret=interpret, **sizes)


def _run_tokamax(q, k, v, q_seg, kv_seg, *, causal, window, scale, blocks, interpret,
                 backend):
    """``tokamax.dot_product_attention`` (tokamax picks its kernel; blocks/interpret unused)."""
    from pallas_kernels.attention.tokamax import tokamax_attention  # optional dependency
    del blocks, interpret, backend
    seg = None if q_seg is None else (q_seg, kv_seg)
    return tokamax_attention(q, k, v, causal=causal, window=window, segment_ids=seg,
                             scale=scale)


KERNELS: dict[str, Callable[..., Array]] = {
    "pallas_tpu": _run_tpu,
    "pallas_gpu": _run_mosaic_gpu,
    "pallas_triton": _run_triton,
    "tokamax": _run_tokamax,
}


def resolve_impl(impl: str | None, backend: str) -> str:
    """Maps ``impl`` to the concrete implementation run on ``backend`` (see module doc)."""
    if impl is None:
        impl = BEST.get(backend, "xla")
    elif impl not in IMPLS:
        raise ValueError(f"flash_attention: impl={impl!r} is not one of {(None,) + IMPLS}")
    if impl == "pallas":
        impl = OWN.get(backend, impl)
    can = RUNS_ON.get(backend, ("xla",))
    if impl not in can:
        raise ValueError(f"flash_attention: impl={impl!r} cannot run on backend {backend!r}; "
                         f"it can run {(None, 'pallas') + can}")
    if impl == "pallas_gpu" and backend == "gpu" and (
            "pallas_gpu" not in KERNELS or not gpu_is_hopper_or_newer()):
        impl = "pallas_triton"  # pre-Hopper GPUs (or no Mosaic GPU kernel): Triton
    if impl != "xla" and impl not in KERNELS:
        raise ValueError(f"flash_attention: impl={impl!r} is not available in this build "
                         f"(no kernel registered for it); available on {backend!r}: "
                         f"{tuple(i for i in can if i == 'xla' or i in KERNELS)}")
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
                    block_k_bwd: int | None = None, interpret=None) -> Array:
    """Softmax attention with structured masks; FlashAttention-2 kernels per backend.

    Same semantics as ``reference_attention`` (see reference.py): GQA/MQA without
    repeating K/V; rows with no visible key return 0, never NaN. Differentiable
    (custom VJP with backward kernels on the Pallas paths).

    Args:
      q: [B, T, H, Dh] queries.
      k: [B, S, K, Dh] keys, H % K == 0.
      v: [B, S, K, Dh] values.
      causal: mask keys after the query position (pos_k > pos_q).
      window: None or int >= 1: a query sees keys with ``pos_q - pos_k < window``
        (and ``pos_k - pos_q < window`` when not causal).
      segment_ids: None, [B, T] (T == S), or a pair ([B, T], [B, S]) of int ids.
      impl: None, "xla", "pallas", "pallas_tpu", "pallas_gpu", "pallas_triton" or
        "tokamax" (see the module docstring's table).
      scale: score scale, default ``Dh ** -0.5``.
      block_q, block_k: forward tiles; block_q_bwd, block_k_bwd: backward tiles
        (kernel paths only; None: the kernel's defaults. Triton: powers of two
        >= 16; Mosaic TPU: multiples of 128).
      interpret: None (interpret on CPU only), a bool, or for "pallas_tpu" a
        ``pltpu.InterpretParams`` (for "pallas_gpu" a ``plgpu.InterpretGPUParams``).

    Returns:
      [B, T, H, Dh] in the inputs' result dtype.
    """
    q_seg, kv_seg = split_segment_ids(segment_ids, q.shape[1], k.shape[1])
    _validate(q, k, v, window, q_seg, kv_seg)
    backend = current_backend()
    impl = resolve_impl(impl, backend)
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if impl == "xla":
        return reference_attention(q, k, v, causal=causal, window=window,
                                   segment_ids=segment_ids, scale=scale)
    blocks = dict(zip(_BLOCK_NAMES, (block_q, block_k, block_q_bwd, block_k_bwd)))
    return KERNELS[impl](q, k, v, q_seg, kv_seg, causal=causal,
                         window=None if window is None else int(window), scale=scale,
                         blocks=blocks, interpret=interpret, backend=backend)
