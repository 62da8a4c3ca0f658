"""``gmm`` / ``tgmm`` dispatcher.

``impl`` (the same names as the attention dispatcher):

* ``None``: the best for the backend: ``"pallas_tpu"`` on TPU, ``"pallas_gpu"`` on
  GPU, ``"xla"`` on CPU.
* ``"xla"``: capacity buffers + an overflow loop (``xla.py``), any backend.
* ``"pallas"``: the current backend's own kernel: ``"pallas_tpu"`` on TPU,
  ``"pallas_gpu"`` on GPU, and on CPU the Triton kernel in the generic Pallas
  interpreter (``"pallas_triton"``).
* ``"pallas_tpu"``: ``pallas_tpu.gmm_tpu`` (Mosaic TPU, group metadata by scalar
  prefetch); on CPU it runs in TPU interpret mode (``interpret=True`` or a
  ``pltpu.InterpretParams``, e.g. with ``detect_races=True``); ``interpret=False``
  on CPU only lowers for TPU.
* ``"pallas_gpu"``: there is no Mosaic GPU grouped matmul: on GPU this is the
  Triton kernel, and on CPU the Triton kernel in the generic Pallas interpreter
  (the same as ``"pallas_triton"``), so a config naming ``"pallas_gpu"`` for all
  kernels runs in CPU tests.
* ``"pallas_triton"``: ``pallas_triton.gmm_pallas``, compiled by Triton on GPU,
  the generic Pallas interpreter on CPU.
* ``"tokamax"``: ``tokamax.ragged_dot`` (``tokamax.py``), any backend where tokamax
  is installed (the ``tokamax`` extra); on CPU it runs tokamax's XLA path.

An impl the backend cannot run raises ValueError listing those it can. The
backend is the abstract mesh's device platform when one is set (a deviceless
compile for TPU or GPU), else ``jax.default_backend()``; backend detection, the
impl names and the ``interpret`` checks are shared with the attention dispatcher
(``pallas_kernels.dispatch``).

The XLA path (``xla.py``) runs the first ``Cap`` rows of every group (``Cap``: the
mean group size) as ONE batched matmul over ``[G, Cap, K]`` buffers and the rows past
them in a loop over single-group tiles of ``block_m`` rows with a dynamic trip count,
so FLOPs are about ``2 M K N`` plus a few tiles for balanced groups and at worst
``2 (M + (G - 1) Cap + block_m) K N``, never the ``2 G M K N`` of a dense formulation
(``gmm_reference``, and ``jax.lax.ragged_dot`` on CPU, which expands every group).
Its backward is the same split (``d lhs`` with ``rhs`` read transposed; ``d rhs`` a
batched matmul over the buffers plus the tiles accumulated in fp32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import (BEST, IMPLS, OWN, current_backend, tpu_interpret,
                                     triton_interpret)
from pallas_kernels.grouped_matmul.pallas_triton import GmmConfig, gmm_pallas, tgmm_pallas
from pallas_kernels.grouped_matmul.pallas_tpu import (TpuGmmConfig, check_blocks, gmm_tpu,
                                                      tgmm_tpu)
from pallas_kernels.grouped_matmul.xla import gmm_xla, tgmm_xla

Array = jax.Array
# what each backend can run (anything else is refused with this list)
RUNNABLE = {
    "cpu": ("xla", "pallas", "pallas_tpu", "pallas_gpu", "pallas_triton", "tokamax"),
    "gpu": ("xla", "pallas", "pallas_gpu", "pallas_triton", "tokamax"),
    "tpu": ("xla", "pallas", "pallas_tpu", "tokamax"),
}

# Default tiles (M, K, N). Triton/GPU values are untuned guesses (no GPU was
# available when this was written); interpret mode favours few, large tiles. The
# TPU defaults are explained in pallas_tpu.py.
# 4-byte inputs get half-size GPU tiles: at (128, 64, 128) with 3 pipeline stages the fp32
# kernels ask for up to 288 KiB of shared memory, over the H100's 227 KiB (found by a
# deviceless H100 compile of the fp32 Mixtral-tiny train step).
_GPU_TILES = (128, 64, 128)
_GPU_TILES_32BIT = (64, 32, 64)
_CPU_TILES = (128, 128, 128)
_TPU_TILES = (TpuGmmConfig.block_m, TpuGmmConfig.block_k, TpuGmmConfig.block_n)
_TPU_INTERPRET_TILES = (128, 128, 128)


def resolve_impl(impl: str | None, backend: str, who: str = "gmm") -> str:
    """The concrete kernel for ``impl`` on ``backend``: one of "xla", "pallas_tpu",
    "pallas_triton", "tokamax" ("pallas" and "pallas_gpu" resolved); ValueError if the
    backend cannot run it."""
    runnable = RUNNABLE.get(backend, ("xla", "tokamax"))
    if impl is None:
        impl = BEST.get(backend, "xla")
    elif impl not in IMPLS:
        raise ValueError(f"{who}: impl={impl!r} is not one of {(None,) + IMPLS}")
    elif impl not in runnable:
        raise ValueError(f"{who}: impl={impl!r} cannot run on backend {backend!r}; "
                         f"it can run {(None,) + runnable}")
    if impl == "pallas":
        impl = OWN.get(backend, "xla")
    if impl == "pallas_gpu":
        impl = "pallas_triton"  # no Mosaic GPU grouped matmul: Triton on GPU and on CPU
    return impl


def _tpu_config(block_m, block_k, block_n, interpret, backend: str, dtype) -> TpuGmmConfig:
    interpret = tpu_interpret(interpret, backend, "gmm")  # None: compile with Mosaic
    tiles = _TPU_INTERPRET_TILES if interpret is not None else _TPU_TILES
    bm, bk, bn = (d if b is None else b for b, d in zip((block_m, block_k, block_n), tiles))
    check_blocks(bm, bk, bn, dtype)
    return TpuGmmConfig(bm, bk, bn, interpret=interpret)


def _triton_config(block_m, block_k, block_n, interpret, backend: str, dtype) -> GmmConfig:
    if backend == "gpu":
        tiles = _GPU_TILES_32BIT if jnp.dtype(dtype).itemsize >= 4 else _GPU_TILES
    else:
        tiles = _CPU_TILES
    bm, bk, bn = (d if b is None else b for b, d in zip((block_m, block_k, block_n), tiles))
    interpret = triton_interpret(interpret, backend, "gmm")
    for name, b in (("block_m", bm), ("block_k", bk), ("block_n", bn)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"gmm: {name}={b} must be a power of two >= 16")
    return GmmConfig(bm, bk, bn, interpret=bool(interpret))


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
        interpret=None) -> Array:
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
      impl: None (best for the backend), "xla", "pallas", "pallas_tpu",
        "pallas_gpu", "pallas_triton" or "tokamax" (see the module docstring).
      group_offset: first global group held by ``rhs``; scalar, may be traced;
        requires ``group_offset + G <= G_all``.
      block_m, block_k, block_n: tile sizes; None: per-backend defaults.
        "pallas_triton": powers of two >= 16. "pallas_tpu": block_m a multiple of
        8 (16 for bf16), block_k/block_n multiples of 128 (a dim that fits in one
        block is taken whole). "xla": block_m alone (the overflow tile, see
        ``xla.py``). "tokamax": ignored.
      interpret: Pallas interpret mode. None: interpret on CPU only. For
        "pallas_tpu" a ``pltpu.InterpretParams`` selects the TPU interpreter's
        options (e.g. ``detect_races=True``).

    Returns:
      [M, N] in the result dtype of lhs and rhs (fp32 accumulation).
    """
    _validate(lhs, rhs, group_sizes, group_offset)
    backend = current_backend()
    impl = resolve_impl(impl, backend)
    dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    if impl == "xla":
        return gmm_xla(lhs, rhs, group_sizes, group_offset=group_offset, block_m=block_m)
    if impl == "tokamax":
        from pallas_kernels.grouped_matmul.tokamax import gmm_tokamax  # optional dependency
        return gmm_tokamax(lhs, rhs, group_sizes, group_offset=group_offset)
    if impl == "pallas_tpu":
        cfg = _tpu_config(block_m, block_k, block_n, interpret, backend, dtype)
        return gmm_tpu(lhs, rhs, group_sizes, group_offset=group_offset, cfg=cfg)
    cfg = _triton_config(block_m, block_k, block_n, interpret, backend, dtype)
    return gmm_pallas(lhs, rhs, group_sizes, group_offset=group_offset, cfg=cfg)


