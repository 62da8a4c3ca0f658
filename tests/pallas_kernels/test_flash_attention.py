"""flash_attention (Pallas interpret mode on CPU) vs reference_attention: values and gradients.

The grid is a covering sample, not the cartesian product: every mask feature
(causal, window, GQA/MQA, segments with fully masked rows, T != S), every T in
{63, 128, 300}, Dh in {32, 48 (padded), 64, 128}, fp32 and bf16 appear, with small
blocks so each sequence spans several blocks.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention, reference_attention
from pallas_kernels.attention.pallas_triton import flash_attention_pallas
from tests.helpers import rel_rms

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    t: int
    d: int
    h: int = 2
    kh: int = 2
    s: int | None = None
    causal: bool = True
    window: int | None = None
    seg: str | None = None  # None | "packed" (shared ids) | "pair" (some rows fully masked)
    dtype: type = jnp.float32
    block: int = 16

    @property
    def id(self) -> str:
        parts = ["causal" if self.causal else "full", f"T{self.t}"]
        if self.s is not None:
            parts.append(f"S{self.s}")
        parts += [f"d{self.d}", f"H{self.h}K{self.kh}"]
        if self.window is not None:
            parts.append(f"win{self.window}")
        if self.seg:
            parts.append(f"seg-{self.seg}")
        parts.append("bf16" if self.dtype == jnp.bfloat16 else "f32")
        return "-".join(parts)


CASES = [
    Case(t=63, d=32),
    Case(t=128, d=64, causal=False),
    Case(t=300, d=64, window=40, block=32),
    Case(t=63, d=32, causal=False, window=20),
    Case(t=128, d=128, h=4, kh=2, dtype=jnp.bfloat16),
    Case(t=63, d=48, h=3, kh=1, causal=False),
    Case(t=128, d=32, seg="pair"),
    Case(t=300, d=64, h=4, kh=1, window=64, seg="packed", dtype=jnp.bfloat16, block=32),
    Case(t=40, s=70, d=32, h=4, kh=2),
    Case(t=300, d=128, h=2, kh=1, block=64),
]


def make_inputs(c: Case, seed: int = 0):
    s = c.s or c.t
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (2, c.t, c.h, c.d), jnp.float32).astype(c.dtype)
    k = jax.random.normal(ks[1], (2, s, c.kh, c.d), jnp.float32).astype(c.dtype)
    v = jax.random.normal(ks[2], (2, s, c.kh, c.d), jnp.float32).astype(c.dtype)
    do = jax.random.normal(ks[3], (2, c.t, c.h, c.d), jnp.float32).astype(c.dtype)
    seg = None
    if c.seg == "packed":  # sorted ids: packed documents sharing one sequence
        seg = jnp.sort(jax.random.randint(ks[4], (2, c.t), 0, 4), axis=1)
    elif c.seg == "pair":  # query ids 7 never occur among keys: those rows see nothing
        kv_seg = jnp.sort(jax.random.randint(ks[4], (2, s), 0, 3), axis=1)
        q_seg = kv_seg.at[:, 5:20].set(7)
        seg = (q_seg, kv_seg)
    return q, k, v, do, seg


def run_both(c: Case, q, k, v, do, seg):
    """One jit: (out, grads) of the kernel and of the fp32 oracle on the same inputs."""
    kw = dict(causal=c.causal, window=c.window)

    def kernel(q, k, v, seg):
        return flash_attention(q, k, v, segment_ids=seg, impl="pallas", block_q=c.block,
                               block_k=c.block, block_q_bwd=c.block, block_k_bwd=c.block, **kw)

    def oracle(q, k, v, seg):  # fp32 on the same (possibly bf16-rounded) inputs
        f32 = lambda x: x.astype(jnp.float32)
        return reference_attention(f32(q), f32(k), f32(v), segment_ids=seg, **kw)

    @jax.jit
    def both(q, k, v, do, seg):
        out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, seg), q, k, v)
        ref, vjp_ref = jax.vjp(lambda q, k, v: oracle(q, k, v, seg), q, k, v)
        return (out, vjp(do)), (ref, vjp_ref(do.astype(jnp.float32)))

    return both(q, k, v, do, seg)


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_values_and_grads_match_reference(c: Case):
    q, k, v, do, seg = make_inputs(c)
    (out, grads), (ref, ref_grads) = run_both(c, q, k, v, do, seg)
    assert out.shape == q.shape and out.dtype == q.dtype
    tol = TOL[c.dtype]
    assert rel_rms(out, ref) < tol
    for name, g, gr in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == c.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert rel_rms(g, gr) < tol, name
    if c.seg == "pair":  # fully masked rows: exactly zero output, zero dq, no NaN
        np.testing.assert_array_equal(np.asarray(out[:, 5:20]), 0.0)
        np.testing.assert_array_equal(np.asarray(grads[0][:, 5:20]), 0.0)


def test_skipped_blocks_are_not_read():
    """Blocks outside the causal window band are skipped in forward and backward.

    NaN placed in v of key block 0 and in dO of the last query block can only
    reach outputs/gradients through blocks that the band excludes; if those
    blocks were visited (even fully masked) the NaN would leak via 0 * NaN.
    """
    c = Case(t=128, d=32, window=16, block=16)
    q, k, v, do, _ = make_inputs(c, seed=1)
    v_bad = v.at[:, :16].set(jnp.nan)   # key block 0: seen by query rows 0..30 only
    do_bad = do.at[:, 112:].set(jnp.nan)  # query block 7: sees key rows 97..127 only

    def kernel(q, k, v):
        return flash_attention(q, k, v, window=16, impl="pallas", block_q=16, block_k=16,
                               block_q_bwd=16, block_k_bwd=16)

    @jax.jit
    def both(q, k, v, v_bad, do, do_bad):
        out, vjp = jax.vjp(kernel, q, k, v_bad)
        ref, vjp_ref = jax.vjp(lambda q, k, v: reference_attention(q, k, v, window=16), q, k, v)
        return out, vjp(do_bad), ref, vjp_ref(do)

    out, (dq, dk, dv), ref, (rdq, rdk, rdv) = both(q, k, v, v_bad, do, do_bad)
    assert np.isnan(np.asarray(out[:, 16:31])).all()  # the injected NaN is live...
    assert rel_rms(out[:, 32:], ref[:, 32:]) < 1e-5  # ...yet never reaches these rows
    assert rel_rms(dq[:, 32:112], rdq[:, 32:112]) < 1e-5
    assert rel_rms(dk[:, 32:96], rdk[:, 32:96]) < 1e-5  # keys 0..31 see NaN rows of O
    assert rel_rms(dv[:, 16:96], rdv[:, 16:96]) < 1e-5


def test_default_dispatch_on_cpu_is_xla_and_matches_reference():
    c = Case(t=63, d=32, h=4, kh=2, window=9, seg="packed")
    q, k, v, _, seg = make_inputs(c, seed=2)
    out, xla, ref = jax.jit(lambda q, k, v, seg: (
        flash_attention(q, k, v, window=9, segment_ids=seg),
        flash_attention(q, k, v, window=9, segment_ids=seg, impl="xla"),
        reference_attention(q, k, v, window=9, segment_ids=seg)))(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(xla), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_jit_with_traced_segment_ids():
    c = Case(t=63, d=32, seg="packed")
    q, k, v, _, seg = make_inputs(c, seed=3)
    f = jax.jit(lambda q, k, v, seg: flash_attention(
        q, k, v, segment_ids=seg, impl="pallas", block_q=32, block_k=32))
    ref = reference_attention(q, k, v, segment_ids=seg)
    assert rel_rms(f(q, k, v, seg), ref) < 1e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(impl="cuda"), "impl='cuda' is not one of"),
    (dict(impl="pallas", interpret=False), "interpret=False cannot run on CPU"),
    (dict(impl="pallas", block_q=48), "block_q=48 must be a power of two"),
    (dict(window=0), "window=0 must be None or an int >= 1"),
    (dict(segment_ids=jnp.zeros((1, 5), jnp.int32)), "segment ids must be"),
], ids=["unknown-impl", "compiled-on-cpu", "block-not-pow2", "bad-window", "bad-segments"])
def test_dispatch_errors(kwargs, match):
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(ValueError, match=match):
        flash_attention(q, q, q, **kwargs)


@pytest.mark.parametrize("shapes, match", [
    (((1, 8, 3, 16), (1, 8, 2, 16)), "H=3 must be a multiple of kv heads K=2"),
    (((1, 8, 2, 16), (1, 8, 2, 32)), "head dim differs"),
    (((1, 8, 2, 16), (2, 8, 2, 16)), "batch differs"),
    (((8, 2, 16), (8, 2, 16)), r"q must be \[B, T, H, Dh\]"),
], ids=["heads-not-divisible", "head-dim-mismatch", "batch-mismatch", "rank"])
def test_shape_errors(shapes, match):
    qs, ks = shapes
    with pytest.raises(ValueError, match=match):
        flash_attention(jnp.ones(qs), jnp.ones(ks), jnp.ones(ks))


def test_lowers_to_triton_for_gpu():
    """Forward and both backward kernels lower to Triton IR for an abstract H100.

    This runs no GPU code (no PTX compile, no launch); it catches shapes and ops
    the Triton backend cannot lower (non-power-of-two tiles, unsupported dots).
    """
    from jax.sharding import AbstractDevice, AbstractMesh
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu"))
    q = jnp.ones((1, 200, 6, 48), jnp.bfloat16)  # G = 3, padded Dh
    kv = jnp.ones((1, 200, 2, 48), jnp.bfloat16)
    seg = jnp.zeros((1, 200), jnp.int32)

    def loss(q, k, v, seg):
        o = flash_attention_pallas(q, k, v, seg, seg, causal=True, window=100)
        return o.astype(jnp.float32).sum()

    with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(mesh):
        warnings.simplefilter("ignore", DeprecationWarning)  # the Triton backend's notice
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(
            lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3  # fwd, dq, dkv
