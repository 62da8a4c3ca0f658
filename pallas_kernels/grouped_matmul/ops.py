"""``gmm`` dispatcher and its pure-XLA implementation.

``impl``:

* ``None``: ``"pallas"`` on GPU, ``"xla"`` on CPU and TPU (the Pallas kernel is
  written for the Triton backend and has not been lowered for TPU; on TPU use
  ``"xla"`` or ``jax.lax.ragged_dot``).
* ``"pallas"``: ``pallas.gmm_pallas``; compiled through Triton on GPU, interpret
  mode on CPU (slow; for tests). Refused on TPU.
* ``"xla"``: the tiled scan below, any backend.

The XLA path splits the rows into tiles of ``block_m`` (default: about the mean
group size, a power of two in [16, 128]) and enumerates the
``(row tile, local group)`` pairs that overlap (at most ``M / block_m + G``, a
static bound); a ``lax.scan`` over the pairs multiplies one ``[block_m, K]`` tile
by one ``[K, N]`` expert and adds the group's rows into the output tile. FLOPs are
``2 (M + G * block_m) K N`` (useful work plus about one tile per group), not the
``2 G M K N`` of a dense formulation (``gmm_reference``, and ``jax.lax.ragged_dot``
on backends without a native grouped matmul); memory is the fp32 ``[M, N]``
accumulator. The steps run sequentially, each a plain matmul. The backward pass
(``jax.custom_vjp``) is the same scan: ``d lhs`` with ``rhs`` read transposed and
``d rhs`` accumulated into an fp32 ``[G, K, N]`` carry, so no per-step weights are
saved for autodiff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.pallas import GmmConfig, gmm_pallas, tgmm_pallas
from pallas_kernels.grouped_matmul.reference import local_bounds, tile_group_range

Array = jax.Array
IMPLS = ("pallas", "xla")

# Default tiles (M, K, N) per backend. GPU values are untuned guesses (no GPU was
# available when this was written); interpret mode favours few, large tiles.
_GPU_TILES = (128, 64, 128)
_CPU_TILES = (128, 128, 128)


def _xla_block_m(m: int, g: int) -> int:
    """Row tile of the XLA scan: about the mean group size, a power of two in [16, 128].

    Tiles much larger than a group waste work on group boundaries; much smaller ones
    add scan steps (2-core CPU, M=2048: E=8 best at 128, E=64 best at 16-32).
    """
    mean = max(1, m // max(g, 1))
    return int(min(128, max(16, 1 << (mean.bit_length() - 1))))


def _resolve_impl(impl: str | None, backend: str) -> str:
    if impl is None:
        return "pallas" if backend == "gpu" else "xla"
    if impl not in IMPLS:
        raise ValueError(f"gmm: impl={impl!r} is not one of {(None,) + IMPLS}")
    if impl == "pallas" and backend not in ("gpu", "cpu"):
        raise ValueError(f"gmm: impl='pallas' cannot run on backend {backend!r} (Triton "
                         "kernel; allowed: 'gpu', or 'cpu' in interpret mode); use impl='xla'")
    return impl


def _validate(lhs, rhs, group_sizes, group_offset) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"gmm: lhs must be [M, K] and rhs [G, K, N]; got lhs.shape="
                         f"{lhs.shape}, rhs.shape={rhs.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"gmm: contraction dims differ: lhs.shape[1]={lhs.shape[1]} vs "
                         f"rhs.shape[1]={rhs.shape[1]} (lhs [M, K], rhs [G, K, N])")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"gmm: group_sizes must be a 1-D integer array; got shape "
                         f"{group_sizes.shape}, dtype {group_sizes.dtype}")
    g, n_sizes = rhs.shape[0], group_sizes.shape[0]
    if group_offset is None and n_sizes != g:
        raise ValueError(f"gmm: group_sizes has {n_sizes} entries but rhs has G={g} groups "
                         "(without group_offset they must match)")
    if group_offset is not None and n_sizes < g:
        raise ValueError(f"gmm: group_sizes has {n_sizes} entries, fewer than rhs's G={g} "
                         "local groups (with group_offset it lists every global group)")
    if group_offset is not None and jnp.ndim(group_offset) != 0:
        raise ValueError(f"gmm: group_offset must be a scalar; got shape {jnp.shape(group_offset)}")


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *, impl: str | None = None,
        group_offset: Array | int | None = None, block_m: int | None = None,
        block_k: int | None = None, block_n: int | None = None,
        interpret: bool | None = None) -> Array:
    """Grouped matmul over rows sorted by group (the MoE expert matmul).

    ``out[m] = lhs[m] @ rhs[g(m)]`` for rows owned by a local group, 0 for other rows
    (beyond ``sum(group_sizes)`` or owned by groups outside ``rhs``); see
    ``reference.py`` for the exact ``group_offset`` semantics. Differentiable in
    ``lhs`` and ``rhs`` (custom VJP: ``d lhs = gmm(d out, rhs^T)``,
    ``d rhs = tgmm(lhs, d out)``).

    Args:
      lhs: [M, K] rows sorted by group.
      rhs: [G, K, N] one weight matrix per local group.
      group_sizes: [G_all] int rows per global group (G_all == G without offset).
      impl: None (by backend), "pallas" or "xla" (see the module docstring).
      group_offset: first global group held by ``rhs``; scalar, may be traced;
        requires ``group_offset + G <= G_all``.
      block_m, block_k, block_n: tile sizes (powers of two >= 16 for "pallas";
        block_m alone is used by "xla"); None: per-backend defaults.
      interpret: force/forbid Pallas interpret mode (None: interpret on CPU only).

    Returns:
      [M, N] in the result dtype of lhs and rhs (fp32 accumulation).
    """
    _validate(lhs, rhs, group_sizes, group_offset)
    backend = jax.default_backend()
    impl = _resolve_impl(impl, backend)
    dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    if impl == "xla":
        return gmm_xla(lhs, rhs, group_sizes, group_offset=group_offset, block_m=block_m)
    tiles = _GPU_TILES if backend == "gpu" else _CPU_TILES
    bm, bk, bn = (d if b is None else b for b, d in zip((block_m, block_k, block_n), tiles))
    if interpret is None:
        interpret = backend == "cpu"
    if backend == "cpu" and not interpret:
        raise ValueError("gmm: impl='pallas' with interpret=False cannot run on CPU; "
                         "use interpret=None/True or impl='xla'")
    for name, b in (("block_m", bm), ("block_k", bk), ("block_n", bn)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"gmm: {name}={b} must be a power of two >= 16")
    cfg = GmmConfig(bm, bk, bn, interpret=interpret)
    return gmm_pallas(lhs, rhs, group_sizes, group_offset=group_offset, cfg=cfg)


# --------------------------------------------------------------------------------------
# XLA: scan over (row tile, group) pairs

def _pairs(starts: Array, ends: Array, bm: int, tiles_m: int):
    """Static-length list of ``(tile, group, valid)`` pairs, tile-major."""
    g = starts.shape[0]
    lo, hi = tile_group_range(starts, ends, bm, tiles_m)
    incl = jnp.cumsum(hi - lo)
    w = jnp.arange(tiles_m + g, dtype=jnp.int32)
    tile = jnp.minimum(jnp.searchsorted(incl, w, side="right"), tiles_m - 1).astype(jnp.int32)
    grp = lo[tile] + w - (incl - (hi - lo))[tile]
    valid = w < incl[-1]
    return tile, jnp.clip(grp, 0, g - 1), valid


def _row_mask(t, g, ok, starts, ends, bm):
    rows = t * bm + jnp.arange(bm, dtype=jnp.int32)
    return (ok & (rows >= starts[g]) & (rows < ends[g]))[:, None]  # [bm, 1]


def _gmm_scan(lhs, rhs, starts, ends, bm: int, transpose_rhs: bool):
    m = lhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    mp = -(-m // bm) * bm
    x_all = jnp.pad(lhs, ((0, mp - m), (0, 0)))
    eq = "mk,nk->mn" if transpose_rhs else "mk,kn->mn"

    def step(out, pair):
        t, g, ok = pair
        x = jax.lax.dynamic_slice_in_dim(x_all, t * bm, bm)  # [bm, K]
        y = jnp.einsum(eq, x, rhs[g], preferred_element_type=jnp.float32)
        cur = jax.lax.dynamic_slice_in_dim(out, t * bm, bm)
        y = cur + jnp.where(_row_mask(t, g, ok, starts, ends, bm), y, 0.0)
        return jax.lax.dynamic_update_slice_in_dim(out, y, t * bm, 0), None

    out, _ = jax.lax.scan(step, jnp.zeros((mp, n), jnp.float32),
                          _pairs(starts, ends, bm, mp // bm))
    return out[:m].astype(lhs.dtype)


def _tgmm_scan(lhs, dy, starts, ends, bm: int, out_dtype):
    m, k = lhs.shape
    g, n = starts.shape[0], dy.shape[1]
    mp = -(-m // bm) * bm
    x_all = jnp.pad(lhs, ((0, mp - m), (0, 0)))
    y_all = jnp.pad(dy, ((0, mp - m), (0, 0)))

    def step(acc, pair):
        t, grp, ok = pair
        mine = _row_mask(t, grp, ok, starts, ends, bm)
        x = jnp.where(mine, jax.lax.dynamic_slice_in_dim(x_all, t * bm, bm), 0)
        y = jnp.where(mine, jax.lax.dynamic_slice_in_dim(y_all, t * bm, bm), 0)
        upd = jnp.einsum("mk,mn->kn", x, y, preferred_element_type=jnp.float32)
        cur = jax.lax.dynamic_index_in_dim(acc, grp, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(acc, cur + upd, grp, 0), None

    acc, _ = jax.lax.scan(step, jnp.zeros((g, k, n), jnp.float32),
                          _pairs(starts, ends, bm, mp // bm))
    return acc.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm_xla(lhs, rhs, group_sizes, group_offset, bm):
    starts, ends = local_bounds(group_sizes, rhs.shape[0], lhs.shape[0], group_offset)
    return _gmm_scan(lhs, rhs, starts, ends, bm, False)


def _gmm_xla_fwd(lhs, rhs, group_sizes, group_offset, bm):
    starts, ends = local_bounds(group_sizes, rhs.shape[0], lhs.shape[0], group_offset)
    return _gmm_scan(lhs, rhs, starts, ends, bm, False), (lhs, rhs, starts, ends)


def _gmm_xla_bwd(bm, res, dy):
    lhs, rhs, starts, ends = res
    dlhs = _gmm_scan(dy.astype(rhs.dtype), rhs, starts, ends, bm, True)
    drhs = _tgmm_scan(lhs, dy.astype(lhs.dtype), starts, ends, bm, rhs.dtype)
    return dlhs.astype(lhs.dtype), drhs, None, None


_gmm_xla.defvjp(_gmm_xla_fwd, _gmm_xla_bwd)


def gmm_xla(lhs: Array, rhs: Array, group_sizes: Array, *,
            group_offset: Array | int | None = None, block_m: int | None = None) -> Array:
    """Pure-XLA grouped matmul (tiled scan; see the module docstring for its cost).

    ``block_m`` None: about the mean group size (a power of two in [16, 128]).
    """
    if lhs.shape[0] == 0:
        return jnp.zeros((0, rhs.shape[2]), lhs.dtype)
    bm = block_m or _xla_block_m(lhs.shape[0], rhs.shape[0])
    bm = min(bm, max(8, -(-lhs.shape[0] // 8) * 8))
    return _gmm_xla(lhs, rhs, group_sizes, group_offset, bm)


def tgmm(lhs: Array, dout: Array, group_sizes: Array, num_groups: int, *,
         group_offset: Array | int | None = None, impl: str | None = None,
         block_m: int | None = None, interpret: bool | None = None) -> Array:
    """Transposed grouped matmul ``out[g] = lhs[rows_g]^T @ dout[rows_g]`` -> [G, K, N].

    The weight gradient of ``gmm``; exposed for callers that need it directly.
    """
    if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
        raise ValueError(f"tgmm: lhs must be [M, K] and dout [M, N] with the same M; got "
                         f"{lhs.shape} and {dout.shape}")
    backend = jax.default_backend()
    impl = _resolve_impl(impl, backend)
    tiles = _GPU_TILES if backend == "gpu" else _CPU_TILES
    if impl == "xla":
        bm = block_m or _xla_block_m(lhs.shape[0], num_groups)
        starts, ends = local_bounds(group_sizes, num_groups, lhs.shape[0], group_offset)
        return _tgmm_scan(lhs, dout, starts, ends, bm, lhs.dtype)
    bm = block_m or tiles[0]
    interpret = backend == "cpu" if interpret is None else interpret
    return tgmm_pallas(lhs, dout, group_sizes, num_groups, group_offset=group_offset,
                       cfg=GmmConfig(bm, tiles[1], tiles[2], interpret=interpret))
