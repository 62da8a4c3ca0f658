"""Pure-XLA grouped matmul (``impl="xla"``; the default on CPU): capacity buffers plus an
overflow loop.

``gmm(lhs [M, K], rhs [G, K, N], group_sizes)`` with the semantics of ``reference.py``,
computed in two parts (``Cap``: a static per-group capacity, by default the mean group
size ``ceil(M / G_all)`` rounded up to 8; ``bm``: the overflow row tile):

1. **Buffers.** The first ``Cap`` rows of every local group are gathered into
   ``[G, Cap, K]`` (empty slots read zero) and multiplied by ``rhs`` in ONE batched
   matmul ``[G, Cap, K] x [G, K, N]``; each row takes its result back by a gather.
2. **Overflow.** The rows of a group past its first ``Cap`` are cut into tiles of
   ``bm`` rows that start at the group's own rows (tile ``j`` of group ``g`` starts at
   row ``starts[g] + Cap + j * bm``; ``reference.group_tiles``), so every tile belongs
   to ONE group; a ``lax.fori_loop`` with a *dynamic* trip count (the tiles actually
   needed, at most ``(M - Cap + G (bm - 1)) / bm``) multiplies each ``[bm, K]`` tile by
   its group's ``[K, N]`` and writes the group's rows of it into the output.

Why this on CPU. XLA:CPU runs one large (batched) matmul at close to its peak but a
loop of small ``[bm, K] x [K, N]`` matmuls at up to ~1.5x the time per FLOP, and a
batched matmul over a *static* tiling needs ``M + G * bm`` rows whatever the routing
(with ``bm`` small enough to waste little, the per-tile weights ``[n_tiles, K, N]``
cost more to gather and pack than the matmul saves). ``jax.lax.ragged_dot`` lowers on
CPU to a dense matmul against every group (``G`` times the FLOPs). The split above puts
the bulk of the rows (all of them when no group exceeds the mean) in the batched matmul
and lets the loop run only over the rows that do not fit, so nothing is ever dropped.

Cost, with ``c_g`` the rows of local group ``g`` and ``o_g = max(c_g - Cap, 0)``: FLOPs
``2 K N (G * Cap + sum_g ceil(o_g / bm) * bm)``: balanced groups cost about
``2 M K N`` (the capacity-factor-1.0 buffers) plus a few overflow tiles; all rows in
one group cost ``2 K N (M + (G - 1) Cap + bm)`` at worst, never the dense ``2 G M K N``.
Memory: the ``[G, Cap, K]`` and ``[G, Cap, N]`` buffers and the ``[M, N]`` output
(residuals for the backward: ``lhs`` and ``rhs`` only).

Backward (``reference.grouped_vjp``): ``d lhs`` is the same computation with ``rhs``
read transposed; ``d rhs`` is one batched ``[G, K, Cap] x [G, Cap, N]`` matmul over the
buffers plus the overflow tiles accumulated into the fp32 ``[G, K, N]`` result.

Verified on CPU against ``gmm_reference`` (values and both gradients; fp32, bf16; empty
groups, one group holding every row, rows past ``sum(group_sizes)``, traced
``group_offset``): tests/pallas_kernels/test_gmm.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.reference import (group_tiles, grouped_vjp, local_bounds,
                                                     tile_rows)

Array = jax.Array


def default_capacity(m: int, n_groups_all: int) -> int:
    """``Cap``: the mean group size ``ceil(M / G_all)`` rounded up to a multiple of 8, <= M."""
    mean = -(-m // max(n_groups_all, 1))
    return max(1, min(m, -(-mean // 8) * 8))


def default_block_m(m: int, cap: int) -> int:
    """Overflow row tile: a power of two in [16, 64] about a quarter of ``Cap``, <= M."""
    return max(1, min(m, 64, max(16, 1 << max(cap // 4, 1).bit_length() - 1)))


def _buffer_rows(starts: Array, ends: Array, cap: int, m: int) -> Array:
    """[G, Cap] row of each buffer slot (the first Cap rows of each group); M if empty."""
    rows = starts[:, None] + jnp.arange(cap, dtype=jnp.int32)[None]
    return jnp.where(rows < ends[:, None], rows, m)


def _row_slots(starts: Array, ends: Array, cap: int, m: int) -> Array:
    """[M] flat buffer slot ``g * Cap + p`` holding each row, or ``G * Cap`` (none)."""
    g_local = starts.shape[0]
    rows = jnp.arange(m, dtype=jnp.int32)
    g = jnp.clip(jnp.searchsorted(ends, rows, side="right"), 0, g_local - 1).astype(jnp.int32)
    p = rows - starts[g]
    inside = (p >= 0) & (rows < ends[g]) & (p < cap)
    return jnp.where(inside, g * cap + p, g_local * cap)


def _overflow_tiles(starts: Array, ends: Array, cap: int, bm: int, m: int):
    """``group_tiles`` over each group's rows past its first ``Cap``."""
    return group_tiles(jnp.minimum(starts + cap, ends), ends, bm, max(m - cap, 0))


