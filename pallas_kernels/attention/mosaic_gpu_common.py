"""Shared pieces of the Mosaic GPU flash attention (``mosaic_gpu.py``, ``mosaic_gpu_bwd.py``).

Holds the static config ``MosaicFlashConfig``, the WGMMA register layouts and the
shared-memory swizzle every kernel uses, the compile/interpret parameters, and
the building blocks: ``iota`` (positions in the WGMMA layout), ``mm`` (one wgmma
into a fresh fp32 accumulator, returned as a value), ``produce`` (the memory
warpgroup's TMA loop over a ring of ``stages`` shared-memory slots) and
``stream_kv`` (that loop over K/V blocks, shared by the forward and dQ kernels). The algorithm
and what has been verified where are described in ``mosaic_gpu.py``.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
WG = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # [M] vector broadcast along columns of an [M, N] tile
COL = plgpu.Layout.WGMMA.reduce(0)  # [N] vector broadcast along rows
SWIZZLE = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


@dataclasses.dataclass(frozen=True)
class MosaicFlashConfig:
    """Static settings; ``t``/``s`` are the true lengths.

    ``block_q`` is the rows per compute warpgroup (wgmma M = 64), so a forward CTA
    covers ``compute_wgs * block_q`` queries; ``block_k`` is the streamed key block.
    The ``_bwd`` pair plays the same roles in dQ; in dK/dV ``block_k_bwd`` is the
    keys per compute warpgroup and ``block_q_bwd`` the streamed query block.
    """
    t: int
    s: int
    causal: bool
    window: int | None
    scale: float
    block_q: int = 64
    block_k: int = 128
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    stages: int = 2
    compute_wgs: int = 2
    interpret: bool | plgpu.InterpretGPUParams = False

    @property
    def q_tile(self) -> int:
        return self.compute_wgs * max(self.block_q, self.block_q_bwd)

    @property
    def k_tile(self) -> int:
        return max(self.block_k, self.compute_wgs * self.block_k_bwd)


def call_params(cfg: MosaicFlashConfig) -> dict:
    """``plgpu.kernel`` keywords: the interpreter's params, or compiler params (approx math)."""
    if cfg.interpret is True:
        return {"interpret": plgpu.InterpretGPUParams()}
    if cfg.interpret:
        return {"interpret": cfg.interpret}
    return {"compiler_params": plgpu.CompilerParams(approx_math=True)}


def iota(shape, dim: int, base):
    """``base`` + the index along ``dim`` of a ``shape`` tile in the WGMMA layout."""
    return base + plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WG)


def mm(a_ref, b_ref, shape):
    """``a @ b`` as one wgmma into a fresh fp32 accumulator, returned as a value."""
    def body(acc):
        plgpu.wgmma(acc, a_ref, b_ref)
        return acc[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def produce(lo, hi, stages: int, issue, consumed):
    """Memory-warpgroup loop: TMA step ``j`` into slot ``(j - lo) % stages`` once freed."""
    @pl.loop(lo, hi)
    def _(j):
        slot = lax.rem(j - lo, jnp.int32(stages))

        @pl.when(j - lo >= stages)
        def _():
            plgpu.barrier_wait(consumed.at[slot])

        issue(j, slot)


def stream_kv(k_ref, v_ref, ks_ref, k_s, v_s, kseg_s, loaded, consumed, *, b, kvh, bk: int,
              lo, hi, stages: int):
    """Memory warpgroup of the forward and dQ kernels: TMA copies of the K/V blocks
    ``[lo, hi)`` of batch ``b``, kv head ``kvh`` (and their key segment ids when
    ``ks_ref`` is not None) into the ring slots, each slot's copies signalling
    ``loaded`` and waiting for ``consumed`` before reuse (``produce``)."""
    def issue(j, slot):
        rows = pl.ds(j * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], k_s.at[slot], loaded.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], v_s.at[slot], loaded.at[slot])
        if ks_ref is not None:
            plgpu.copy_gmem_to_smem(ks_ref.at[b, rows], kseg_s.at[slot], loaded.at[slot])

    produce(lo, hi, stages, issue, consumed)
