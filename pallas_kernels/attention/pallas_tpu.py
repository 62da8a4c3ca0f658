"""FlashAttention-2 forward and backward for Pallas Mosaic TPU, tied by ``jax.custom_vjp``.

Computes exactly ``reference.reference_attention`` (q_offset 0, kv_len S, no ALiBi)
for q ``[B, T, H, Dh]`` and k/v ``[B, S, K, Dh]`` (Dao 2023, FlashAttention-2,
Alg. 1 forward, Alg. 2 backward), laid out for the TPU:

* Layout: q/k/v are transposed outside the kernels to heads-before-time
  (``[B, H, T, Dh]``, ``[B, K, S, Dh]``) so every block is ``[block, Dh]`` with the
  time axis on sublanes and Dh on lanes, which Mosaic's (8, 128) tiling accepts
  (Dh 64 equals the full dim; Dh 128 is one lane tile). Per-position vectors
  (segment ids, log-sum-exp, ``delta``) are stored as rows ``[..., 1, T]`` and turned
  into columns inside the kernel where needed. The transposes cost one extra HBM
  pass per tensor; the ``[B, T, H, Dh]`` blocks of the Triton kernel would put H
  on sublanes, which Mosaic does not tile.
* Forward, grid ``(B, H, T / bq, steps)``: the last (sequential) axis walks the key
  blocks of kv head ``h // G`` (GQA/MQA without repeating K/V in HBM) with an
  online softmax in VMEM scratch (running max ``m``, normalizer ``l`` stored
  lane-broadcast as ``[bq, 128]``, fp32 accumulator) and writes the output and
  ``lse = m + log l``.
* Backward: ``delta = rowsum(dO * O)`` (an XLA fusion), then a dQ kernel with the
  forward's grid, and a dK/dV kernel with grid ``(B, K, S / bk, G, steps)`` whose
  two sequential axes walk the G query heads of the kv head and their query
  blocks, accumulating dK and dV in VMEM (GQA gradients summed in the kernel). The
  dK/dV kernel works on transposed scores ``[bk, bq]`` so ``lse``, ``delta`` and the
  query segment ids are used as rows, with no relayout. Both recompute
  ``p = exp(s - lse)`` block by block.

Block skipping: causal/window structure is static, so for every query block the
range of key blocks it can see (and for every key block the range of query
blocks) is tabulated at trace time and passed by scalar prefetch. The sequential
grid axis is only as long as the widest range; the index maps clamp the step to
the block's last needed key (query) block, so steps past the range repeat the
previous block index (the pipeline issues no DMA for an unchanged block) and
``pl.when`` skips their compute. Blocks outside the band are never read.
Inside visited blocks the mask is applied element-wise. Segment ids only mask
element-wise (blocks are not skipped on segment boundaries).

Numerics: scores and softmax statistics are fp32; bf16 inputs feed the MXU in
bf16 with fp32 accumulation (``p`` and ``dS`` are cast to the input dtype for
their matmuls). Rows with no visible key get ``l = 0``: output 0 and
``lse = +inf`` so the backward ``p`` is 0 (no NaN).

Shapes: any T and S (zero-padded inside to the block; padded keys are masked by
the true S, padded query rows are sliced off). Head dims 64 and multiples of
128 are native; others are zero-padded to 64 (Dh < 64) or to a multiple of 128.
Blocks are multiples of 128 (the lane width: they are the last dim of the
``[1, T]`` rows); a block longer than the padded sequence shrinks to it.

Verified (jax 0.12.0.1): values and gradients against ``reference_attention`` in
TPU interpret mode on CPU (``pltpu.InterpretParams``; once with the race detector
and two emulated TensorCores), tests/pallas_kernels/test_attention_tpu.py; forward
and backward compile deviceless for TPU v5e and v5p with libtpu 0.0.50.1
(tests_aot/test_attention_tpu.py). NOT run on a TPU; block sizes untuned.

Modules: this one holds the forward kernel, the ``jax.custom_vjp`` and the public
``flash_attention_tpu`` (with its block fitting and head-dim padding);
``pallas_tpu_bwd.py`` the dQ and dK/dV kernels; ``pallas_tpu_common.py`` the config,
the block bands and the helpers both use; ``common.py`` the mask and VJP wiring
shared with the other attention kernels.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention.common import flash_vjp, visible
from pallas_kernels.attention.pallas_tpu_bwd import backward
from pallas_kernels.attention.pallas_tpu_common import (LANES, NN, NT, TpuFlashConfig, col,
                                                        compiler_params, kv_band, step_block)
from pallas_kernels.tiling import pad_to, round_up

Array = jax.Array

# Defaults (untuned: no TPU has run this kernel). 512 x 512 forward tiles feed the
# MXU (128x128 on v5e, 256x256 on v6e) and amortize the fixed cost of a grid step;
# their [bq, bk] fp32 temporaries are 1 MiB each. The backward keeps about twice as
# many [bq, bk] temporaries (s, p, dP, dS), so its tiles are 256 x 256. Mosaic's
# deviceless compile for v5e reserves 2.2 MiB of VMEM for the forward and under 1 MiB
# for each backward kernel at Dh 128, bf16 (BENCHMARKS.md).
DEFAULT_BLOCKS = dict(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=256)


def _fwd_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, *refs, cfg, bq, bk, s_padded,
                has_seg):
    if has_seg:
        qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < count_ref[i])
    def _step():
        kb = start_ref[i] + j
        q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [bq, Dp], [bk, Dp], [bk, Dp]
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * cfg.scale
        qpos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        kpos = kb * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        ok = visible(qpos, kpos, cfg, s_padded, *((col(qs_ref), ks_ref[...]) if has_seg else ()))
        if ok is not None:
            s = jnp.where(ok, s, -jnp.inf)
        m_prev, l_prev = m_sc[...][:, :1], l_sc[...][:, :1]  # [bq, 1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing visible yet: keep zeros
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe)
        l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(l_new, l_sc.shape)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l, m = l_sc[...], m_sc[...]  # [bq, 128]
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_sc[...] / l_safe[:, :1]).astype(o_ref.dtype)
        lse = jnp.where(seen, m + jnp.log(l_safe), jnp.inf)  # [bq, 128], lanes equal
        lse_ref[...] = lse.T[:1, :]  # [1, bq]


def _forward(q, k, v, qs, ks, cfg: TpuFlashConfig):
    """Kernel layout q [B, H, Tp, Dp], k/v [B, K, Sp, Dp] -> (o like q, lse [B, H, 1, Tp])."""
    b, h, tp, dp = q.shape
    kh, sp = k.shape[1], k.shape[2]
    g = h // kh
    bq, bk = cfg.block_q, cfg.block_k
    n_q, n_k = tp // bq, sp // bk
    start, count = kv_band(n_q, bq, n_k, bk, cfg)
    steps = max(int(count.max()), 1)
    has_seg = qs is not None

    def kv_map(b_, h_, i, j, st, ct):
        return b_, lax.div(h_, g), step_block(st, ct, i, j), 0

    in_specs = [pl.BlockSpec((None, None, bq, dp), lambda b_, h_, i, j, st, ct: (b_, h_, i, 0)),
                pl.BlockSpec((None, None, bk, dp), kv_map),
                pl.BlockSpec((None, None, bk, dp), kv_map)]
    if has_seg:
        in_specs += [pl.BlockSpec((None, 1, bq), lambda b_, h_, i, j, st, ct: (b_, 0, i)),
                     pl.BlockSpec((None, 1, bk), lambda b_, h_, i, j, st, ct:
                                  (b_, 0, step_block(st, ct, i, j)))]
    out_specs = [pl.BlockSpec((None, None, bq, dp), lambda b_, h_, i, j, st, ct: (b_, h_, i, 0)),
                 pl.BlockSpec((None, None, 1, bq), lambda b_, h_, i, j, st, ct: (b_, h_, 0, i))]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk, s_padded=sp, has_seg=has_seg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, h, n_q, steps), in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, dp), jnp.float32)]),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, 1, tp), jnp.float32)),
        compiler_params=compiler_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=cfg.interpret or False,
        name="archlab_flash_tpu_fwd",
    )(jnp.asarray(start), jnp.asarray(count), q, k, v, *(() if qs is None else (qs, ks)))


_flash = flash_vjp(_forward, backward)  # (q, k, v, q_seg, kv_seg, cfg) -> o


def check_block(name: str, value) -> int:
    """A block size must be a positive multiple of 128 (the TPU lane width)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < LANES or value % LANES:
        raise ValueError(f"flash_attention: {name}={value!r} must be a multiple of {LANES} "
                         "for impl='pallas_tpu'")
    return value


