"""FlashAttention-2 forward and backward as Pallas kernels, tied by ``jax.custom_vjp``.

Computes exactly ``reference.reference_attention`` (q_offset 0, kv_len S, no ALiBi)
for q ``[B, T, H, Dh]`` and k/v ``[B, S, K, Dh]`` (Dao 2023, FlashAttention-2,
Alg. 1 forward, Alg. 2 backward):

* forward, grid ``(T / bq, B, H)``: program ``(i, b, h)`` keeps query block ``i`` of
  head ``h``, loops over the key blocks of kv head ``h // G`` with an online
  softmax (running max ``m``, normalizer ``l``, fp32 accumulator) and writes the
  output and the row log-sum-exp ``lse = m + log l``.
* backward: ``delta = rowsum(dO * O)`` (an XLA fusion), then two kernels that
  recompute ``p = exp(s - lse)`` block by block: ``dQ`` with grid ``(T / bq, B, H)``
  looping over key blocks, and ``dK, dV`` with grid ``(S / bk, B, K)`` looping over
  the ``G`` query heads of the kv head and their query blocks, so GQA/MQA gradients
  are summed in registers and K/V are never repeated in memory.

Masks are structure (causal, window, segment ids, the true S): each program visits
only the key (or query) blocks that the causal/window band can reach, so blocks
entirely outside the mask are skipped, not computed; inside visited blocks the
mask is applied element-wise (to interior blocks too: peeling fully visible blocks
into an unmasked loop is the first optimization to try with a GPU at hand).
Scores and softmax statistics are fp32; bf16 inputs feed the matmuls in bf16 with
fp32 accumulation (``p`` and ``dS`` are cast to the input dtype for their
matmuls). Rows with no visible key get ``l = 0``: the output is 0 and
``lse = +inf`` so the backward ``p`` is 0 (no NaN anywhere).

Any T and S: sequences are zero-padded to the block size (padded keys are masked
with the true S, padded query rows are sliced off; a copy only when not a
multiple). Head dim is padded to a power of two >= 16 (64 and 128 are native;
32 too). Block sizes must be powers of two (Triton).

Verified (jax 0.12.0.1 and 0.11.2): values and gradients against
``reference_attention`` in Pallas interpret mode on CPU
(tests/pallas_kernels/test_flash_attention.py), and lowering of the
forward and both backward kernels to Triton IR for an abstract H100 (no PTX compile).
NOT compiled or run on any GPU; NOT lowered or run on TPU (the ``[B, T, H, Dh]``
blocks squeeze H into the second-minor dim, which Mosaic TPU does not tile; the TPU
kernel is ``pallas_tpu.py``).
Default GPU block sizes, warps and stages are untuned guesses.
JAX 0.12 marks the Pallas Triton backend deprecated in favour of Mosaic GPU;
it still lowers in 0.11.2 and 0.12 (checked), but a port will be needed eventually.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.attention.common import (flash_vjp, kv_block_range, q_block_range, run_padded,
                                             split_seg_refs, visible)
from pallas_kernels.tiling import round_up, tile

Array = jax.Array
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static settings. ``t``/``s`` are the true lengths; blocks are powers of two."""
    t: int
    s: int
    causal: bool
    window: int | None
    scale: float
    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    interpret: bool = False
    num_warps: int | None = None
    num_stages: int | None = None


# --------------------------------------------------------------------------------------
# forward

