"""Grouped matmul for Mosaic TPU: ``gmm`` and ``tgmm`` with group metadata by scalar prefetch.

Semantics (rows sorted by group, ``group_offset``, zero rows) are those of
``reference.gmm_reference``. The algorithm is the grouped matmul of MegaBlocks
(Gale et al. 2023, "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts")
as laid out for TPU grids: a 1-D list of *visits* ``(row tile, group)`` replaces
the ``G x M`` dense product.

Group metadata. The rows are cut into tiles of ``bm``. A visit is one (row tile,
group) pair whose rows overlap; a tile shared by two groups is visited twice, once
per group, and each visit keeps only its group's rows (a select on the fp32
product, so rows of other groups and padding contribute exactly 0). The visit
list is computed once per call with a handful of ``[G]``-sized array ops
(``_gmm_visits`` / ``_tgmm_visits``) and handed to the kernel by scalar prefetch
(SMEM), where the BlockSpec index maps read it to choose which ``lhs``/``rhs``
tiles to DMA. Its length is static: at most ``tiles_m + G + 1`` visits for
``gmm`` and ``tiles_m + G`` for ``tgmm``; unused tail entries repeat the last
visit with every flag off and the same block indices, so they cost no DMA and
no compute.

* ``gmm`` grid ``(N / bn, visits, K / bk)``: visits to one row tile are
  consecutive, so the ``[bm, bn]`` fp32 VMEM accumulator is zeroed on the tile's
  first visit and stored on its last. Rows owned by no local group (before
  the shard's first group, after its last, beyond ``sum(group_sizes)``, padding)
  form two pseudo-groups whose visits only write zeros: no matmul, and their
  index maps repeat the neighbouring block so nothing is fetched. Empty groups
  get no visit. ``d lhs = gmm(d out, rhs^T)`` is the same kernel with the weight
  tile read as ``[bn, bk]`` from ``rhs [G, K, N]`` (no transpose in HBM).
* ``tgmm`` grid ``(K / bk, N / bn, visits)``: visits are group-major; the
  ``[bk, bn]`` fp32 accumulator gathers ``lhs_tile^T @ dout_tile`` (both masked
  to the group's rows) over the group's row tiles; an empty group gets one visit
  that writes zeros.

Tiles follow the TPU tiling rule (last two block dims multiples of (8, 128), or
the full dim): ``bm`` is a multiple of 8 (16 for 16-bit dtypes), ``bk``/``bn``
multiples of 128, or the whole K / N when that is not larger than the block.
M (and K, N when split) are zero-padded to the tiles, a copy only when they are
not multiples. Accumulation is fp32 for fp32 and bf16 inputs.

Default blocks ``(bm, bk, bn) = (256, 512, 1024)`` (untuned: no TPU has run this):
``rhs`` is re-read once per row tile, so its arithmetic intensity is ``bm``
FLOP/byte (bf16) and ``lhs``'s is ``bn``; 256 rows keep the per-group boundary
waste at one tile while doubling the intensity of 128-row tiles, and multiples of
256 suit the 256-wide MXU of v6e as well as the 128-wide one of v5e. VMEM per step
in bf16, double-buffered blocks plus the fp32 accumulator: gmm 2 x (256 + 1024 +
512) KiB + 1 MiB = 4.5 MiB; tgmm 2 x (256 + 512 + 1024) KiB + 2 MiB = 5.5 MiB.
Mosaic's own figure (the smallest ``vmem_limit_bytes`` that compiles for v5e,
M=16384, K=4096, N=1024, E=64): gmm and its transposed form 4864 KiB, tgmm 5952
KiB, inside v5e's 16 MiB default scoped VMEM.

Verified: values and gradients against ``gmm_reference`` in TPU interpret mode
on CPU (``pltpu.InterpretParams``; one case under its race detector with two
cores; tests/pallas_kernels/test_gmm_tpu.py), and deviceless compiles of the
forward and backward for TPU v5e and v5p (tests_aot/test_gmm_tpu.py). Not run on
a TPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul.reference import grouped_vjp, local_bounds
from pallas_kernels.tiling import pad_to, round_up

Array = jax.Array

_COMPUTE, _FIRST, _LAST = 1, 2, 4  # visit flag bits


@dataclasses.dataclass(frozen=True)
class TpuGmmConfig:
    """Static settings: tiles and interpret mode.

    ``interpret``: None/False compiles for TPU; a ``pltpu.InterpretParams`` (or
    True for the default params) runs the TPU interpreter on CPU.
    ``vmem_limit_bytes``: Mosaic's scoped VMEM limit (None: the chip's default).
    """
    block_m: int = 256
    block_k: int = 512
    block_n: int = 1024
    interpret: Any = None
    vmem_limit_bytes: int | None = None


def sublane(dtype) -> int:
    """Second-minor tile multiple of a dtype on TPU: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def check_blocks(block_m: int, block_k: int, block_n: int, dtype, who: str = "gmm") -> None:
    """ValueError unless the tiles satisfy the TPU tiling rule for ``dtype``."""
    sub = sublane(dtype)
    if not isinstance(block_m, int) or block_m < sub or block_m % sub:
        raise ValueError(f"{who}: block_m={block_m!r} must be a positive multiple of {sub} "
                         f"for {jnp.dtype(dtype).name} on TPU")
    for name, b in (("block_k", block_k), ("block_n", block_n)):
        if not isinstance(b, int) or b < 128 or b % 128:
            raise ValueError(f"{who}: {name}={b!r} must be a positive multiple of 128 on TPU")


