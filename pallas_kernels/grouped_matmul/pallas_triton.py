"""Grouped matmul as Pallas Triton kernels (impl "pallas_triton"): ``gmm`` and ``tgmm``.

Semantics (rows sorted by group, ``group_offset``, zero rows) are those of
``reference.gmm_reference``; see ``reference.py``.

Kernels (written for the Pallas Triton GPU backend: no scalar prefetch, grouping
read from small int32 arrays inside the kernel):

* ``gmm``  grid ``(M / bm, N / bn)``: program ``(i, j)`` owns output tile
  ``out[i*bm:(i+1)*bm, j*bn:(j+1)*bn]`` and loops over the local groups that
  overlap row tile ``i`` (``reference.tile_group_range``); for each it forms
  ``lhs_tile @ rhs[g]`` over K in ``bk`` steps (fp32 accumulation) and keeps the
  rows of group ``g`` (a select, so rows no group owns stay exactly 0). A tile
  that straddles ``c`` groups does ``c`` tile products, so the total work is
  at most ``(M / bm + G - 1)`` tile-rows of ``K x N``: useful work plus one
  extra tile per group boundary, never ``G x`` as in a dense formulation.
  Every program owns its output tile: no atomics, no races.
* ``tgmm`` (for ``d rhs``) grid ``(G, K / bk, N / bn)``: program ``(g, a, b)``
  loops over the row tiles of group ``g`` and accumulates
  ``lhs_tile^T @ dout_tile`` with rows outside the group masked to zero. An empty
  group writes zeros.
* ``d lhs = gmm(dout, rhs^T)`` reuses the forward kernel with the weight tile
  read transposed (``rhs`` is never transposed in memory).

M, K and N are zero-padded to the block sizes (a copy only when they are not
multiples); padded rows belong to no group.

Verified (jax 0.12.0.1 and 0.11.2): values and gradients against ``gmm_reference``
in Pallas interpret mode on CPU (tests/pallas_kernels/test_gmm.py), and lowering of
forward and backward to Triton IR for an abstract H100 (no PTX compile). NOT
compiled or run on any GPU. Not for TPU: ``pallas_tpu.py`` is the TPU kernel (group
metadata by scalar prefetch). Default GPU block sizes are untuned guesses.
JAX 0.12 marks the Pallas Triton backend deprecated in favour of Mosaic GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.grouped_matmul.reference import (grouped_vjp, local_bounds,
                                                     tile_group_range)
from pallas_kernels.tiling import pad_to, round_up, tile

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GmmConfig:
    """Static kernel settings: tiles (powers of two, >= 16 for Triton dots) and backend flags."""
    block_m: int = 128
    block_k: int = 64
    block_n: int = 128
    interpret: bool = False
    num_warps: int | None = None
    num_stages: int | None = None



def _compiler_params(cfg: GmmConfig):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=cfg.num_warps or 4, num_stages=cfg.num_stages or 3)


def _full(shape):
    """BlockSpec covering a whole array (read with dynamic indices inside the kernel)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


# --------------------------------------------------------------------------------------
# gmm: out[M, N] = lhs[M, K] @ rhs[g(m)]   (rhs [G, K, N], or [G, N, K] when transposed)

def _gmm_kernel(lo_ref, hi_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *,
                bm: int, bk: int, nk: int, transpose_rhs: bool):
    i = pl.program_id(0)
    bn = out_ref.shape[-1]
    rows = i * bm + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)  # [bm, bn]
    # contract lhs dim 1 with rhs dim 1 ([bn, bk] tile) or dim 0 ([bk, bn] tile)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def per_group(g, acc):
        def per_k(kk, part):
            x = lhs_ref[:, pl.ds(kk * bk, bk)]  # [bm, bk]
            if transpose_rhs:
                w = rhs_ref[g, :, pl.ds(kk * bk, bk)]  # [bn, bk]
            else:
                w = rhs_ref[g, pl.ds(kk * bk, bk), :]  # [bk, bn]
            return part + lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

        part = lax.fori_loop(0, nk, per_k, jnp.zeros((bm, bn), jnp.float32))
        mine = (rows >= starts_ref[g]) & (rows < ends_ref[g])
        return acc + jnp.where(mine, part, 0.0)

    acc = lax.fori_loop(lo_ref[i], hi_ref[i], per_group, jnp.zeros((bm, bn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _gmm_call(lhs: Array, rhs: Array, starts: Array, ends: Array, cfg: GmmConfig,
              transpose_rhs: bool = False) -> Array:
    """``[M, K] x [G, K, N] -> [M, N]`` (or ``rhs [G, N, K]`` read transposed)."""
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    bm, bk, bn = tile(m, cfg.block_m), tile(k, cfg.block_k), tile(n, cfg.block_n)
    mp, kp, np_ = round_up(m, bm), round_up(k, bk), round_up(n, bn)
    lhs = pad_to(lhs, (mp, kp))
    if transpose_rhs:
        rhs = pad_to(rhs, (g, np_, kp))
        rhs_spec = pl.BlockSpec((g, bn, kp), lambda i, j: (0, j, 0))
    else:
        rhs = pad_to(rhs, (g, kp, np_))
        rhs_spec = pl.BlockSpec((g, kp, bn), lambda i, j: (0, 0, j))
    tiles_m = mp // bm
    lo, hi = tile_group_range(starts, ends, bm, tiles_m)
    kernel = functools.partial(_gmm_kernel, bm=bm, bk=bk, nk=kp // bk,
                               transpose_rhs=transpose_rhs)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), lhs.dtype),
        grid=(tiles_m, np_ // bn),
        in_specs=[_full((tiles_m,)), _full((tiles_m,)), _full((g,)), _full((g,)),
                  pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), rhs_spec],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name="archlab_gmm",
    )(lo, hi, starts, ends, lhs, rhs)
    return out[:m, :n]


