"""FlashAttention forward and backward for Hopper on the Pallas Mosaic GPU backend.

Computes exactly ``reference.reference_attention`` (q_offset 0, kv_len S, no ALiBi)
for q ``[B, T, H, Dh]`` and k/v ``[B, S, K, Dh]``, with the FlashAttention-2
decomposition (Dao 2023, Alg. 1 forward, Alg. 2 backward) laid out the
FlashAttention-3 way for sm_90 (Shah et al. 2024): warp-specialized CTAs where one
*memory warpgroup* streams blocks through a ring of ``stages`` shared-memory slots
with TMA copies (one "loaded" barrier per slot, one "consumed" barrier per slot
that the compute warpgroups arrive on), and ``W`` *compute warpgroups* run the
matmuls as warpgroup MMAs (wgmma, fp32 accumulators) on 64-row tiles each.

* forward, grid ``(H, Tp / (W bq), B)``: compute warpgroup ``w`` owns query rows
  ``[(i W + w) bq, ... + bq)`` of head ``h``; the memory warpgroup streams K/V
  blocks of kv head ``h // G`` (GQA/MQA read K/V in place). Online softmax in
  base 2 (scores pre-multiplied by ``scale * log2 e``); writes the output and the
  base-2 row log-sum-exp ``lse2 = m + log2 l`` (``+inf`` for rows that see no key).
* backward: ``delta = rowsum(dO * O)`` (an XLA fusion), then
  dQ with grid ``(H, Tp / (W bq), B)`` streaming K/V blocks, and
  dK/dV with grid ``(K, Sp / (W bk), B)`` streaming (query head, query block)
  pairs of the ``G`` query heads that share the kv head, so GQA gradients are
  summed in the wgmma accumulators and K/V/dK/dV are never repeated in memory.
  Both recompute ``p = exp2(s * scale * log2 e - lse2)``.

Masks are structure (causal, window, segment ids, the true S): each CTA streams
only the blocks its query (or key) tile can see, so blocks wholly outside the
causal/window band cost neither a TMA copy nor a wgmma; inside streamed blocks the
mask is applied element-wise. Both compute warpgroups of a CTA walk the same
block range (the union of their rows' ranges), which costs at most one masked
diagonal block per warpgroup and keeps the pipeline's barrier protocol simple.

Operand routing. Every wgmma here reads both operands from shared memory: the
probabilities ``p`` (and ``dS``) are cast to the input dtype and stored to a
swizzled SMEM tile before the ``P V`` (``dS K``, ``P^T dO``, ``dS^T Q``) product,
and the forward's rescaled accumulator is carried in registers
(``acc = alpha acc + P V``) rather than in a wgmma accumulator. FlashAttention-3
instead feeds ``p`` from registers and keeps ``acc`` in the wgmma accumulator; the
Mosaic GPU interpreter runs neither register-operand wgmma nor accumulator
initialisation from a value (checked with jax 0.12.0.1), and one code path that
both runs in the interpreter and compiles for sm_90 was preferred to a faster
path that could not be checked anywhere. The dQ and dK/dV accumulators are true
wgmma accumulators carried across the whole loop (no rescaling is needed there).

Dtypes: wgmma takes 16-bit inputs, so q/k/v must be bf16 or fp16 (fp32 inputs are
refused with a ValueError rather than silently cast: use ``impl="xla"`` or cast
explicitly). Scores, softmax statistics and accumulators are fp32. Head dims 64
and 128 are native; smaller ones are zero-padded to 64 (then 128), larger ones
are refused. Any T and S: zero-padded to the CTA tiles (padded keys are masked
with the true S; padded query rows are sliced off). Rows with no visible key
produce 0 and ``lse2 = +inf`` (no NaN). ``approx_math`` (``ex2.approx``, fast
division) is on for the device build; the interpreter uses exact numpy math.

Verified (jax 0.12.0.1, CPU): forward values and dQ/dK/dV against
``reference_attention`` in the Mosaic GPU interpreter
(``interpret=plgpu.InterpretGPUParams()``), which executed every primitive the
three kernels use: TMA copies GMEM->SMEM and SMEM->GMEM, mbarrier arrive/wait (with
``num_arrivals``), warpgroup threads (``num_threads``, ``axis_index``), wgmma with
SMEM operands (transposed B included), accumulator refs (``run_scoped``), SMEM
stores of WGMMA-layout values, ``commit_smem``, dynamic-bound loops, and
``plgpu.load`` with WGMMA reduce layouts. The interpreter does NOT model: wgmma
asynchrony (``wgmma_wait`` is a no-op and products complete immediately), layouts
and swizzling (values are stored logically), register limits
(``set_max_registers`` is a no-op), ``approx_math``, or timing. One case ran under
the interpreter's race detector (no race). Deviceless compile for H100 with
jax[cuda13] (tests_aot): forward and forward+backward at T=8192, GQA 32/8, Dh=128,
bf16, causal pass the Mosaic GPU lowering (including its 227 KiB shared-memory
check) and XLA's compile; the kernels' MLIR -> PTX -> SASS step was not observed
there, so ptxas acceptance and register spills are unverified. NOT run on any GPU;
block sizes and stage counts are untuned.

Modules: this one holds the forward kernel, the ``jax.custom_vjp`` and the public
``flash_attention_mosaic_gpu``; ``mosaic_gpu_bwd.py`` the dQ and dK/dV kernels;
``mosaic_gpu_common.py`` the config and the helpers both use; ``common.py`` the
mask, block ranges and VJP wiring shared with the other attention kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention.common import (flash_vjp, idiv, kv_block_range, run_padded,
                                             split_seg_refs, visible)
from pallas_kernels.attention.mosaic_gpu_bwd import backward
from pallas_kernels.attention.mosaic_gpu_common import (COL, LOG2E, ROW, SWIZZLE, WG,
                                                        MosaicFlashConfig, call_params, iota,
                                                        mm, stream_kv)
from pallas_kernels.tiling import round_up

Array = jax.Array
_DTYPES = (jnp.bfloat16, jnp.float16)


def _fwd_kernel(*refs, cfg: MosaicFlashConfig, g: int, has_seg: bool):
    (q_ref, k_ref, v_ref), (qs_ref, ks_ref), rest = split_seg_refs(refs, 3, has_seg)
    o_ref, lse_ref, (q_s, k_s, v_s, p_s, lse_s, qseg_s, kseg_s), bars = rest
    q_bar, kv_bar, used_bar = bars
    w, bq, bk, st = cfg.compute_wgs, cfg.block_q, cfg.block_k, cfg.stages
    sp, dp = k_ref.shape[1], k_ref.shape[3]
    b, h, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
    tile0 = lax.axis_index("q") * (w * bq)
    lo, hi = kv_block_range(tile0, w * bq, bk, sp // bk, cfg)

    @pl.when(wg == w)
    def _memory():
        if w > 1:
            plgpu.set_max_registers(40, action="decrease")
        stream_kv(k_ref, v_ref, ks_ref, k_s, v_s, kseg_s, kv_bar, used_bar, b=b,
                  kvh=idiv(h, g), bk=bk, lo=lo, hi=hi, stages=st)

    @pl.when(wg < w)
    def _compute():
        if w > 1:
            plgpu.set_max_registers(232, action="increase")
        q0 = tile0 + wg * bq
        rows = pl.ds(q0, bq)
        q_w, p_w, lse_w = q_s.at[wg], p_s.at[wg], lse_s.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_w, q_bar.at[wg])
        if has_seg:
            plgpu.copy_gmem_to_smem(qs_ref.at[b, rows], qseg_s.at[wg], q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        qpos = iota((bq, bk), 0, q0)
        qseg = None
        if has_seg:
            qseg = lax.broadcast_in_dim(plgpu.load(qseg_s.at[wg], layout=ROW), (bq, bk), [0])
        c = cfg.scale * LOG2E

        def body(j, carry):
            acc, m, l = carry  # [bq, Dp], [bq], [bq] fp32; m in scaled base-2 units
            slot = lax.rem(j - lo, jnp.int32(st))
            plgpu.barrier_wait(kv_bar.at[slot])
            s = mm(q_w, k_s.at[slot].T, (bq, bk)) * c
            kseg = None
            if has_seg:
                kseg = lax.broadcast_in_dim(plgpu.load(kseg_s.at[slot], layout=COL),
                                            (bq, bk), [1])
            ok = visible(qpos, iota((bq, bk), 1, j * bk), cfg, sp, qseg, kseg)
            if ok is not None:
                s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # row masked so far: keep 0s
            alpha = jnp.exp2(m - m_safe)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, (bq, bk), [0]))
            l = l * alpha + p.sum(axis=1)
            p_w[...] = p.astype(p_w.dtype)
            plgpu.commit_smem()
            pv = mm(p_w, v_s.at[slot], (bq, dp))
            plgpu.barrier_arrive(used_bar.at[slot])
            return acc * lax.broadcast_in_dim(alpha, (bq, dp), [0]) + pv, m_new, l

        init = (plgpu.layout_cast(jnp.zeros((bq, dp), jnp.float32), WG),
                plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), ROW),
                plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), ROW))
        acc, m, l = lax.fori_loop(lo, hi, body, init)
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        q_w[...] = (acc / lax.broadcast_in_dim(l_safe, (bq, dp), [0])).astype(q_w.dtype)
        lse_w[...] = jnp.where(seen, m + jnp.log(l_safe) * LOG2E, jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_w, o_ref.at[b, rows, h])
        plgpu.copy_smem_to_gmem(lse_w, lse_ref.at[b, h, rows])
        plgpu.wait_smem_to_gmem(0)


def _forward(q, k, v, qs, ks, cfg: MosaicFlashConfig):
    """Padded inputs -> (o [B, Tp, H, Dp], lse2 [B, H, Tp] fp32)."""
    b, tp, h, dp = q.shape
    kh = k.shape[2]
    w, bq, bk, st = cfg.compute_wgs, cfg.block_q, cfg.block_k, cfg.stages
    has_seg = qs is not None
    scratch = (
        plgpu.SMEM((w, bq, dp), q.dtype, transforms=SWIZZLE),   # Q, then O
        plgpu.SMEM((st, bk, dp), q.dtype, transforms=SWIZZLE),  # K ring
        plgpu.SMEM((st, bk, dp), q.dtype, transforms=SWIZZLE),  # V ring
        plgpu.SMEM((w, bq, bk), q.dtype, transforms=SWIZZLE),   # P (wgmma A operand)
        plgpu.SMEM((w, bq), jnp.float32),                        # lse2
        plgpu.SMEM((w, bq), jnp.int32) if has_seg else None,
        plgpu.SMEM((st, bk), jnp.int32) if has_seg else None,
    )
    bars = (plgpu.Barrier(num_arrivals=1 + has_seg, num_barriers=w),
            plgpu.Barrier(num_arrivals=2 + has_seg, num_barriers=st),
            plgpu.Barrier(num_arrivals=w, num_barriers=st))
    kernel = functools.partial(_fwd_kernel, cfg=cfg, g=h // kh, has_seg=has_seg)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((b, h, tp), jnp.float32)),
        scratch_types=(scratch, bars),
        grid=(h, tp // (w * bq), b),
        grid_names=("h", "q", "b"),
        num_threads=w + 1,
        thread_name="wg",
        **call_params(cfg),
    )(q, k, v, *(() if qs is None else (qs, ks)))


_flash = flash_vjp(_forward, backward)  # (q, k, v, q_seg, kv_seg, cfg) -> o


def _check_block(name: str, value, allowed) -> int:
    if value not in allowed:
        raise ValueError(f"flash_attention_mosaic_gpu: {name}={value!r} not allowed; "
                         f"use one of {allowed}")
    return value


def flash_attention_mosaic_gpu(q: Array, k: Array, v: Array, q_seg: Array | None = None,
                               kv_seg: Array | None = None, *, causal: bool = True,
                               window: int | None = None, scale: float | None = None,
                               block_q: int = 64, block_k: int = 128,
                               block_q_bwd: int = 64, block_k_bwd: int = 64,
                               stages: int = 2, compute_wgs: int = 2,
                               interpret: bool | plgpu.InterpretGPUParams = False) -> Array:
    """Mosaic GPU (sm_90) flash attention; differentiable (custom VJP).

    Shapes are validated by ``ops.flash_attention``; this checks what is specific
    to the kernel (dtype, head dim, tiles).

    Args:
      q: [B, T, H, Dh] bf16 or fp16; k, v: [B, S, K, Dh] of the same dtype, H % K == 0.
      q_seg, kv_seg: optional int segment ids [B, T] and [B, S] (both or neither).
      causal, window, scale: as in ``reference_attention``.
      block_q: query rows per compute warpgroup in the forward (64: one wgmma M).
      block_k: streamed key block in the forward (64 or 128).
      block_q_bwd, block_k_bwd: backward tiles (64; see ``MosaicFlashConfig``).
      stages: shared-memory ring depth of the streamed operands (2..4).
      compute_wgs: compute warpgroups per CTA (1 or 2), plus one memory warpgroup.
      interpret: run in the Mosaic GPU interpreter (CPU) instead of compiling:
        True, or a ``plgpu.InterpretGPUParams`` (e.g. with ``detect_races=True``).

    Returns:
      [B, T, H, Dh] in q.dtype.
    """
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"flash_attention_mosaic_gpu: dtypes q={q.dtype}, k={k.dtype}, v={v.dtype} not "
            "allowed; wgmma needs one 16-bit dtype (bfloat16 or float16). Cast the inputs, "
            "or use impl='xla' (fp32) or impl='pallas' (Triton, fp32 capable)")
    t, d, s = q.shape[1], q.shape[3], k.shape[1]
    if d > 128:
        raise ValueError(f"flash_attention_mosaic_gpu: head dim Dh={d} not allowed; "
                         "Dh <= 128 (64 and 128 native, smaller ones zero-padded)")
    dp = 64 if d <= 64 else 128
    _check_block("block_q", block_q, (64,))
    _check_block("block_k", block_k, (64, 128))
    _check_block("block_q_bwd", block_q_bwd, (64,))
    _check_block("block_k_bwd", block_k_bwd, (64,))
    _check_block("stages", stages, (2, 3, 4))
    _check_block("compute_wgs", compute_wgs, (1, 2))
    cfg = MosaicFlashConfig(t=t, s=s, causal=causal, window=window,
                            scale=float(d ** -0.5 if scale is None else scale),
                            block_q=block_q, block_k=block_k, block_q_bwd=block_q_bwd,
                            block_k_bwd=block_k_bwd, stages=stages,
                            compute_wgs=compute_wgs, interpret=interpret)
    tp, sp = round_up(t, cfg.q_tile), round_up(s, cfg.k_tile)
    return run_padded(_flash, q, k, v, q_seg, kv_seg, cfg, tp=tp, sp=sp, dp=dp)
