"""Grouped matmul (MoE dispatch), the fp32 oracle, and what every implementation shares.

Shared by the XLA path (``xla.py``) and the kernels (``pallas_triton.py``,
``pallas_tpu.py``): the group bookkeeping (``local_bounds``, ``tile_group_range``,
``group_tiles``, ``tile_rows``) and the custom-VJP wiring (``grouped_vjp``).

``gmm(lhs [M, K], rhs [G, K, N], group_sizes [G_all])`` multiplies each run of
rows of ``lhs`` by its group's weight matrix. Rows are sorted by group: global
group ``e`` owns rows ``[ends[e] - group_sizes[e], ends[e])`` with
``ends = cumsum(group_sizes)``.

Group offset (expert parallelism). ``rhs`` holds ``G`` *local* groups, the global
groups ``[group_offset, group_offset + G)``. ``group_sizes`` lists every global
group (``G_all >= G`` entries; ``G_all == G`` when ``group_offset`` is None, which
means offset 0). Then, for every row ``m``::

    out[m] = lhs[m] @ rhs[e(m) - group_offset]   if group_offset <= e(m) < group_offset + G
    out[m] = 0                                   otherwise (other shards' rows, or
                                                 m >= sum(group_sizes))

so an expert-parallel shard that sees all rows computes only its own experts
(its rows elsewhere are zero and a ``psum`` over shards assembles the result).
``group_offset`` may be a traced int32 scalar (e.g. ``axis_index * G``).
If ``sum(group_sizes) > M`` the trailing groups are clipped at row ``M``.
Group sizes must be non-negative (not checked: they are usually traced).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def local_bounds(group_sizes: Array, num_local: int, m: int,
                 group_offset: Array | int | None = None) -> tuple[Array, Array]:
    """Row range ``[starts[g], ends[g])`` of each local group, clipped to ``[0, m]``.

    Returns two int32 ``[G]`` arrays (G = ``num_local``); empty groups have ``starts == ends``.
    """
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    if group_offset is not None:  # needs group_offset + G <= G_all (dynamic_slice clamps)
        off = jnp.asarray(group_offset, jnp.int32)
        starts = jax.lax.dynamic_slice_in_dim(starts, off, num_local)
        ends = jax.lax.dynamic_slice_in_dim(ends, off, num_local)
    return jnp.minimum(starts, m), jnp.minimum(ends, m)


def tile_group_range(starts: Array, ends: Array, block_m: int, tiles_m: int) -> tuple[Array, Array]:
    """Local groups overlapping each row tile: ``[lo[i], hi[i])``, two int32 ``[tiles_m]``.

    Tile ``i`` covers rows ``[i * block_m, (i + 1) * block_m)``. A group counts when
    ``ends > tile_start`` and ``starts < tile_end``; an empty group strictly inside a
    tile is counted (it costs one masked tile product), so
    ``sum(hi - lo) <= tiles_m + G - 1``.
    """
    t0 = jnp.arange(tiles_m, dtype=jnp.int32) * block_m
    lo = jnp.searchsorted(ends, t0, side="right").astype(jnp.int32)
    hi = jnp.searchsorted(starts, t0 + block_m, side="left").astype(jnp.int32)
    return lo, jnp.maximum(hi, lo)


def group_tiles(starts: Array, ends: Array, block_m: int, max_rows: int):
    """Row tiles that each belong to ONE group: ``(group [n], first_row [n], count)``.

    Group ``g``'s rows ``[starts[g], ends[g])`` are cut into ``ceil(size / block_m)``
    tiles starting at ``starts[g]`` (the last one may be partial); the tiles are listed
    group by group, and the first ``count`` (traced) of the static ``n`` entries are in
    use. ``n`` bounds the total for any sizes summing to at most ``max_rows``:
    ``sum_g ceil(size_g / block_m) <= (max_rows + G (block_m - 1)) / block_m``.
    """
    g_local = starts.shape[0]
    n_tiles = (ends - starts + block_m - 1) // block_m                  # [G]
    incl = jnp.cumsum(n_tiles)
    n = max(1, (max_rows + g_local * (block_m - 1)) // block_m)
    i = jnp.arange(n, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(incl, i, side="right"), g_local - 1).astype(jnp.int32)
    first = starts[group] + (i - (incl[group] - n_tiles[group])) * block_m
    return group, first, incl[-1]


def tile_rows(x: Array, first: Array, block_m: int) -> tuple[Array, Array]:
    """``block_m`` rows of ``x`` from row ``first``, moved back to fit inside ``x``
    (``block_m <= len(x)``): the slice and the row index of each of its rows ``[block_m]``."""
    start = jnp.clip(first, 0, x.shape[0] - block_m)
    return (jax.lax.dynamic_slice_in_dim(x, start, block_m),
            start + jnp.arange(block_m, dtype=jnp.int32))


def grouped_vjp(gmm_call: Callable[..., Array], tgmm_call: Callable[..., Array]):
    """``f(lhs, rhs, group_sizes, group_offset, cfg) -> [M, N]`` with a ``jax.custom_vjp``.

    ``gmm_call(lhs, rhs, starts, ends, cfg, transpose_rhs=False)`` is the grouped
    matmul on local row ranges (``rhs [G, N, K]`` read transposed when
    ``transpose_rhs``) and ``tgmm_call(lhs, dy, starts, ends, cfg, out_dtype)`` its
    transposed form ``-> [G, K, N]``. The VJP is ``d lhs = gmm(d out, rhs^T)`` and
    ``d rhs = tgmm(lhs, d out)``; ``cfg`` is static, the group arguments get no
    cotangent.
    """
    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def gmm(lhs, rhs, group_sizes, group_offset, cfg):
        starts, ends = local_bounds(group_sizes, rhs.shape[0], lhs.shape[0], group_offset)
        return gmm_call(lhs, rhs, starts, ends, cfg)

    def gmm_fwd(lhs, rhs, group_sizes, group_offset, cfg):
        starts, ends = local_bounds(group_sizes, rhs.shape[0], lhs.shape[0], group_offset)
        return gmm_call(lhs, rhs, starts, ends, cfg), (lhs, rhs, starts, ends)

    def gmm_bwd(cfg, res, dy):
        lhs, rhs, starts, ends = res
        dlhs = gmm_call(dy.astype(rhs.dtype), rhs, starts, ends, cfg, transpose_rhs=True)
        drhs = tgmm_call(lhs, dy.astype(lhs.dtype), starts, ends, cfg, rhs.dtype)
        return dlhs.astype(lhs.dtype), drhs, None, None

    gmm.defvjp(gmm_fwd, gmm_bwd)
    return gmm


def row_groups(group_sizes: Array, num_local: int, m: int,
               group_offset: Array | int | None = None) -> Array:
    """Local group index of each row, ``[M]`` int32, or -1 for rows no local group owns."""
    starts, ends = local_bounds(group_sizes, num_local, m, group_offset)
    rows = jnp.arange(m, dtype=jnp.int32)[:, None]
    owned = (rows >= starts[None]) & (rows < ends[None])  # [M, G]
    return jnp.where(owned.any(-1), jnp.argmax(owned, -1), -1).astype(jnp.int32)


def gmm_reference(lhs: Array, rhs: Array, group_sizes: Array, *, impl=None,
                  group_offset: Array | int | None = None) -> Array:
    """Dense grouped matmul in fp32: every group times every row, then select.

    Costs ``G`` times the FLOPs of the useful work; it is the test oracle.

    Args:
      lhs: [M, K] rows sorted by group.
      rhs: [G, K, N] one weight matrix per local group.
      group_sizes: [G_all] int32 rows per global group (G_all == G without offset).
      impl: accepted for signature parity with ``gmm``; must be None or "xla".
      group_offset: first global group held by ``rhs`` (see the module docstring).

    Returns:
      [M, N] in the result dtype of lhs and rhs.
    """
    if impl not in (None, "xla"):
        raise ValueError(f"gmm_reference: impl={impl!r} not allowed; use None or 'xla'")
    m, g = lhs.shape[0], rhs.shape[0]
    gid = row_groups(group_sizes, g, m, group_offset)  # [M]
    every = jnp.einsum("mk,gkn->gmn", lhs.astype(jnp.float32), rhs.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)  # [G, M, N]
    picked = jnp.take_along_axis(every, jnp.maximum(gid, 0)[None, :, None], axis=0)[0]
    out = jnp.where((gid >= 0)[:, None], picked, 0.0)
    return out.astype(jnp.result_type(lhs.dtype, rhs.dtype))