def tgmm(lhs: Array, dout: Array, group_sizes: Array, num_groups: int, *,
         group_offset: Array | int | None = None, impl: str | None = None,
         block_m: int | None = None, block_k: int | None = None, block_n: int | None = None,
         interpret=None) -> Array:
    """Transposed grouped matmul ``out[g] = lhs[rows_g]^T @ dout[rows_g]`` -> [G, K, N].

    The weight gradient of ``gmm``; exposed for callers that need it directly.
    Arguments as for ``gmm`` (``num_groups``: G, the local groups).
    """
    if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
        raise ValueError(f"tgmm: lhs must be [M, K] and dout [M, N] with the same M; got "
                         f"{lhs.shape} and {dout.shape}")
    backend = current_backend()
    impl = resolve_impl(impl, backend, "tgmm")
    dtype = jnp.result_type(lhs.dtype, dout.dtype)
    lhs, dout = lhs.astype(dtype), dout.astype(dtype)
    if impl == "xla":
        return tgmm_xla(lhs, dout, group_sizes, num_groups, group_offset=group_offset,
                        block_m=block_m)
    if impl == "tokamax":
        from pallas_kernels.grouped_matmul.tokamax import tgmm_tokamax  # optional dependency
        return tgmm_tokamax(lhs, dout, group_sizes, num_groups, group_offset=group_offset)
    if impl == "pallas_tpu":
        cfg = _tpu_config(block_m, block_k, block_n, interpret, backend, dtype)
        return tgmm_tpu(lhs, dout, group_sizes, num_groups, group_offset=group_offset, cfg=cfg)
    cfg = _triton_config(block_m, block_k, block_n, interpret, backend, dtype)
    return tgmm_pallas(lhs, dout, group_sizes, num_groups, group_offset=group_offset, cfg=cfg)