def fit_blocks(n: int, blocks: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """Padded length and effective blocks for a sequence of ``n`` and requested ``blocks``.

    The length is rounded up to the largest block that the sequence needs (a block
    longer than the sequence shrinks to ``n`` rounded up to 128); each block then
    becomes the largest multiple of 128 not above it that divides the padded length.
    """
    n128 = round_up(n, LANES)
    padded = round_up(n, min(max(blocks), n128))
    fitted = []
    for blk in blocks:
        blk = min(blk, padded)
        while padded % blk:
            blk -= LANES
        fitted.append(blk)
    return padded, tuple(fitted)


def head_dim_padded(d: int) -> int:
    """64 for Dh <= 64, else Dh rounded up to a multiple of 128."""
    return 64 if d <= 64 else round_up(d, LANES)


def flash_attention_tpu(q: Array, k: Array, v: Array, q_seg: Array | None = None,
                        kv_seg: Array | None = None, *, causal: bool = True,
                        window: int | None = None, scale: float | None = None,
                        block_q: int = DEFAULT_BLOCKS["block_q"],
                        block_k: int = DEFAULT_BLOCKS["block_k"],
                        block_q_bwd: int = DEFAULT_BLOCKS["block_q_bwd"],
                        block_k_bwd: int = DEFAULT_BLOCKS["block_k_bwd"],
                        interpret: Any = None) -> Array:
    """Mosaic TPU flash attention (inputs validated by ``ops.flash_attention``).

    Args:
      q: [B, T, H, Dh]; k, v: [B, S, K, Dh] with H % K == 0, one dtype.
      q_seg, kv_seg: optional int segment ids [B, T] and [B, S] (both or neither).
      causal, window, scale: as in ``reference_attention``.
      block_q, block_k: forward tiles; block_q_bwd, block_k_bwd: tiles of the dQ and
        dK/dV kernels. Multiples of 128; fitted to the padded sequence (``fit_blocks``).
      interpret: None to compile for TPU, or a ``pltpu.InterpretParams`` to run in
        TPU interpret mode (CPU).

    Returns:
      [B, T, H, Dh] in q.dtype.
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    for name, blk in (("block_q", block_q), ("block_k", block_k),
                      ("block_q_bwd", block_q_bwd), ("block_k_bwd", block_k_bwd)):
        check_block(name, blk)
    tp, (bq, bq_bwd) = fit_blocks(t, (block_q, block_q_bwd))
    sp, (bk, bk_bwd) = fit_blocks(s, (block_k, block_k_bwd))
    dp = head_dim_padded(d)
    cfg = TpuFlashConfig(t=t, s=s, causal=causal, window=window,
                         scale=float(d ** -0.5 if scale is None else scale),
                         block_q=bq, block_k=bk, block_q_bwd=bq_bwd, block_k_bwd=bk_bwd,
                         interpret=interpret)
    qt = pad_to(q.transpose(0, 2, 1, 3), (b, h, tp, dp))  # [B, H, Tp, Dp]
    kt = pad_to(k.transpose(0, 2, 1, 3), (b, kh, sp, dp))  # [B, K, Sp, Dp]
    vt = pad_to(v.transpose(0, 2, 1, 3), (b, kh, sp, dp))
    qs = ks = None
    if q_seg is not None:
        qs = pad_to(q_seg.astype(jnp.int32), (b, tp))[:, None, :]  # [B, 1, Tp]
        ks = pad_to(kv_seg.astype(jnp.int32), (b, sp))[:, None, :]  # [B, 1, Sp]
    out = _flash(qt, kt, vt, qs, ks, cfg)  # [B, H, Tp, Dp]
    return out[:, :, :t, :d].transpose(0, 2, 1, 3)