def _lane_tile(size: int, block: int) -> tuple[int, int]:
    """(tile, padded size) of a lane-mapped dim: the whole dim if it fits in one block."""
    if size <= block:
        return size, size
    return block, round_up(size, block)



def _interpret_arg(interpret):
    if interpret is None or interpret is False:
        return False
    return pltpu.InterpretParams() if interpret is True else interpret


# --------------------------------------------------------------------------------------
# group metadata (computed once per call, read by index maps and kernels from SMEM)

def _expand(counts: Array, num_visits: int):
    """Visit ``w`` -> (item, index within item, real) for items with ``counts`` visits each."""
    incl = jnp.cumsum(counts)
    total = incl[-1]
    w = jnp.minimum(jnp.arange(num_visits, dtype=jnp.int32), jnp.maximum(total - 1, 0))
    item = jnp.searchsorted(incl, w, side="right").astype(jnp.int32)
    item = jnp.minimum(item, counts.shape[0] - 1)
    within = w - (incl - counts)[item]
    real = jnp.arange(num_visits, dtype=jnp.int32) < total
    return item, within, real


def _edge_flags(tile: Array, real: Array) -> tuple[Array, Array]:
    """First/last visit of each run of equal ``tile`` values among the real visits."""
    prev = jnp.concatenate([jnp.full((1,), -1, jnp.int32), tile[:-1]])
    nxt_real = jnp.concatenate([real[1:], jnp.zeros((1,), bool)])
    nxt = jnp.concatenate([tile[1:], jnp.full((1,), -1, jnp.int32)])
    first = real & (tile != prev)
    last = real & ((tile != nxt) | ~nxt_real)
    return first, last


