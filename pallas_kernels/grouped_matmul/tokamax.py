"""``gmm`` / ``tgmm`` through ``tokamax.ragged_dot`` (the ``"tokamax"`` impl).

tokamax (the ``tokamax`` extra) is a Pallas kernel library; ``tokamax.ragged_dot``
has the signature of ``jax.lax.ragged_dot`` and picks a kernel per backend (Mosaic
TPU, Mosaic GPU or Triton, else XLA's ``ragged_dot``). On CPU only its XLA path
runs, and that is what the tests here compare with ``gmm_reference``.

Mapping onto archlab's semantics (``reference.py``):

* rows sorted by group, zero-sized groups, M not a multiple of any tile, rows
  beyond ``sum(group_sizes)`` (zero): passed through, with the sizes clipped so
  that they never reach past row M (as ``reference.local_bounds`` does).
* ``group_offset`` (expert-parallel shard holding global groups
  ``[offset, offset + G)``): tokamax's own ``group_offset`` is not used, because
  its XLA path does not implement it and what its kernels write into rows of
  other shards could not be checked without a device. Instead the local rows are
  framed by a leading group of zero weights that owns every row before the shard's
  first group: ``rhs`` gains one ``[K, N]`` zero matrix and ``group_sizes``
  becomes ``[rows before, local sizes...]``; rows after the shard's last group
  are beyond the new ``sum(group_sizes)`` and so zero. Exact on every backend;
  it costs a matmul over the leading rows (zero weights) and a copy of ``rhs``.
* ``tgmm`` is the weight cotangent of ``tokamax.ragged_dot`` (its own backward),
  taken by ``jax.vjp``.
* dtypes: the output has the inputs' result dtype; tokamax accumulates in fp32.

Verified: values and gradients against ``gmm_reference`` on CPU (tokamax 0.0.17,
its XLA path; tests/pallas_kernels/test_tokamax.py). Its TPU/GPU kernels have not
run here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import import_tokamax
from pallas_kernels.grouped_matmul.reference import local_bounds

Array = jax.Array


def gmm_tokamax(lhs: Array, rhs: Array, group_sizes: Array, *,
                group_offset: Array | int | None = None) -> Array:
    """``[M, K] x [G, K, N] -> [M, N]`` by ``tokamax.ragged_dot`` (inputs validated by ``ops.gmm``).

    Args:
      lhs: [M, K] rows sorted by group.
      rhs: [G, K, N] local groups' weights.
      group_sizes: [G_all] int rows per global group.
      group_offset: first global group held by ``rhs`` (may be traced), or None.

    Returns:
      [M, N] in the result dtype of lhs and rhs.
    """
    tokamax = import_tokamax()
    m, g = lhs.shape[0], rhs.shape[0]
    dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    if m == 0:
        return jnp.zeros((0, rhs.shape[2]), dtype)
    starts, ends = local_bounds(group_sizes, g, m, group_offset)  # clipped to M rows
    sizes = ends - starts
    if group_offset is not None:
        sizes = jnp.concatenate([starts[:1], sizes])
        rhs = jnp.concatenate([jnp.zeros((1,) + rhs.shape[1:], rhs.dtype), rhs])
    return tokamax.ragged_dot(lhs, rhs, sizes).astype(dtype)


def tgmm_tokamax(lhs: Array, dout: Array, group_sizes: Array, num_groups: int, *,
                 group_offset: Array | int | None = None) -> Array:
    """``out[g] = lhs[rows_g]^T @ dout[rows_g]`` -> ``[G, K, N]``, tokamax's ragged_dot backward."""
    rhs = jnp.zeros((num_groups, lhs.shape[1], dout.shape[1]), lhs.dtype)
    _, vjp = jax.vjp(lambda w: gmm_tokamax(lhs, w, group_sizes, group_offset=group_offset),
                     rhs)
    return vjp(dout.astype(lhs.dtype))[0]