def _gmm_call(lhs: Array, rhs: Array, starts: Array, ends: Array, cfg: tuple[int, int],
              transpose_rhs: bool = False) -> Array:
    cap, bm = cfg
    m = lhs.shape[0]
    g_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    # 1. buffers: one batched matmul over the first Cap rows of every group
    buf = jnp.take(lhs, _buffer_rows(starts, ends, cap, m), axis=0, mode="fill", fill_value=0)
    eq = "gck,gnk->gcn" if transpose_rhs else "gck,gkn->gcn"
    y_buf = jnp.einsum(eq, buf, rhs, preferred_element_type=jnp.float32).astype(lhs.dtype)
    out = jnp.take(y_buf.reshape(g_local * cap, n), _row_slots(starts, ends, cap, m), axis=0,
                   mode="fill", fill_value=0)                              # [M, N]
    # 2. overflow: a loop over the tiles in use, each holding rows of one group
    group, first, count = _overflow_tiles(starts, ends, cap, bm, m)
    eq = "mk,nk->mn" if transpose_rhs else "mk,kn->mn"

    def body(i, out):
        g = group[i]
        x, rows = tile_rows(lhs, first[i], bm)
        y = jnp.einsum(eq, x, rhs[g], preferred_element_type=jnp.float32).astype(out.dtype)
        cur, _ = tile_rows(out, first[i], bm)
        mine = ((rows >= first[i]) & (rows < ends[g]))[:, None]
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine, y, cur), rows[0], 0)

    return jax.lax.fori_loop(0, count, body, out)


def _tgmm_call(lhs: Array, dy: Array, starts: Array, ends: Array, cfg: tuple[int, int],
               out_dtype) -> Array:
    cap, bm = cfg
    m = lhs.shape[0]
    idx = _buffer_rows(starts, ends, cap, m)
    take = lambda a: jnp.take(a, idx, axis=0, mode="fill", fill_value=0)  # noqa: E731
    acc = jnp.einsum("gck,gcn->gkn", take(lhs), take(dy), preferred_element_type=jnp.float32)
    group, first, count = _overflow_tiles(starts, ends, cap, bm, m)

    def body(i, acc):
        g = group[i]
        x, rows = tile_rows(lhs, first[i], bm)
        y, _ = tile_rows(dy, first[i], bm)
        mine = ((rows >= first[i]) & (rows < ends[g]))[:, None]
        upd = jnp.einsum("mk,mn->kn", jnp.where(mine, x, 0), jnp.where(mine, y, 0),
                         preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(acc, acc[g] + upd, g, 0)

    return jax.lax.fori_loop(0, count, body, acc).astype(out_dtype)


_gmm_xla = grouped_vjp(_gmm_call, _tgmm_call)  # (lhs, rhs, group_sizes, group_offset, cfg)


def _config(m: int, n_groups_all: int, block_m: int | None, capacity: int | None):
    for name, v in (("block_m", block_m), ("capacity", capacity)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"gmm: {name}={v!r} must be a positive integer for impl='xla'")
    cap = min(capacity or default_capacity(m, n_groups_all), m)
    return cap, min(block_m or default_block_m(m, cap), m)


def gmm_xla(lhs: Array, rhs: Array, group_sizes: Array, *,
            group_offset: Array | int | None = None, block_m: int | None = None,
            capacity: int | None = None) -> Array:
    """Pure-XLA grouped matmul (buffers + overflow loop; see the module docstring).

    Args as for ``ops.gmm``; ``block_m``: the overflow row tile (None: ``default_block_m``);
    ``capacity``: ``Cap`` rows per group in the batched part (None: ``default_capacity``).
    Returns [M, N] in the dtype of ``lhs`` (which the dispatcher has cast both to).
    """
    m = lhs.shape[0]
    if m == 0:
        return jnp.zeros((0, rhs.shape[2]), lhs.dtype)
    cfg = _config(m, group_sizes.shape[0], block_m, capacity)
    return _gmm_xla(lhs, rhs, group_sizes, group_offset, cfg)


def tgmm_xla(lhs: Array, dout: Array, group_sizes: Array, num_groups: int, *,
             group_offset: Array | int | None = None, block_m: int | None = None,
             capacity: int | None = None) -> Array:
    """``out[g] = lhs[rows_g]^T @ dout[rows_g]`` -> [G, K, N] in the dtype of ``lhs``."""
    m = lhs.shape[0]
    if m == 0:
        return jnp.zeros((num_groups, lhs.shape[1], dout.shape[1]), lhs.dtype)
    starts, ends = local_bounds(group_sizes, num_groups, m, group_offset)
    return _tgmm_call(lhs, dout, starts, ends, _config(m, group_sizes.shape[0], block_m, capacity),
                      lhs.dtype)
