"""Backward kernels of the Mosaic TPU flash attention: dQ and dK/dV (FlashAttention-2 Alg. 2).

``backward(q, k, v, q_seg, kv_seg, o, lse, do, cfg) -> (dq, dk, dv)`` on the padded
heads-before-time tensors of ``pallas_tpu.py`` (q ``[B, H, Tp, Dp]``, k/v
``[B, K, Sp, Dp]``, ``lse`` ``[B, H, 1, Tp]``), which ties it to the forward with
``jax.custom_vjp``. ``delta = rowsum(dO * O)`` is an XLA fusion; then a dQ kernel
with the forward's grid ``(B, H, Tp / bq, steps)`` and a dK/dV kernel with grid
``(B, K, Sp / bk, G, steps)`` whose two sequential axes walk the G query heads of
the kv head and their query blocks, accumulating dK and dV in VMEM. The dK/dV
kernel works on transposed scores ``[bk, bq]`` so ``lse``, ``delta`` and the query
segment ids are used as rows. Both recompute ``p = exp(s - lse)`` block by block and
visit only the blocks of the causal/window band (``pallas_tpu_common.kv_band`` /
``q_band`` by scalar prefetch).

Verified (jax 0.12.0.1): gradients against ``reference_attention`` in TPU interpret
mode on CPU (tests/pallas_kernels/test_attention_tpu.py), and both kernels compile
deviceless for TPU v5e and v5p with libtpu 0.0.50.1 (tests_aot/test_attention_tpu.py).
NOT run on a TPU; block sizes untuned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention.common import visible
from pallas_kernels.attention.pallas_tpu_common import (NN, NT, TpuFlashConfig, col,
                                                        compiler_params, kv_band, q_band,
                                                        step_block)


def _dq_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               cfg, bq, bk, s_padded, has_seg):
    if has_seg:
        qs_ref, ks_ref, dq_ref, dq_sc = refs
    else:
        dq_ref, dq_sc = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(j < count_ref[i])
    def _step():
        kb = start_ref[i] + j
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * cfg.scale
        p = jnp.exp(s - col(lse_ref))  # [bq, bk]; lse = +inf on empty rows -> 0
        qpos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        kpos = kb * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        ok = visible(qpos, kpos, cfg, s_padded, *((col(qs_ref), ks_ref[...]) if has_seg else ()))
        if ok is not None:
            p = jnp.where(ok, p, 0.0)
        dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
        ds = p * (dp - col(delta_ref))
        dq_sc[...] += lax.dot_general(ds.astype(k.dtype), k, NN,
                                      preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                cfg, bq, bk, s_padded, has_seg):
    if has_seg:
        qs_ref, ks_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    else:
        dk_ref, dv_ref, dk_sc, dv_sc = refs
    j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((gi == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(i < count_ref[j])
    def _step():
        qb = start_ref[j] + i
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        st = lax.dot_general(k, q, NT, preferred_element_type=jnp.float32) * cfg.scale
        pt = jnp.exp(st - lse_ref[...])  # [bk, bq]: transposed, lse is a row
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
        qpos = qb * bq + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
        ok = visible(qpos, kpos, cfg, s_padded, *((qs_ref[...], col(ks_ref)) if has_seg else ()))
        if ok is not None:
            pt = jnp.where(ok, pt, 0.0)
        dv_sc[...] += lax.dot_general(pt.astype(do.dtype), do, NN,
                                      preferred_element_type=jnp.float32)
        dpt = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)
        dst = pt * (dpt - delta_ref[...])
        dk_sc[...] += lax.dot_general(dst.astype(q.dtype), q, NN,
                                      preferred_element_type=jnp.float32)

    @pl.when((gi == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, qs, ks, o, lse, do, cfg: TpuFlashConfig):
    b, h, tp, dp = q.shape
    kh, sp = k.shape[1], k.shape[2]
    g = h // kh
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    n_q, n_k = tp // bq, sp // bk
    has_seg = qs is not None
    segs = () if qs is None else (qs, ks)
    delta = jnp.einsum("bhtd,bhtd->bht", o.astype(jnp.float32),
                       do.astype(jnp.float32))[:, :, None, :]  # [B, H, 1, Tp]
    common = dict(cfg=cfg, bq=bq, bk=bk, s_padded=sp, has_seg=has_seg)

    # dQ: the forward's grid; sequential axis over the visible key blocks.
    start, count = kv_band(n_q, bq, n_k, bk, cfg)

    def kv_map(b_, h_, i, j, st, ct):
        return b_, lax.div(h_, g), step_block(st, ct, i, j), 0

    def row_map(b_, h_, i, j, st, ct):
        return b_, h_, i, 0

    def stat_map(b_, h_, i, j, st, ct):
        return b_, h_, 0, i

    q_spec = pl.BlockSpec((None, None, bq, dp), row_map)
    kv_spec = pl.BlockSpec((None, None, bk, dp), kv_map)
    stat_spec = pl.BlockSpec((None, None, 1, bq), stat_map)
    seg_specs = ([pl.BlockSpec((None, 1, bq), lambda b_, h_, i, j, st, ct: (b_, 0, i)),
                  pl.BlockSpec((None, 1, bk), lambda b_, h_, i, j, st, ct:
                               (b_, 0, step_block(st, ct, i, j)))] if has_seg else [])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, h, n_q, max(int(count.max()), 1)),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec] + seg_specs,
            out_specs=q_spec, scratch_shapes=[pltpu.VMEM((bq, dp), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=cfg.interpret or False,
        name="archlab_flash_tpu_dq",
    )(jnp.asarray(start), jnp.asarray(count), q, k, v, do, lse, delta, *segs)

    # dK, dV: grid over key blocks of every kv head; sequential over (query head, block).
    start, count = q_band(n_k, bk, n_q, bq, cfg)

    def qrow_map(b_, k_, j, gi, i, st, ct):
        return b_, k_ * g + gi, step_block(st, ct, j, i), 0

    def qstat_map(b_, k_, j, gi, i, st, ct):
        return b_, k_ * g + gi, 0, step_block(st, ct, j, i)

    def key_map(b_, k_, j, gi, i, st, ct):
        return b_, k_, j, 0

    q_spec = pl.BlockSpec((None, None, bq, dp), qrow_map)
    kv_spec = pl.BlockSpec((None, None, bk, dp), key_map)
    stat_spec = pl.BlockSpec((None, None, 1, bq), qstat_map)
    seg_specs = ([pl.BlockSpec((None, 1, bq), lambda b_, k_, j, gi, i, st, ct:
                               (b_, 0, step_block(st, ct, j, i))),
                  pl.BlockSpec((None, 1, bk), lambda b_, k_, j, gi, i, st, ct: (b_, 0, j))]
                 if has_seg else [])
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, kh, n_k, g, max(int(count.max()), 1)),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec] + seg_specs,
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, dp), jnp.float32),
                            pltpu.VMEM((bk, dp), jnp.float32)]),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)),
        compiler_params=compiler_params("parallel", "parallel", "parallel", "arbitrary",
                                         "arbitrary"),
        interpret=cfg.interpret or False,
        name="archlab_flash_tpu_dkv",
    )(jnp.asarray(start), jnp.asarray(count), q, k, v, do, lse, delta, *segs)
    return dq, dk, dv
