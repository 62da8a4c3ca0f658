"""Token-choice assignments run in loops over row tiles of one expert (the XLA dropless path).

:func:`tiled_moe` computes ``y[m] += weights[m, j] * SwiGLU_e(x[m])`` for the assignments
``(m, j)`` (expert ``e = experts[m, j]``) that lie in given runs of an expert-sorted
assignment list (layers/moe/dispatch.py gives it the runs past each expert's capacity
buffer). Each run is cut into tiles of ONE expert's rows
(``pallas_kernels.grouped_matmul.reference.group_tiles``): first as many full tiles of
128 rows as fit, then tiles of 32 rows for the rest, so a run wastes fewer than 32 rows.
A ``lax.fori_loop`` per tile size, with the number of tiles in use as its (traced) trip
count, gathers the tokens of ``per_step`` tiles ``[P, bm, D]``, runs their experts' whole
SwiGLU as batched matmuls against the tiles' gathered weights ``[P, D, F]`` (two or more
tiles per step keep both cores of a small CPU busy) and scatter-adds the weighted result
into ``y``. Cost: ``6 D F`` FLOPs per computed row; a 128-row tile runs at ~0.8 and a
32-row tile at ~0.5 of the speed per row of the dispatch's batched buffers (2-core CPU),
which is why the buffers take the bulk.

Backward: ``jax.custom_vjp`` (a loop with a traced trip count has no autodiff transpose).
The forward saves the pre-activations ``a = x Wi``, ``g = x Wg`` of the computed rows at
their sorted positions (``[M k, F]`` each, fp32), so the backward loop needs six matmuls
per tile: ``d h`` per unit weight (whose dot with ``h`` is the weight's gradient), ``d x``
(two, scatter-added into the token rows) and fp32 ``d W`` per expert (three). Expert
matmuls run in the dtype of ``x`` with fp32 accumulation; the combine is fp32.
Verified against ``dispatch.dense_moe`` (values and gradients; empty experts, all tokens on
one expert, k = 1 and 2, bf16) in tests/layers/moe/test_dispatch.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from layers.typing import Array


class Tiles(NamedTuple):
    """The loop's plan: single-expert row tiles over expert-sorted assignments.

    token [A]: token row of each sorted assignment (A = M * k). ends [E]: end of each
    expert's rows to compute. expert, first [n]: expert and first sorted row of each
    tile; count: tiles in use (traced).
    """
    token: Array
    ends: Array
    expert: Array
    first: Array
    count: Array


def _step_tiles(t: Tiles, i, block_m: int, per_step: int):
    """The tiles of loop step i: expert [P], token [P, bm], sorted row [P, bm] and mine
    [P, bm] (rows of the tile's expert; all False for a tile past ``count``).

    A tile's slice starts at its first row, moved back to fit in A rows; rows outside the
    tile belong to other tiles (or are not to be computed) and are masked by ``mine``."""
    from pallas_kernels.grouped_matmul.reference import tile_rows  # late: kernels optional

    def one(j):
        e = t.expert[j]
        token, rows = tile_rows(t.token, t.first[j], block_m)
        return e, token, rows, (j < t.count) & (rows >= t.first[j]) & (rows < t.ends[e])

    j = jnp.minimum(i * per_step + jnp.arange(per_step), t.expert.shape[0] - 1)
    e, token, rows, mine = jax.vmap(one)(j)
    return e, token, rows, mine & (i * per_step + jnp.arange(per_step) < t.count)[:, None]


def _bmm(eq: str, u: Array, v: Array) -> Array:
    return jnp.einsum(eq, u, v, preferred_element_type=jnp.float32)


def _swiglu(x: Array, wi: Array, wg: Array):
    """x [P, bm, D], wi/wg [P, D, F] -> a, g fp32 and h = silu(a) * g in the dtype of x."""
    a, g = _bmm("pmd,pdf->pmf", x, wi), _bmm("pmd,pdf->pmf", x, wg)
    return a, g, (jax.nn.silu(a) * g).astype(x.dtype)


def _n_steps(t: Tiles, per_step: int):
    return (t.count + per_step - 1) // per_step


def _fwd_step(x, wt, wi, wg, wo, t: Tiles, block_m: int, per_step: int, save: bool):
    """Loop body: adds the tiles' weighted SwiGLU into y; with ``save`` also stores the
    pre-activations a, g of every computed row at its sorted position (for the backward)."""
    d, a_rows = x.shape[1], t.token.shape[0]

    def body(i, carry):
        y, a_all, g_all = carry
        e, token, rows, mine = _step_tiles(t, i, block_m, per_step)
        a, g, h = _swiglu(x[token], wi[e], wg[e])
        o = _bmm("pmf,pfd->pmd", h, wo[e])                                       # [P, bm, D]
        o = o * jnp.where(mine, wt[rows], 0.0)[..., None]
        y = y.at[token.reshape(-1)].add(o.reshape(-1, d))
        if save:  # only the tiles' own rows (unique), so no overlapping writes
            dst = jnp.where(mine, rows, a_rows).reshape(-1)
            a_all = a_all.at[dst].set(a.reshape(dst.shape[0], -1), mode="drop")
            g_all = g_all.at[dst].set(g.reshape(dst.shape[0], -1), mode="drop")
        return y, a_all, g_all
    return body


def _bwd_step(x, wt, wi, wg, wo, dy, a_all, g_all, t: Tiles, block_m: int, per_step: int):
    dt, d = x.dtype, x.shape[1]

    def body(i, acc):
        dx, dwt, dwi, dwg, dwo = acc
        e, token, rows, mine = _step_tiles(t, i, block_m, per_step)
        xt = x[token]                                                         # [P, bm, D]
        a, g = a_all[rows], g_all[rows]                                       # saved, fp32
        sig = jax.nn.sigmoid(a)
        h = (a * sig * g).astype(dt)
        dyt = dy[token]                                                       # fp32
        c = jnp.where(mine, wt[rows], 0.0)[..., None]
        dh1 = _bmm("pmd,pfd->pmf", dyt.astype(dt), wo[e])                     # d(h) per unit weight
        dwt = dwt.at[rows.reshape(-1)].add(                                   # <o, dy> = <h, dh1>
            jnp.where(mine, jnp.sum(h.astype(jnp.float32) * dh1, -1), 0.0).reshape(-1))
        dh = dh1 * c                                                          # 0 off-tile
        da = (dh * g * sig * (1 + a * (1 - sig))).astype(dt)                  # silu'(a)
        dg = (dh * a * sig).astype(dt)
        dxt = _bmm("pmf,pdf->pmd", da, wi[e]) + _bmm("pmf,pdf->pmd", dg, wg[e])
        do = (dyt * c).astype(dt)
        return (dx.at[token.reshape(-1)].add(dxt.reshape(-1, d)), dwt,
                dwi.at[e].add(_bmm("pmd,pmf->pdf", xt, da)),
                dwg.at[e].add(_bmm("pmd,pmf->pdf", xt, dg)),
                dwo.at[e].add(_bmm("pmf,pmd->pfd", h, do)))
    return body


def _run(x, wt, wi, wg, wo, plans, sizes, save: bool):
    f = wi.shape[2]
    a_rows = plans[0].token.shape[0]
    buf = jnp.zeros((a_rows if save else 0, f), jnp.float32)
    carry = (jnp.zeros(x.shape, jnp.float32), buf, buf)
    for t, (bm, per) in zip(plans, sizes):
        carry = jax.lax.fori_loop(0, _n_steps(t, per),
                                  _fwd_step(x, wt, wi, wg, wo, t, bm, per, save), carry)
    return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _loop(x, wt, wi, wg, wo, plans: tuple, sizes: tuple):
    """y [M, D] fp32: every tile's weighted SwiGLU added into its tokens; wt [A] sorted.
    ``plans[i]`` are the tiles of ``sizes[i] = (block_m, per_step)``, one loop each."""
    return _run(x, wt, wi, wg, wo, plans, sizes, save=False)[0]


def _loop_fwd(x, wt, wi, wg, wo, plans, sizes):
    y, a_all, g_all = _run(x, wt, wi, wg, wo, plans, sizes, save=True)
    return y, (x, wt, wi, wg, wo, plans, a_all, g_all)


def _loop_bwd(sizes, res, dy):
    x, wt, wi, wg, wo, plans, a_all, g_all = res
    zeros = lambda a: jnp.zeros(a.shape, jnp.float32)  # noqa: E731
    acc = (zeros(x), zeros(wt), zeros(wi), zeros(wg), zeros(wo))
    for t, (bm, per) in zip(plans, sizes):
        acc = jax.lax.fori_loop(0, _n_steps(t, per),
                                _bwd_step(x, wt, wi, wg, wo, dy, a_all, g_all, t, bm, per), acc)
    dx, dwt, dwi, dwg, dwo = acc
    return (dx.astype(x.dtype), dwt, dwi.astype(wi.dtype), dwg.astype(wg.dtype),
            dwo.astype(wo.dtype), None)


_loop.defvjp(_loop_fwd, _loop_bwd)

TILE_SIZES = ((128, 2), (32, 4))


def tiled_moe(x: Array, weights: Array, w: dict, order: Array, starts: Array, ends: Array,
              tile_sizes: tuple = TILE_SIZES) -> Array:
    """Token-choice assignments in loops over single-expert row tiles (module docstring).

    Args:
      x: [M, D] tokens. weights: [M, k] combine weights.
      w: ``{"wi", "wg": [E, D, F], "wo": [E, F, D]}``.
      order: [A] assignment ids ``m * k + j`` sorted by expert (A = M * k;
        ``dispatch.sort_assignments``).
      starts, ends: [E]; expert e computes the assignments ``order[starts[e]:ends[e]]``.
      tile_sizes: ``(block_m, per_step)`` pairs, largest tile first: each expert's rows
        are covered by as many full tiles of the first size as fit, then of the next,
        and the last size covers the rest (its last tile partly filled); ``per_step``
        tiles run per loop step as one batched matmul (keeps both cores of a small CPU
        busy).

    Returns:
      [M, D] fp32 (the caller adds it to other paths before casting).
    """
    from pallas_kernels.grouped_matmul.reference import group_tiles  # late: kernels optional
    m, k = weights.shape
    a = m * k
    plans, sizes, cur = [], [], starts
    for n, (block_m, per_step) in enumerate(tile_sizes):
        bm = max(1, min(block_m, a))
        last = n == len(tile_sizes) - 1
        stop = ends if last else cur + (ends - cur) // bm * bm          # full tiles only
        expert, first, count = group_tiles(cur, stop, bm, a)
        plans.append(Tiles(order // k, stop, expert, first, count))
        sizes.append((bm, per_step))
        cur = stop
    wt = weights.reshape(-1).astype(jnp.float32)[order]                         # [A] sorted
    dt = x.dtype
    return _loop(x, wt, w["wi"].astype(dt), w["wg"].astype(dt), w["wo"].astype(dt),
                 tuple(plans), tuple(sizes))