# --------------------------------------------------------------------------------------
# tgmm: out[g] = lhs[rows of g]^T @ dout[rows of g]   ->  [G, K, N]

def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, dy_ref, out_ref, *, bm: int):
    g = pl.program_id(0)
    r0, r1 = starts_ref[g], ends_ref[g]
    bk, bn = lhs_ref.shape[1], dy_ref.shape[1]
    first = lax.div(r0, jnp.int32(bm))
    last = jnp.where(r1 > r0, lax.div(r1 + (bm - 1), jnp.int32(bm)), first)  # exclusive

    def body(t, acc):
        rows = t * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)  # [bm, 1]
        mine = (rows >= r0) & (rows < r1)
        x = jnp.where(mine, lhs_ref[pl.ds(t * bm, bm), :], 0)  # [bm, bk]
        y = jnp.where(mine, dy_ref[pl.ds(t * bm, bm), :], 0)  # [bm, bn]
        return acc + lax.dot_general(x, y, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(first, last, body, jnp.zeros((bk, bn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _tgmm_call(lhs: Array, dy: Array, starts: Array, ends: Array, cfg: GmmConfig,
               out_dtype) -> Array:
    """``[M, K]^T x [M, N]`` per group ``-> [G, K, N]``."""
    m, k = lhs.shape
    n = dy.shape[1]
    g = starts.shape[0]
    bm, bk, bn = tile(m, cfg.block_m), tile(k, cfg.block_k), tile(n, cfg.block_n)
    mp, kp, np_ = round_up(m, bm), round_up(k, bk), round_up(n, bn)
    lhs, dy = pad_to(lhs, (mp, kp)), pad_to(dy, (mp, np_))
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, bm=bm),
        out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
        grid=(g, kp // bk, np_ // bn),
        in_specs=[_full((g,)), _full((g,)),
                  pl.BlockSpec((mp, bk), lambda e, a, b: (0, a)),
                  pl.BlockSpec((mp, bn), lambda e, a, b: (0, b))],
        out_specs=pl.BlockSpec((None, bk, bn), lambda e, a, b: (e, a, b)),
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name="archlab_tgmm",
    )(starts, ends, lhs, dy)
    return out[:, :k, :n]


# --------------------------------------------------------------------------------------
# custom_vjp: d lhs = gmm(d out, rhs^T), d rhs = tgmm(lhs, d out)

_gmm = grouped_vjp(_gmm_call, _tgmm_call)  # (lhs, rhs, group_sizes, group_offset, cfg)


def gmm_pallas(lhs: Array, rhs: Array, group_sizes: Array, *,
               group_offset: Array | int | None = None, cfg: GmmConfig = GmmConfig()) -> Array:
    """Pallas grouped matmul ``[M, K] x [G, K, N] -> [M, N]`` (inputs validated by ``ops.gmm``).

    lhs and rhs must share a dtype; the output has that dtype, accumulation is fp32.
    """
    if lhs.shape[0] == 0:
        return jnp.zeros((0, rhs.shape[2]), lhs.dtype)
    return _gmm(lhs, rhs, group_sizes, group_offset, cfg)


def tgmm_pallas(lhs: Array, dout: Array, group_sizes: Array, num_groups: int, *,
                group_offset: Array | int | None = None,
                cfg: GmmConfig = GmmConfig()) -> Array:
    """Transposed grouped matmul: ``out[g] = lhs[rows_g]^T @ dout[rows_g]``, ``[G, K, N]``."""
    starts, ends = local_bounds(group_sizes, num_groups, lhs.shape[0], group_offset)
    return _tgmm_call(lhs, dout, starts, ends, cfg, lhs.dtype)