def _fwd_kernel(*refs, cfg: FlashConfig, bq: int, bk: int, has_seg: bool):
    (q_ref, k_ref, v_ref), (qs_ref, ks_ref), (o_ref, lse_ref) = split_seg_refs(refs, 3, has_seg)
    i = pl.program_id(0)
    s_padded = k_ref.shape[0]
    q = q_ref[...]  # [bq, Dp]
    qpos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    qseg = qs_ref[...][:, None] if has_seg else None

    def body(j, carry):
        acc, m, l = carry  # [bq, Dp], [bq], [bq]
        kv = pl.ds(j * bk, bk)
        s = lax.dot_general(q, k_ref[kv, :], _NT, preferred_element_type=jnp.float32)
        s = s * cfg.scale  # [bq, bk]
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        ok = visible(qpos, kpos, cfg, s_padded, qseg, ks_ref[kv][None, :] if has_seg else None)
        if ok is not None:
            s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all masked so far: keep 0s
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        v = v_ref[kv, :]
        pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
        return alpha[:, None] * acc + pv, m_new, l

    lo, hi = kv_block_range(i * bq, bq, bk, -(-cfg.s // bk), cfg)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    seen = l > 0
    o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _params(cfg: FlashConfig, dp: int):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=cfg.num_warps or (4 if dp <= 64 else 8),
                                num_stages=cfg.num_stages or 2)


def _seg_args(qs, ks):
    return () if qs is None else (qs, ks)


def _forward(q, k, v, qs, ks, cfg: FlashConfig):
    """Padded inputs -> (o [B, Tp, H, Dp], lse [B, H, Tp] fp32)."""
    b, tp, h, dp = q.shape
    sp, kh = k.shape[1], k.shape[2]
    g = h // kh
    bq, bk = tile(cfg.t, cfg.block_q), tile(cfg.s, cfg.block_k)
    has_seg = qs is not None
    in_specs = [
        pl.BlockSpec((None, bq, None, dp), lambda i, b_, h_: (b_, i, h_, 0)),
        pl.BlockSpec((None, sp, None, dp), lambda i, b_, h_: (b_, 0, lax.div(h_, g), 0)),
        pl.BlockSpec((None, sp, None, dp), lambda i, b_, h_: (b_, 0, lax.div(h_, g), 0)),
    ]
    if has_seg:
        in_specs += [pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, i)),
                     pl.BlockSpec((None, sp), lambda i, b_, h_: (b_, 0))]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk, has_seg=has_seg),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, tp), jnp.float32)),
        grid=(tp // bq, b, h),
        in_specs=in_specs,
        out_specs=(pl.BlockSpec((None, bq, None, dp), lambda i, b_, h_: (b_, i, h_, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i))),
        interpret=cfg.interpret,
        compiler_params=_params(cfg, dp),
        name="archlab_flash_fwd",
    )(q, k, v, *_seg_args(qs, ks))


# --------------------------------------------------------------------------------------
# backward