def _gmm_visits(starts: Array, ends: Array, bm: int, tiles_m: int, nk: int):
    """Visit list of the ``gmm`` kernel (see the module docstring), int32 ``[W]`` arrays.

    Returns (out_tile, in_tile, group, k_fixed, row_lo, row_hi, flags).
    """
    g = starts.shape[0]
    mp = tiles_m * bm
    # extended groups: rows before the local ones, the G local groups, rows after
    ext_lo = jnp.concatenate([jnp.zeros((1,), jnp.int32), starts, ends[-1:]])
    ext_hi = jnp.concatenate([starts[:1], ends, jnp.full((1,), mp, jnp.int32)])
    nonempty = ext_hi > ext_lo
    f = ext_lo // bm
    counts = jnp.where(nonempty, (jnp.maximum(ext_hi, 1) - 1) // bm - f + 1, 0)
    num_visits = tiles_m + g + 1
    e, within, real = _expand(counts.astype(jnp.int32), num_visits)
    out_tile = jnp.minimum(f[e] + within, tiles_m - 1).astype(jnp.int32)
    local = (e >= 1) & (e <= g)
    compute = real & local
    first, last = _edge_flags(out_tile, real)
    group = jnp.clip(e - 1, 0, g - 1).astype(jnp.int32)
    # visits that only write zeros repeat a neighbouring block: the first local
    # row's tile at k=0 before the local rows, the last one's at k=nk-1 after
    first_tile = jnp.minimum(starts[0] // bm, tiles_m - 1)
    last_tile = jnp.minimum(jnp.maximum(ends[-1] - 1, 0) // bm, tiles_m - 1)
    before = e == 0
    in_tile = jnp.where(local, out_tile, jnp.where(before, first_tile, last_tile))
    k_fixed = jnp.where(local & real, -1, jnp.where(before, 0, nk - 1))
    flags = (compute * _COMPUTE + first * _FIRST + last * _LAST).astype(jnp.int32)
    return (out_tile, in_tile.astype(jnp.int32), group, k_fixed.astype(jnp.int32),
            ext_lo[e], ext_hi[e], flags)


def _tgmm_visits(starts: Array, ends: Array, bm: int, tiles_m: int):
    """Visit list of the ``tgmm`` kernel: (tile, group, row_lo, row_hi, flags), int32 ``[W]``."""
    g = starts.shape[0]
    nonempty = ends > starts
    f = starts // bm
    counts = jnp.where(nonempty, (jnp.maximum(ends, 1) - 1) // bm - f + 1, 1)
    e, within, real = _expand(counts.astype(jnp.int32), tiles_m + g)
    # an empty group's single visit reuses the tile before it (no new DMA)
    empty_tile = jnp.maximum(starts - 1, 0) // bm
    tile = jnp.where(nonempty[e], f[e] + within, empty_tile[e])
    tile = jnp.clip(tile, 0, tiles_m - 1).astype(jnp.int32)
    first, last = _edge_flags(e, real)
    compute = real & nonempty[e]
    flags = (compute * _COMPUTE + first * _FIRST + last * _LAST).astype(jnp.int32)
    return tile, e, starts[e], ends[e], flags


# --------------------------------------------------------------------------------------
# gmm: out[M, N] = lhs[M, K] @ rhs[g(m)]   (rhs [G, K, N], or read as [G, N, K]^T)

def _gmm_kernel(out_tile_ref, in_tile_ref, group_ref, kfix_ref, lo_ref, hi_ref, flags_ref,
                lhs_ref, rhs_ref, out_ref, acc_ref, *, nk: int, transpose_rhs: bool):
    del in_tile_ref, group_ref, kfix_ref  # used by the index maps only
    w, kk = pl.program_id(1), pl.program_id(2)
    flags = flags_ref[w]
    bm = acc_ref.shape[0]

    @pl.when(((flags & _FIRST) != 0) & (kk == 0))
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((flags & _COMPUTE) != 0)
    def _accumulate():
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        part = lax.dot_general(lhs_ref[...], rhs_ref[...], dims,
                               preferred_element_type=jnp.float32)
        rows = out_tile_ref[w] * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
        mine = (rows >= lo_ref[w]) & (rows < hi_ref[w])
        acc_ref[...] += jnp.where(mine, part, 0.0)

    @pl.when(((flags & _LAST) != 0) & (kk == nk - 1))
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def gmm_call(lhs: Array, rhs: Array, starts: Array, ends: Array, cfg: TpuGmmConfig,
             transpose_rhs: bool = False) -> Array:
    """``[M, K] x [G, K, N] -> [M, N]``; with ``transpose_rhs``, ``rhs [G, N, K]`` read transposed.

    ``starts``/``ends``: ``[G]`` int32 local group row ranges (``reference.local_bounds``).
    """
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    bm = min(cfg.block_m, round_up(m, sublane(lhs.dtype)))
    bk, kp = _lane_tile(k, cfg.block_k)
    bn, np_ = _lane_tile(n, cfg.block_n)
    mp = round_up(m, bm)
    tiles_m, nk = mp // bm, kp // bk
    lhs = pad_to(lhs, (mp, kp))
    if transpose_rhs:
        rhs = pad_to(rhs, (g, np_, kp))
        rhs_block = (None, bn, bk)
        rhs_idx = lambda gi, kb, j: (gi, j, kb)
    else:
        rhs = pad_to(rhs, (g, kp, np_))
        rhs_block = (None, bk, bn)
        rhs_idx = lambda gi, kb, j: (gi, kb, j)
    meta = _gmm_visits(starts, ends, bm, tiles_m, nk)
    num_visits = meta[0].shape[0]

    def k_block(kk, kfix_ref, w):
        return jnp.where(kfix_ref[w] < 0, kk, kfix_ref[w])

    def lhs_map(j, w, kk, out_t, in_t, grp, kfix, lo, hi, fl):
        return in_t[w], k_block(kk, kfix, w)

    def rhs_map(j, w, kk, out_t, in_t, grp, kfix, lo, hi, fl):
        return rhs_idx(grp[w], k_block(kk, kfix, w), j)

    def out_map(j, w, kk, out_t, in_t, grp, kfix, lo, hi, fl):
        return out_t[w], j

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(meta),
        grid=(np_ // bn, num_visits, nk),
        in_specs=[pl.BlockSpec((bm, bk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
        out_specs=pl.BlockSpec((bm, bn), out_map),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
    )
    itemsize = jnp.dtype(lhs.dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * (mp + g * bm) * kp * np_,
        transcendentals=0,
        bytes_accessed=itemsize * (mp * kp * (np_ // bn) + g * kp * np_ + mp * np_))
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, nk=nk, transpose_rhs=transpose_rhs),
        out_shape=jax.ShapeDtypeStruct((mp, np_), lhs.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=cfg.vmem_limit_bytes),
        interpret=_interpret_arg(cfg.interpret),
        cost_estimate=cost,
        name="archlab_gmm_tpu",
    )(*meta, lhs, rhs)
    return out[:m, :n]


# --------------------------------------------------------------------------------------
# tgmm: out[g] = lhs[rows of g]^T @ dout[rows of g]   ->  [G, K, N]

def _tgmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, flags_ref, lhs_ref, dy_ref, out_ref,
                 acc_ref):
    del group_ref  # used by the index maps only
    w = pl.program_id(2)
    flags = flags_ref[w]
    bm = lhs_ref.shape[0]

    @pl.when((flags & _FIRST) != 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((flags & _COMPUTE) != 0)
    def _accumulate():
        rows = tile_ref[w] * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
        mine = (rows >= lo_ref[w]) & (rows < hi_ref[w])
        x = jnp.where(mine, lhs_ref[...], jnp.zeros((), lhs_ref.dtype))
        y = jnp.where(mine, dy_ref[...], jnp.zeros((), dy_ref.dtype))
        acc_ref[...] += lax.dot_general(x, y, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    @pl.when((flags & _LAST) != 0)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm_call(lhs: Array, dy: Array, starts: Array, ends: Array, cfg: TpuGmmConfig,
              out_dtype) -> Array:
    """``lhs [M, K]``, ``dy [M, N]`` -> ``[G, K, N]``, ``out[g] = lhs[rows_g]^T @ dy[rows_g]``."""
    m, k = lhs.shape
    n = dy.shape[1]
    g = starts.shape[0]
    bm = min(cfg.block_m, round_up(m, max(sublane(lhs.dtype), sublane(dy.dtype))))
    bk, kp = _lane_tile(k, cfg.block_k)
    bn, np_ = _lane_tile(n, cfg.block_n)
    mp = round_up(m, bm)
    tiles_m = mp // bm
    lhs, dy = pad_to(lhs, (mp, kp)), pad_to(dy, (mp, np_))
    meta = _tgmm_visits(starts, ends, bm, tiles_m)
    num_visits = meta[0].shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(meta),
        grid=(kp // bk, np_ // bn, num_visits),
        in_specs=[pl.BlockSpec((bm, bk), lambda a, b, w, t, e, lo, hi, fl: (t[w], a)),
                  pl.BlockSpec((bm, bn), lambda a, b, w, t, e, lo, hi, fl: (t[w], b))],
        out_specs=pl.BlockSpec((None, bk, bn), lambda a, b, w, t, e, lo, hi, fl: (e[w], a, b)),
        scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
    )
    itemsize = jnp.dtype(lhs.dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * (mp + g * bm) * kp * np_,
        transcendentals=0,
        bytes_accessed=itemsize * (mp * kp * (np_ // bn) + mp * np_ * (kp // bk) + g * kp * np_))
    out = pl.pallas_call(
        _tgmm_kernel,
        out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=cfg.vmem_limit_bytes),
        interpret=_interpret_arg(cfg.interpret),
        cost_estimate=cost,
        name="archlab_tgmm_tpu",
    )(*meta, lhs, dy)
    return out[:, :k, :n]


# --------------------------------------------------------------------------------------
# custom_vjp: d lhs = gmm(d out, rhs^T), d rhs = tgmm(lhs, d out)

_gmm = grouped_vjp(gmm_call, tgmm_call)  # (lhs, rhs, group_sizes, group_offset, cfg)


def gmm_tpu(lhs: Array, rhs: Array, group_sizes: Array, *,
            group_offset: Array | int | None = None,
            cfg: TpuGmmConfig = TpuGmmConfig()) -> Array:
    """Mosaic TPU grouped matmul ``[M, K] x [G, K, N] -> [M, N]`` (validated by ``ops.gmm``).

    lhs and rhs share a dtype; the output has that dtype, accumulation is fp32.
    Differentiable in lhs and rhs through ``gmm``/``tgmm`` kernels.
    """
    if lhs.shape[0] == 0:
        return jnp.zeros((0, rhs.shape[2]), lhs.dtype)
    return _gmm(lhs, rhs, group_sizes, group_offset, cfg)


def tgmm_tpu(lhs: Array, dout: Array, group_sizes: Array, num_groups: int, *,
             group_offset: Array | int | None = None,
             cfg: TpuGmmConfig = TpuGmmConfig()) -> Array:
    """Transposed grouped matmul ``out[g] = lhs[rows_g]^T @ dout[rows_g]``, ``[G, K, N]``."""
    if lhs.shape[0] == 0:
        return jnp.zeros((num_groups, lhs.shape[1], dout.shape[1]), lhs.dtype)
    starts, ends = local_bounds(group_sizes, num_groups, lhs.shape[0], group_offset)
    return tgmm_call(lhs, dout, starts, ends, cfg, lhs.dtype)
