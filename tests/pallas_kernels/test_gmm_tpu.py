"""The Mosaic TPU gmm/tgmm kernels in TPU interpret mode on CPU, vs gmm_reference.

Values and gradients (custom VJP: d lhs by the transposed gmm kernel, d rhs by
tgmm) with ragged and empty groups, M not a multiple of the row tile, K and N
split into several 128-wide blocks, a traced group offset (including a shard
whose groups are all empty), fp32 and bf16; one case under the interpreter's
race detector; and the visit list (the scalar-prefetched group metadata).
Cases that share shapes share one compiled function, so most cases cost only
a run of the interpreter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import gmm, gmm_reference, tgmm
from pallas_kernels.grouped_matmul import pallas_tpu
from pallas_kernels.grouped_matmul.ops import resolve_impl
from pallas_kernels.grouped_matmul.reference import local_bounds
from tests.helpers import rel_rms

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # bf16: inputs and outputs rounded to bf16


def _inputs(m, k, n, g, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(ks[0], (m, k), jnp.float32).astype(dtype)
    rhs = jax.random.normal(ks[1], (g, k, n), jnp.float32).astype(dtype)
    dout = jax.random.normal(ks[2], (m, n), jnp.float32).astype(dtype)
    return lhs, rhs, dout


def _runner(with_offset: bool, blocks: tuple[int, int, int], interpret=True):
    """jit(kernel fwd + vjp + direct tgmm, and the fp32 reference's) for one shape family."""
    bm, bk, bn = blocks

    @jax.jit
    def run(lhs, rhs, dout, sizes, offset):
        off = offset if with_offset else None
        f = lambda x, w: gmm(x, w, sizes, impl="pallas_tpu", group_offset=off, block_m=bm,
                             block_k=bk, block_n=bn, interpret=interpret)
        r = lambda x, w: gmm_reference(x.astype(jnp.float32), w.astype(jnp.float32), sizes,
                                       group_offset=off)
        out, vjp = jax.vjp(f, lhs, rhs)
        ref, vjp_ref = jax.vjp(r, lhs, rhs)
        direct = tgmm(lhs, dout, sizes, rhs.shape[0], impl="pallas_tpu", group_offset=off,
                      block_m=bm, block_k=bk, block_n=bn, interpret=interpret)
        return (out, *vjp(dout), direct), (ref, *vjp_ref(dout.astype(jnp.float32)))

    return run


def _check(got, want, dtype, sizes, offset, num_local):
    out, dlhs, drhs, direct = got
    ref, ref_dlhs, ref_drhs = want
    tol = TOL[dtype]
    for name, x, r in (("out", out, ref), ("dlhs", dlhs, ref_dlhs), ("drhs", drhs, ref_drhs),
                       ("tgmm", direct, ref_drhs)):
        assert x.dtype == dtype, name
        assert np.isfinite(np.asarray(x, np.float32)).all(), name
        assert rel_rms(x, r) < tol, (name, rel_rms(x, r))
    # rows no local group owns, and empty local groups' weight gradients: exactly 0
    ends = np.cumsum(sizes)
    off = offset or 0
    first, last = ends[off] - sizes[off], ends[off + num_local - 1]
    for x in (out, dlhs):
        np.testing.assert_array_equal(np.asarray(x[:first], np.float32), 0)
        np.testing.assert_array_equal(np.asarray(x[last:], np.float32), 0)
    for i in range(num_local):
        if sizes[off + i] == 0:
            np.testing.assert_array_equal(np.asarray(drhs[i], np.float32), 0)


# M=100 rows in 16-row tiles (7 tiles, the last one partial); groups straddle tiles,
# two are empty, 18 trailing rows belong to no group. K=48, N=40 fit one block each.
SIZES = (30, 0, 25, 7, 0, 20)


def test_fp32_ragged_empty_groups_m_not_tile_multiple():
    lhs, rhs, dout = _inputs(100, 48, 40, 6, jnp.float32)
    run = _runner(False, (16, 128, 128))
    for sizes in (SIZES, (0, 0, 64, 0, 0, 36), (0, 0, 0, 0, 0, 0)):  # last: every row zero
        got, want = run(lhs, rhs, dout, jnp.asarray(sizes, jnp.int32), jnp.int32(0))
        _check(got, want, jnp.float32, sizes, None, 6)


def test_fp32_group_offset_traced():
    """A shard holding 3 of 6 global groups: offsets 0, 2, 3 and a shard whose groups are
    all empty run through one compiled function (the offset is traced)."""
    lhs, rhs, dout = _inputs(100, 48, 40, 3, jnp.float32, seed=1)
    run = _runner(True, (16, 128, 128))
    for sizes, off in ((SIZES, 2), (SIZES, 0), (SIZES, 3), ((50, 50, 0, 0, 0, 0), 2)):
        got, want = run(lhs, rhs, dout, jnp.asarray(sizes, jnp.int32), jnp.int32(off))
        _check(got, want, jnp.float32, sizes, off, 3)


def test_bf16_multiple_k_and_n_blocks_with_offset():
    """K=200 and N=136 span two 128-wide blocks each (zero-padded to 256); bf16 rows
    use 16-row tiles (bf16 packs 16 rows per sublane tile); fp32 accumulation."""
    lhs, rhs, dout = _inputs(90, 200, 136, 4, jnp.bfloat16, seed=2)
    run = _runner(True, (16, 128, 128))
    sizes = (5, 33, 0, 40, 2, 10)
    got, want = run(lhs, rhs, dout, jnp.asarray(sizes, jnp.int32), jnp.int32(1))
    _check(got, want, jnp.bfloat16, sizes, 1, 4)


def test_race_detector_finds_no_race():
    """gmm, its transposed form and tgmm under the TPU interpreter's race detector, with
    two cores sharing the parallel grid dims (N tiles for gmm; K and N tiles for tgmm)."""
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    lhs, rhs, dout = _inputs(40, 256, 256, 3, jnp.float32, seed=3)
    sizes = (9, 0, 20)
    got, want = _runner(False, (8, 128, 128), interpret=params)(
        lhs, rhs, dout, jnp.asarray(sizes, jnp.int32), jnp.int32(0))
    _check(got, want, jnp.float32, sizes, None, 3)


@pytest.mark.parametrize("sizes, offset, num_local", [
    (SIZES, None, 6), (SIZES, 2, 3), ((0, 0, 0), None, 3), ((3, 0, 0, 9, 80, 0), 1, 4),
])
def test_visit_lists_cover_each_tile_once_in_order(sizes, offset, num_local):
    """The gmm visit list: every row tile has one first and one last visit, its visits are
    consecutive, compute visits pair a tile with a group that overlaps it, and the static
    length bounds hold; the tgmm list gives each local group one first and one last."""
    m, bm, nk = 100, 16, 3
    tiles_m = -(-m // bm)
    starts, ends = local_bounds(jnp.asarray(sizes, jnp.int32), num_local, m, offset)
    gmm_visits = jax.jit(pallas_tpu._gmm_visits, static_argnums=(2, 3, 4))
    tgmm_visits = jax.jit(pallas_tpu._tgmm_visits, static_argnums=(2, 3))
    out_tile, in_tile, group, k_fixed, lo, hi, flags = map(
        np.asarray, gmm_visits(starts, ends, bm, tiles_m, nk))
    compute, first, last = (flags & 1) > 0, (flags & 2) > 0, (flags & 4) > 0
    assert len(out_tile) == tiles_m + num_local + 1
    np.testing.assert_array_equal(np.bincount(out_tile[first], minlength=tiles_m), 1)
    np.testing.assert_array_equal(np.bincount(out_tile[last], minlength=tiles_m), 1)
    assert (np.diff(out_tile) >= 0).all()
    s, e = np.asarray(starts), np.asarray(ends)
    for t, g, a, b in zip(out_tile[compute], group[compute], lo[compute], hi[compute]):
        assert (a, b) == (s[g], e[g]) and a < b
        assert a < (t + 1) * bm and b > t * bm  # the group overlaps the tile
    assert (k_fixed[compute] == -1).all() and (in_tile[compute] == out_tile[compute]).all()
    # every owned row is covered by exactly one compute visit
    covered = np.zeros(tiles_m * bm, int)
    for t, a, b in zip(out_tile[compute], lo[compute], hi[compute]):
        rows = np.arange(t * bm, (t + 1) * bm)
        covered[rows[(rows >= a) & (rows < b)]] += 1
    owned = np.zeros(tiles_m * bm, int)
    owned[s[0]:e[-1]] = 1
    np.testing.assert_array_equal(covered, owned)

    tile, grp, _, _, tflags = map(np.asarray, tgmm_visits(starts, ends, bm, tiles_m))
    assert len(tile) == tiles_m + num_local
    np.testing.assert_array_equal(np.bincount(grp[(tflags & 2) > 0], minlength=num_local), 1)
    np.testing.assert_array_equal(np.bincount(grp[(tflags & 4) > 0], minlength=num_local), 1)
    assert (np.diff(grp) >= 0).all()


@pytest.mark.parametrize("backend, impl, want", [
    ("cpu", None, "xla"), ("gpu", None, "pallas_triton"), ("tpu", None, "pallas_tpu"),
    ("cpu", "pallas", "pallas_triton"), ("tpu", "pallas", "pallas_tpu"),
    ("gpu", "pallas", "pallas_triton"), ("cpu", "pallas_gpu", "pallas_triton"),
    ("cpu", "pallas_tpu", "pallas_tpu"), ("tpu", "tokamax", "tokamax"),
])
def test_impl_names(backend, impl, want):
    assert resolve_impl(impl, backend) == want


@pytest.mark.parametrize("backend, impl", [
    ("tpu", "pallas_gpu"), ("tpu", "pallas_triton"), ("gpu", "pallas_tpu"),
])
def test_impl_a_backend_cannot_run_is_refused_with_the_list(backend, impl):
    with pytest.raises(ValueError, match=rf"impl='{impl}' cannot run on backend '{backend}'; "
                                         r"it can run \(None, 'xla', 'pallas'"):
        resolve_impl(impl, backend)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_m=12), "block_m=12 must be a positive multiple of 8"),
    (dict(block_k=64), "block_k=64 must be a positive multiple of 128"),
    (dict(block_n=200), "block_n=200 must be a positive multiple of 128"),
], ids=["block_m", "block_k", "block_n"])
def test_tpu_block_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gmm(jnp.ones((8, 4)), jnp.ones((2, 4, 3)), jnp.asarray([4, 4], jnp.int32),
            impl="pallas_tpu", **kwargs)


def test_bf16_block_m_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="block_m=8 must be a positive multiple of 16 for bf"):
        gmm(jnp.ones((8, 4), jnp.bfloat16), jnp.ones((2, 4, 3), jnp.bfloat16),
            jnp.asarray([4, 4], jnp.int32), impl="pallas_tpu", block_m=8)


def test_zero_rows():
    sizes = jnp.asarray([0, 0], jnp.int32)
    out = gmm(jnp.ones((0, 16)), jnp.ones((2, 16, 8)), sizes, impl="pallas_tpu")
    assert out.shape == (0, 8)
    assert tgmm(jnp.ones((0, 16)), jnp.ones((0, 8)), sizes, 2, impl="pallas_tpu").shape == (2, 16, 8)