def _probs(q, k, lse, qpos, kpos, cfg, s_padded, qseg, kseg):
    """Recomputed ``p = exp(s - lse)`` (0 where masked) and its scores, [bq, bk] fp32."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
    p = jnp.exp(s - lse[:, None])
    ok = visible(qpos, kpos, cfg, s_padded, qseg, kseg)
    return p if ok is None else jnp.where(ok, p, 0.0)


def _dq_kernel(*refs, cfg: FlashConfig, bq: int, bk: int, has_seg: bool):
    ins, (qs_ref, ks_ref), (dq_ref,) = split_seg_refs(refs, 6, has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    i = pl.program_id(0)
    s_padded = k_ref.shape[0]
    q, do = q_ref[...], do_ref[...]  # [bq, Dp]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq]
    qpos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    qseg = qs_ref[...][:, None] if has_seg else None

    def body(j, dq):
        kv = pl.ds(j * bk, bk)
        k, v = k_ref[kv, :], v_ref[kv, :]
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        p = _probs(q, k, lse, qpos, kpos, cfg, s_padded, qseg,
                   ks_ref[kv][None, :] if has_seg else None)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + lax.dot_general(ds.astype(k.dtype), k, _NN,
                                    preferred_element_type=jnp.float32)

    lo, hi = kv_block_range(i * bq, bq, bk, -(-cfg.s // bk), cfg)
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: FlashConfig, bq: int, bk: int, g: int, s_padded: int,
                has_seg: bool):
    ins, (qs_ref, ks_ref), (dk_ref, dv_ref) = split_seg_refs(refs, 6, has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins  # q, do: [Tp, G, Dp]
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]  # [bk, Dp]
    kpos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    kseg = ks_ref[...][None, :] if has_seg else None
    lo, hi = q_block_range(j * bk, bk, bq, -(-cfg.t // bq), cfg)

    def per_head(gi, carry):
        def per_block(i, carry):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q, do = q_ref[rows, gi, :], do_ref[rows, gi, :]  # [bq, Dp]
            lse, delta = lse_ref[gi, rows], delta_ref[gi, rows]  # [bq]
            qpos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
            p = _probs(q, k, lse, qpos, kpos, cfg, s_padded,
                       qs_ref[rows][:, None] if has_seg else None, kseg)
            dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN,
                                      preferred_element_type=jnp.float32)
            dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[:, None])
            dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN,
                                      preferred_element_type=jnp.float32)
            return dk, dv

        return lax.fori_loop(lo, hi, per_block, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, g, per_head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, qs, ks, o, lse, do, cfg: FlashConfig):
    b, tp, h, dp = q.shape
    sp, kh = k.shape[1], k.shape[2]
    g = h // kh
    bq, bk = tile(cfg.t, cfg.block_q_bwd), tile(cfg.s, cfg.block_k_bwd)
    has_seg = qs is not None
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    segs = _seg_args(qs, ks)

    # dQ: grid over query blocks of every query head.
    row = pl.BlockSpec((None, bq, None, dp), lambda i, b_, h_: (b_, i, h_, 0))
    kv_all = pl.BlockSpec((None, sp, None, dp), lambda i, b_, h_: (b_, 0, lax.div(h_, g), 0))
    stat = pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i))
    seg_specs = ([pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, i)),
                  pl.BlockSpec((None, sp), lambda i, b_, h_: (b_, 0))] if has_seg else [])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, bq=bq, bk=bk, has_seg=has_seg),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(tp // bq, b, h),
        in_specs=[row, kv_all, kv_all, row, stat, stat] + seg_specs,
        out_specs=row,
        interpret=cfg.interpret,
        compiler_params=_params(cfg, dp),
        name="archlab_flash_dq",
    )(q, k, v, do, lse, delta, *segs)

    # dK, dV: grid over key blocks of every kv head; loops over its G query heads.
    q_all = pl.BlockSpec((None, tp, g, dp), lambda j, b_, k_: (b_, 0, k_, 0))
    kv_blk = pl.BlockSpec((None, bk, None, dp), lambda j, b_, k_: (b_, j, k_, 0))
    stat_all = pl.BlockSpec((None, g, tp), lambda j, b_, k_: (b_, k_, 0))
    seg_specs = ([pl.BlockSpec((None, tp), lambda j, b_, k_: (b_, 0)),
                  pl.BlockSpec((None, bk), lambda j, b_, k_: (b_, j))] if has_seg else [])
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, bq=bq, bk=bk, g=g, s_padded=sp,
                          has_seg=has_seg),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(sp // bk, b, kh),
        in_specs=[q_all, kv_blk, kv_blk, q_all, stat_all, stat_all] + seg_specs,
        out_specs=(kv_blk, kv_blk),
        interpret=cfg.interpret,
        compiler_params=_params(cfg, dp),
        name="archlab_flash_dkv",
    )(q, k, v, do, lse, delta, *segs)
    return dq, dk, dv


_flash = flash_vjp(_forward, _backward)  # (q, k, v, q_seg, kv_seg, cfg) -> o


def flash_attention_pallas(q: Array, k: Array, v: Array, q_seg: Array | None = None,
                           kv_seg: Array | None = None, *, causal: bool = True,
                           window: int | None = None, scale: float | None = None,
                           block_q: int = 128, block_k: int = 64, block_q_bwd: int = 64,
                           block_k_bwd: int = 64, interpret: bool = False,
                           num_warps: int | None = None,
                           num_stages: int | None = None) -> Array:
    """Pallas flash attention (inputs validated by ``ops.flash_attention``).

    Args:
      q: [B, T, H, Dh]; k, v: [B, S, K, Dh] with H % K == 0, one dtype.
      q_seg, kv_seg: optional int32 segment ids [B, T] and [B, S] (both or neither).
      causal, window, scale: as in ``reference_attention``.
      block_q, block_k: forward tile sizes; block_q_bwd, block_k_bwd: backward tiles
        (powers of two >= 16; shrunk to the sequence when it is shorter).
      interpret: run in Pallas interpret mode (CPU).
      num_warps, num_stages: Triton launch settings (None: heuristics).

    Returns:
      [B, T, H, Dh] in q.dtype.
    """
    t, d, s = q.shape[1], q.shape[3], k.shape[1]
    dp = max(16, pl.next_power_of_2(d))
    cfg = FlashConfig(t=t, s=s, causal=causal, window=window,
                      scale=float(d ** -0.5 if scale is None else scale),
                      block_q=block_q, block_k=block_k, block_q_bwd=block_q_bwd,
                      block_k_bwd=block_k_bwd, interpret=interpret,
                      num_warps=num_warps, num_stages=num_stages)
    tq = max(tile(t, block_q), tile(t, block_q_bwd))
    tk = max(tile(s, block_k), tile(s, block_k_bwd))
    tp, sp = round_up(t, tq), round_up(s, tk)
    return run_padded(_flash, q, k, v, q_seg, kv_seg, cfg, tp=tp, sp=sp, dp=dp)
