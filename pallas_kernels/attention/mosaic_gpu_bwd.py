"""Backward kernels of the Mosaic GPU flash attention: dQ and dK/dV (FlashAttention-2 Alg. 2).

``backward(q, k, v, q_seg, kv_seg, o, lse2, do, cfg) -> (dq, dk, dv)`` on the padded
``[B, Tp, H, Dp]`` / ``[B, Sp, K, Dp]`` tensors of ``mosaic_gpu.py``, which ties it to
the forward with ``jax.custom_vjp``. ``delta = rowsum(dO * O)`` is an XLA fusion;
then ``dq_call`` (grid ``(H, Tp / (W bq), B)``; the memory warpgroup streams K/V
blocks) and ``dkv_call`` (grid ``(K, Sp / (W bk), B)``; it streams the (query head,
query block) pairs of the ``G`` query heads sharing the kv head, so GQA gradients
are summed in the wgmma accumulators). Both recompute
``p = exp2(s * scale * log2 e - lse2)`` and keep dQ (dK, dV) in true wgmma
accumulators across the whole loop.

Verified (jax 0.12.0.1, CPU): dQ/dK/dV against ``reference_attention`` in the Mosaic
GPU interpreter (tests/pallas_kernels/test_attention_mosaic_gpu.py), and a
deviceless compile for H100 of forward+backward, with each kernel's shared memory
read back from the Mosaic GPU lowering (tests_aot/test_attention_mosaic_gpu.py).
NOT run on any GPU; see ``mosaic_gpu.py`` for what the interpreter does not model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention.common import (idiv, kv_block_range, q_block_range,
                                             split_seg_refs, visible)
from pallas_kernels.attention.mosaic_gpu_common import (COL, LOG2E, ROW, SWIZZLE,
                                                        MosaicFlashConfig, call_params, iota,
                                                        mm, produce, stream_kv)


def _dq_kernel(*refs, cfg: MosaicFlashConfig, g: int, has_seg: bool):
    ins, (qs_ref, ks_ref), rest = split_seg_refs(refs, 6, has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    dq_ref, smem, bars = rest
    q_s, do_s, lse_s, delta_s, qseg_s, k_s, v_s, kseg_s, ds_s = smem
    q_bar, kv_bar, used_bar = bars
    w, bq, bk, st = cfg.compute_wgs, cfg.block_q_bwd, cfg.block_k_bwd, cfg.stages
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
        q_w, do_w, ds_w = q_s.at[wg], do_s.at[wg], ds_s.at[wg]
        for src, dst in ((q_ref.at[b, rows, h], q_w), (do_ref.at[b, rows, h], do_w),
                         (lse_ref.at[b, h, rows], lse_s.at[wg]),
                         (delta_ref.at[b, h, rows], delta_s.at[wg])):
            plgpu.copy_gmem_to_smem(src, dst, q_bar.at[wg])
        if has_seg:
            plgpu.copy_gmem_to_smem(qs_ref.at[b, rows], qseg_s.at[wg], q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        lse = lax.broadcast_in_dim(plgpu.load(lse_s.at[wg], layout=ROW), (bq, bk), [0])
        delta = lax.broadcast_in_dim(plgpu.load(delta_s.at[wg], layout=ROW), (bq, bk), [0])
        qpos = iota((bq, bk), 0, q0)
        qseg = None
        if has_seg:
            qseg = lax.broadcast_in_dim(plgpu.load(qseg_s.at[wg], layout=ROW), (bq, bk), [0])
        c = cfg.scale * LOG2E

        def loop(dq_acc):
            def body(j, _):
                slot = lax.rem(j - lo, jnp.int32(st))
                plgpu.barrier_wait(kv_bar.at[slot])
                s = mm(q_w, k_s.at[slot].T, (bq, bk))
                dpv = mm(do_w, v_s.at[slot].T, (bq, bk))
                p = jnp.exp2(s * c - lse)
                kseg = None
                if has_seg:
                    kseg = lax.broadcast_in_dim(plgpu.load(kseg_s.at[slot], layout=COL),
                                                (bq, bk), [1])
                ok = visible(qpos, iota((bq, bk), 1, j * bk), cfg, sp, qseg, kseg)
                if ok is not None:
                    p = jnp.where(ok, p, 0.0)
                ds_w[...] = (p * (dpv - delta)).astype(ds_w.dtype)
                plgpu.commit_smem()
                plgpu.wgmma(dq_acc, ds_w, k_s.at[slot])
                plgpu.wgmma_wait(0)  # K slot and dS tile are read before release
                plgpu.barrier_arrive(used_bar.at[slot])
                return ()

            lax.fori_loop(lo, hi, body, ())
            return dq_acc[...]

        dq = pl.run_scoped(loop, plgpu.ACC((bq, dp), jnp.float32))
        q_w[...] = (dq * cfg.scale).astype(q_w.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_w, dq_ref.at[b, rows, h])
        plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(*refs, cfg: MosaicFlashConfig, g: int, has_seg: bool):
    ins, (qs_ref, ks_ref), rest = split_seg_refs(refs, 6, has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    dk_ref, dv_ref, smem, bars = rest
    k_s, v_s, kseg_s, q_s, do_s, lse_s, delta_s, qseg_s, p_s, ds_s = smem
    k_bar, q_bar, used_bar = bars
    w, bq, bk, st = cfg.compute_wgs, cfg.block_q_bwd, cfg.block_k_bwd, cfg.stages
    tp, sp, dp = q_ref.shape[1], k_ref.shape[1], k_ref.shape[3]
    b, kvh, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
    tile0 = lax.axis_index("k") * (w * bk)
    lo, hi = q_block_range(tile0, w * bk, bq, tp // bq, cfg)
    n_q = hi - lo

    def step_to(step):
        """Stream step -> (query head, query block) for this kv head."""
        return kvh * g + lax.div(step, n_q), lo + lax.rem(step, n_q)

    @pl.when(wg == w)
    def _memory():
        if w > 1:
            plgpu.set_max_registers(40, action="decrease")

        def issue(step, slot):
            h, i = step_to(step)
            rows = pl.ds(i * bq, bq)
            for src, dst in ((q_ref.at[b, rows, h], q_s), (do_ref.at[b, rows, h], do_s),
                             (lse_ref.at[b, h, rows], lse_s),
                             (delta_ref.at[b, h, rows], delta_s)):
                plgpu.copy_gmem_to_smem(src, dst.at[slot], q_bar.at[slot])
            if has_seg:
                plgpu.copy_gmem_to_smem(qs_ref.at[b, rows], qseg_s.at[slot], q_bar.at[slot])

        produce(0, g * n_q, st, issue, used_bar)

    @pl.when(wg < w)
    def _compute():
        if w > 1:
            plgpu.set_max_registers(232, action="increase")
        k0 = tile0 + wg * bk
        rows = pl.ds(k0, bk)
        k_w, v_w, p_w, ds_w = k_s.at[wg], v_s.at[wg], p_s.at[wg], ds_s.at[wg]
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], k_w, k_bar.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], v_w, k_bar.at[wg])
        if has_seg:
            plgpu.copy_gmem_to_smem(ks_ref.at[b, rows], kseg_s.at[wg], k_bar.at[wg])
        plgpu.barrier_wait(k_bar.at[wg])
        kpos = iota((bk, bq), 0, k0)
        kseg = None
        if has_seg:
            kseg = lax.broadcast_in_dim(plgpu.load(kseg_s.at[wg], layout=ROW), (bk, bq), [0])
        c = cfg.scale * LOG2E

        def loop(dk_acc, dv_acc):
            def body(step, _):
                slot = lax.rem(step, jnp.int32(st))
                i = lo + lax.rem(step, n_q)
                plgpu.barrier_wait(q_bar.at[slot])
                s_t = mm(k_w, q_s.at[slot].T, (bk, bq))     # S^T  [bk, bq]
                dp_t = mm(v_w, do_s.at[slot].T, (bk, bq))   # dP^T [bk, bq]
                lse = plgpu.load(lse_s.at[slot], layout=COL)
                delta = plgpu.load(delta_s.at[slot], layout=COL)
                p_t = jnp.exp2(s_t * c - lax.broadcast_in_dim(lse, (bk, bq), [1]))
                qseg = None
                if has_seg:
                    qseg = lax.broadcast_in_dim(plgpu.load(qseg_s.at[slot], layout=COL),
                                                (bk, bq), [1])
                ok = visible(iota((bk, bq), 1, i * bq), kpos, cfg, sp, qseg, kseg)
                if ok is not None:
                    p_t = jnp.where(ok, p_t, 0.0)
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, (bk, bq), [1]))
                p_w[...] = p_t.astype(p_w.dtype)
                ds_w[...] = ds_t.astype(ds_w.dtype)
                plgpu.commit_smem()
                plgpu.wgmma(dv_acc, p_w, do_s.at[slot])   # dV += P^T dO
                plgpu.wgmma(dk_acc, ds_w, q_s.at[slot])   # dK += dS^T Q
                plgpu.wgmma_wait(0)  # Q/dO slot and P/dS tiles are read before release
                plgpu.barrier_arrive(used_bar.at[slot])
                return ()

            lax.fori_loop(0, g * n_q, body, ())
            return dk_acc[...], dv_acc[...]

        acc = plgpu.ACC((bk, dp), jnp.float32)
        dk, dv = pl.run_scoped(loop, acc, acc)
        k_w[...] = (dk * cfg.scale).astype(k_w.dtype)
        v_w[...] = dv.astype(v_w.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_w, dk_ref.at[b, rows, kvh])
        plgpu.copy_smem_to_gmem(v_w, dv_ref.at[b, rows, kvh])
        plgpu.wait_smem_to_gmem(0)


def _seg_smem(has_seg: bool, n: int, rows: int):
    return plgpu.SMEM((n, rows), jnp.int32) if has_seg else None


def dq_call(q, k, v, do, lse, delta, qs, ks, cfg: MosaicFlashConfig):
    """dQ [B, Tp, H, Dp] from padded inputs, lse2 and delta [B, H, Tp]."""
    (b, tp, h, dp), (sp, kh), dt = q.shape, k.shape[1:3], q.dtype
    w, bq, bk, st = cfg.compute_wgs, cfg.block_q_bwd, cfg.block_k_bwd, cfg.stages
    has_seg, g = qs is not None, h // kh
    seg_smem = functools.partial(_seg_smem, has_seg)
    args = (q, k, v, do, lse, delta, *(() if qs is None else (qs, ks)))

    dq_smem = (
        plgpu.SMEM((w, bq, dp), dt, transforms=SWIZZLE),   # Q, then dQ
        plgpu.SMEM((w, bq, dp), dt, transforms=SWIZZLE),   # dO
        plgpu.SMEM((w, bq), jnp.float32), plgpu.SMEM((w, bq), jnp.float32),  # lse2, delta
        seg_smem(w, bq),
        plgpu.SMEM((st, bk, dp), dt, transforms=SWIZZLE),  # K ring
        plgpu.SMEM((st, bk, dp), dt, transforms=SWIZZLE),  # V ring
        seg_smem(st, bk),
        plgpu.SMEM((w, bq, bk), dt, transforms=SWIZZLE),   # dS
    )
    dq_bars = (plgpu.Barrier(num_arrivals=4 + has_seg, num_barriers=w),
               plgpu.Barrier(num_arrivals=2 + has_seg, num_barriers=st),
               plgpu.Barrier(num_arrivals=w, num_barriers=st))
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, cfg=cfg, g=g, has_seg=has_seg),
        out_type=jax.ShapeDtypeStruct(q.shape, dt),
        scratch_types=(dq_smem, dq_bars),
        grid=(h, tp // (w * bq), b),
        grid_names=("h", "q", "b"),
        num_threads=w + 1,
        thread_name="wg",
        **call_params(cfg),
    )(*args)
    return dq


def dkv_call(q, k, v, do, lse, delta, qs, ks, cfg: MosaicFlashConfig):
    """(dK, dV) [B, Sp, K, Dp] from padded inputs, lse2 and delta [B, H, Tp]."""
    (b, tp, h, dp), (sp, kh), dt = q.shape, k.shape[1:3], q.dtype
    w, bq, bk, st = cfg.compute_wgs, cfg.block_q_bwd, cfg.block_k_bwd, cfg.stages
    has_seg, g = qs is not None, h // kh
    seg_smem = functools.partial(_seg_smem, has_seg)
    args = (q, k, v, do, lse, delta, *(() if qs is None else (qs, ks)))
    dkv_smem = (
        plgpu.SMEM((w, bk, dp), dt, transforms=SWIZZLE),   # K, then dK
        plgpu.SMEM((w, bk, dp), dt, transforms=SWIZZLE),   # V, then dV
        seg_smem(w, bk),
        plgpu.SMEM((st, bq, dp), dt, transforms=SWIZZLE),  # Q ring
        plgpu.SMEM((st, bq, dp), dt, transforms=SWIZZLE),  # dO ring
        plgpu.SMEM((st, bq), jnp.float32), plgpu.SMEM((st, bq), jnp.float32),
        seg_smem(st, bq),
        plgpu.SMEM((w, bk, bq), dt, transforms=SWIZZLE),   # P^T
        plgpu.SMEM((w, bk, bq), dt, transforms=SWIZZLE),   # dS^T
    )
    dkv_bars = (plgpu.Barrier(num_arrivals=2 + has_seg, num_barriers=w),
                plgpu.Barrier(num_arrivals=4 + has_seg, num_barriers=st),
                plgpu.Barrier(num_arrivals=w, num_barriers=st))
    dk, dv = plgpu.kernel(
        functools.partial(_dkv_kernel, cfg=cfg, g=g, has_seg=has_seg),
        out_type=(jax.ShapeDtypeStruct(k.shape, dt), jax.ShapeDtypeStruct(v.shape, dt)),
        scratch_types=(dkv_smem, dkv_bars),
        grid=(kh, sp // (w * bk), b),
        grid_names=("h", "k", "b"),
        num_threads=w + 1,
        thread_name="wg",
        **call_params(cfg),
    )(*args)
    return dk, dv


def backward(q, k, v, qs, ks, o, lse, do, cfg: MosaicFlashConfig):
    """(dQ, dK, dV) of the padded forward (``lse``: its base-2 log-sum-exp [B, H, Tp])."""
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    dq = dq_call(q, k, v, do, lse, delta, qs, ks, cfg)
    dk, dv = dkv_call(q, k, v, do, lse, delta, qs, ks, cfg)
    return dq, dk, dv
