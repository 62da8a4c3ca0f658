"""gmm / tgmm (Pallas interpret mode on CPU, and the XLA buffers + overflow loop) vs
gmm_reference.

Values and gradients on ragged groups with empty groups, M not a multiple of the
row tile, rows beyond sum(group_sizes), group_offset (traced under jit), fp32/bf16.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gmm, gmm_reference, tgmm
from pallas_kernels.grouped_matmul import gmm_xla
from pallas_kernels.grouped_matmul.pallas_triton import GmmConfig, gmm_pallas
from tests.helpers import rel_rms

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    m: int
    sizes: tuple[int, ...]  # rows per global group
    num_local: int | None = None  # G of rhs (None: all groups)
    offset: int | None = None
    k: int = 48
    n: int = 40
    dtype: type = jnp.float32


CASES = [
    # 100 rows, tile 16: groups straddle tiles, two empty groups, 18 trailing rows
    Case("ragged-empty-M100", 100, (30, 0, 25, 7, 0, 20)),
    Case("ragged-empty-M100-bf16", 100, (30, 0, 25, 7, 0, 20), dtype=jnp.bfloat16),
    # one group owns everything except leading/trailing empties; M = 64 (tile multiple)
    Case("one-group-M64", 64, (0, 0, 64, 0), k=16, n=16),
    # shard holding global groups 2..4 of 6: rows of groups 0, 1, 5 are zero
    Case("offset2-of6", 100, (30, 0, 25, 7, 0, 20), num_local=3, offset=2),
    Case("offset1-tiny-groups-M300", 300, (100, 1, 1, 150, 0, 40), num_local=4, offset=1,
         k=32, n=24),
]


def make_inputs(c: Case, seed: int = 0):
    g = c.num_local or len(c.sizes)
    ks = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(ks[0], (c.m, c.k), jnp.float32).astype(c.dtype)
    rhs = jax.random.normal(ks[1], (g, c.k, c.n), jnp.float32).astype(c.dtype)
    dout = jax.random.normal(ks[2], (c.m, c.n), jnp.float32).astype(c.dtype)
    return lhs, rhs, jnp.asarray(c.sizes, jnp.int32), dout


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_values_and_grads_match_reference(c: Case, impl: str):
    lhs, rhs, sizes, dout = make_inputs(c)

    @jax.jit
    def both(lhs, rhs, sizes, dout, offset):
        off = None if c.offset is None else offset  # traced when given
        f = lambda x, w: gmm(x, w, sizes, impl=impl, group_offset=off,
                             block_m=16, block_k=16, block_n=16)
        r = lambda x, w: gmm_reference(x.astype(jnp.float32), w.astype(jnp.float32), sizes,
                                       group_offset=off)
        out, vjp = jax.vjp(f, lhs, rhs)
        ref, vjp_ref = jax.vjp(r, lhs, rhs)
        return (out, vjp(dout)), (ref, vjp_ref(dout.astype(jnp.float32)))

    (out, grads), (ref, ref_grads) = both(lhs, rhs, sizes, dout, jnp.int32(c.offset or 0))
    assert out.shape == (c.m, c.n) and out.dtype == c.dtype
    tol = TOL[c.dtype]
    assert rel_rms(out, ref) < tol
    for name, g, gr in zip(("dlhs", "drhs"), grads, ref_grads):
        assert g.dtype == c.dtype, name
        assert rel_rms(g, gr) < tol, name
    # rows that no local group owns are exactly zero, and so is their gradient
    ends = np.cumsum(c.sizes)
    first = 0 if c.offset is None else ends[c.offset] - c.sizes[c.offset]
    last = ends[-1] if c.offset is None else ends[c.offset + (c.num_local or 0) - 1]
    np.testing.assert_array_equal(np.asarray(out[:first]), 0)
    np.testing.assert_array_equal(np.asarray(out[last:]), 0)
    np.testing.assert_array_equal(np.asarray(grads[0][last:]), 0)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_all_groups_empty_gives_zeros(impl):
    lhs, rhs, _, dout = make_inputs(Case("empty", 40, (0, 0, 0), k=16, n=16))
    sizes = jnp.zeros((3,), jnp.int32)
    f = lambda x, w: gmm(x, w, sizes, impl=impl, block_m=16, block_k=16, block_n=16)
    out, (dlhs, drhs) = jax.jit(lambda x, w, dy: (f(x, w), jax.vjp(f, x, w)[1](dy)))(
        lhs, rhs, dout)
    for x in (out, dlhs, drhs):
        np.testing.assert_array_equal(np.asarray(x), 0)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_tgmm_matches_reference_weight_gradient(impl):
    c = CASES[0]
    lhs, rhs, sizes, dout = make_inputs(c, seed=1)
    _, vjp_ref = jax.vjp(lambda w: gmm_reference(lhs, w, sizes), rhs)
    (ref,) = vjp_ref(dout)
    got = tgmm(lhs, dout, sizes, rhs.shape[0], impl=impl, block_m=16)
    assert got.shape == rhs.shape
    assert rel_rms(got, ref) < 1e-5
    np.testing.assert_array_equal(np.asarray(got)[[1, 4]], 0)  # empty groups


@pytest.mark.parametrize("capacity", [1, 8, 100],
                         ids=["cap1-all-overflow", "cap8", "cap100-no-loop"])
def test_xla_buffer_and_overflow_split(capacity):
    """impl="xla": any split between the batched buffers and the overflow loop is exact."""
    c = CASES[4]  # group offset, tiny groups, one group of 150 rows
    lhs, rhs, sizes, dout = make_inputs(c, seed=3)
    f = lambda x, w: gmm_xla(x, w, sizes, group_offset=jnp.int32(c.offset), block_m=16,
                             capacity=capacity)
    r = lambda x, w: gmm_reference(x, w, sizes, group_offset=c.offset)
    (out, grads), (ref, ref_grads) = jax.jit(
        lambda x, w, dy: tuple((o, vjp(dy)) for o, vjp in (jax.vjp(f, x, w), jax.vjp(r, x, w))))(
        lhs, rhs, dout)
    assert rel_rms(out, ref) < 1e-5
    for g, gr in zip(grads, ref_grads):
        assert rel_rms(g, gr) < 1e-5
    got = tgmm(lhs, dout, sizes, rhs.shape[0], group_offset=c.offset, impl="xla", block_m=16)
    assert rel_rms(got, ref_grads[1]) < 1e-5


def test_default_dispatch_on_cpu_is_xla():
    lhs, rhs, sizes, _ = make_inputs(CASES[0], seed=2)
    ref = gmm_reference(lhs, rhs, sizes)
    assert rel_rms(gmm(lhs, rhs, sizes), ref) < 1e-5


@pytest.mark.parametrize("args, kwargs, match", [
    (((8, 4), (2, 4, 3), (4, 4)), dict(impl="triton"), "impl='triton' is not one of"),
    (((8, 4), (2, 4, 3), (4, 4)), dict(impl="pallas", interpret=False),
     "interpret=False cannot run on CPU"),
    (((8, 4), (2, 4, 3), (4, 4)), dict(impl="pallas", block_m=24),
     "block_m=24 must be a power of two"),
    (((8, 5), (2, 4, 3), (4, 4)), {}, "contraction dims differ"),
    (((8, 4), (2, 4, 3), (4, 2, 2)), {}, "group_sizes has 3 entries but rhs has G=2"),
    (((8, 4), (3, 4, 3), (4, 4)), dict(group_offset=0), "fewer than rhs's G=3"),
    (((8, 4), (4, 3), (4, 4)), {}, r"rhs \[G, K, N\]"),
], ids=["unknown-impl", "compiled-on-cpu", "block-not-pow2", "k-mismatch",
        "sizes-length", "offset-sizes-length", "rhs-rank"])
def test_dispatch_errors(args, kwargs, match):
    lhs_shape, rhs_shape, sizes = args
    with pytest.raises(ValueError, match=match):
        gmm(jnp.ones(lhs_shape), jnp.ones(rhs_shape), jnp.asarray(sizes, jnp.int32), **kwargs)


def test_float_group_sizes_rejected():
    with pytest.raises(ValueError, match="group_sizes must be a 1-D integer array"):
        gmm(jnp.ones((8, 4)), jnp.ones((2, 4, 3)), jnp.asarray([4.0, 4.0]))


def test_lowers_to_triton_for_gpu():
    """gmm forward, d lhs (transposed gmm) and tgmm lower to Triton IR (no GPU run)."""
    from jax.sharding import AbstractDevice, AbstractMesh
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu"))
    lhs = jnp.ones((300, 96), jnp.bfloat16)
    rhs = jnp.ones((5, 96, 200), jnp.bfloat16)
    sizes = jnp.array([100, 0, 50, 100, 50], jnp.int32)

    dout = jnp.ones((300, 200), jnp.bfloat16)

    def f(lhs, rhs, dout):
        out, vjp = jax.vjp(lambda x, w: gmm_pallas(x, w, sizes, cfg=GmmConfig()), lhs, rhs)
        return out, vjp(dout)

    with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(mesh):
        warnings.simplefilter("ignore", DeprecationWarning)  # the Triton backend's notice
        text = jax.jit(f).trace(lhs, rhs, dout).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # gmm, gmm(rhs^T), tgmm
