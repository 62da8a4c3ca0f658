"""Mosaic TPU flash attention in TPU interpret mode on CPU vs reference_attention.

The kernels run through ``flash_attention(impl="pallas_tpu")``, which on CPU uses
``pltpu.InterpretParams`` (TPU memory spaces, DMAs and grid pipeline emulated).
Interpret mode is slow (mostly tracing/compiling each kernel), so the grid is a
covering sample, not the cartesian product: causal, window (causal and not),
GQA and MQA, segment ids (packed, and a pair with fully masked rows), T != S,
T in {63, 128, 300}, Dh in {64, 128} plus 48 (padded), fp32 and bf16 each appear.
Tolerances are relative RMS against the fp32 oracle on the same inputs:
fp32 1e-5; bf16 5e-3 on outputs and 8e-3 on gradients. Blocks are 128 (the
smallest TPU block) so sequences span several blocks and the band skipping is
exercised. The cheap tests at the end cover the block bands, block fitting and the
dispatcher's impl resolution and argument errors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import flash_attention, reference_attention
from pallas_kernels.attention import ops
from pallas_kernels.attention.pallas_tpu import fit_blocks
from pallas_kernels.attention.pallas_tpu_common import TpuFlashConfig, kv_band, q_band
from pallas_kernels.attention.reference import visible
from tests.helpers import rel_rms

TOL_OUT = {jnp.float32: 1e-5, jnp.bfloat16: 5e-3}
TOL_GRAD = {jnp.float32: 1e-5, jnp.bfloat16: 8e-3}
BLOCKS = dict(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)


@dataclasses.dataclass(frozen=True)
class Case:
    t: int
    d: int
    h: int = 2
    kh: int = 2
    s: int | None = None
    b: int = 1
    causal: bool = True
    window: int | None = None
    seg: str | None = None  # None | "packed" (shared ids) | "pair" (rows 5..19 see nothing)
    dtype: type = jnp.float32

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
    Case(t=63, d=64),
    Case(t=128, d=128, h=4, kh=2, causal=False),  # GQA, one block
    Case(t=300, d=64, h=4, kh=1, window=100, dtype=jnp.bfloat16),  # MQA, band skipping
    Case(t=300, d=128, seg="pair", b=2),  # fully masked rows, three blocks
    Case(t=128, d=128, h=4, kh=2, causal=False, window=40, seg="packed",
         dtype=jnp.bfloat16),
    Case(t=63, s=300, d=48, h=3, kh=1, causal=False, window=200),  # T != S, padded Dh
]


def make_inputs(c: Case, seed: int = 0):
    s = c.s or c.t
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (c.b, c.t, c.h, c.d), jnp.float32).astype(c.dtype)
    k = jax.random.normal(ks[1], (c.b, s, c.kh, c.d), jnp.float32).astype(c.dtype)
    v = jax.random.normal(ks[2], (c.b, s, c.kh, c.d), jnp.float32).astype(c.dtype)
    do = jax.random.normal(ks[3], (c.b, c.t, c.h, c.d), jnp.float32).astype(c.dtype)
    seg = None
    if c.seg == "packed":  # sorted ids: packed documents sharing one sequence
        seg = jnp.sort(jax.random.randint(ks[4], (c.b, c.t), 0, 4), axis=1)
    elif c.seg == "pair":  # query id 7 never occurs among keys: those rows see nothing
        kv_seg = jnp.sort(jax.random.randint(ks[4], (c.b, s), 0, 3), axis=1)
        seg = (kv_seg.at[:, 5:20].set(7), kv_seg)
    return q, k, v, do, seg


def run_both(c: Case, q, k, v, do, seg, interpret=None):
    """One jit: (out, grads) of the TPU kernel and of the fp32 oracle on the same inputs."""
    kw = dict(causal=c.causal, window=c.window)

    def kernel(q, k, v, seg):
        return flash_attention(q, k, v, segment_ids=seg, impl="pallas_tpu",
                               interpret=interpret, **BLOCKS, **kw)

    def oracle(q, k, v, seg):  # fp32 on the same (possibly bf16-rounded) inputs
        f32 = lambda x: x.astype(jnp.float32)
        return reference_attention(f32(q), f32(k), f32(v), segment_ids=seg, **kw)

    @jax.jit
    def both(q, k, v, do, seg):
        out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, seg), q, k, v)
        ref, vjp_ref = jax.vjp(lambda q, k, v: oracle(q, k, v, seg), q, k, v)
        return (out, vjp(do)), (ref, vjp_ref(do.astype(jnp.float32)))

    return both(q, k, v, do, seg)


def check(c: Case, out, grads, ref, ref_grads, q):
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_rms(out, ref) < TOL_OUT[c.dtype]
    for name, g, gr in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == c.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert rel_rms(g, gr) < TOL_GRAD[c.dtype], name


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_values_and_grads_match_reference(c: Case):
    q, k, v, do, seg = make_inputs(c)
    (out, grads), (ref, ref_grads) = run_both(c, q, k, v, do, seg)
    check(c, out, grads, ref, ref_grads, q)
    if c.seg == "pair":  # fully masked rows: exactly zero output and dq, no NaN
        np.testing.assert_array_equal(np.asarray(out[:, 5:20]), 0.0)
        np.testing.assert_array_equal(np.asarray(grads[0][:, 5:20]), 0.0)


def test_race_detector_two_cores():
    """Race detector on, two emulated TensorCores, parallel grid axes shuffled.

    Two cores split the grid axes marked "parallel"; a race (e.g. two cores
    accumulating one dK block) raises. The shuffle checks the "parallel" claim:
    results must not depend on the order of those axes.
    """
    c = Case(t=256, d=64, h=4, kh=2, window=150, seg="packed")
    q, k, v, do, seg = make_inputs(c, seed=4)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=0)
    (out, grads), (ref, ref_grads) = run_both(c, q, k, v, do, seg, interpret=params)
    check(c, out, grads, ref, ref_grads, q)


def test_skipped_blocks_are_not_read():
    """Blocks outside the causal window band are neither read nor computed.

    T = 384 in 128-blocks with window 100: query block 0 sees key block 0 only,
    query block 2 sees key blocks 1-2. NaN in v of key block 2 and in dO of query
    block 0 can reach the checked rows only through blocks the band excludes
    (visiting them, even masked, would leak the NaN via 0 * NaN).
    """
    c = Case(t=384, d=64, window=100)
    q, k, v, do, _ = make_inputs(c, seed=1)
    v_bad = v.at[:, 256:].set(jnp.nan)
    do_bad = do.at[:, :128].set(jnp.nan)

    def kernel(q, k, v):
        return flash_attention(q, k, v, window=100, impl="pallas_tpu", **BLOCKS)

    @jax.jit
    def both(q, k, v, v_bad, do, do_bad):
        out, vjp = jax.vjp(kernel, q, k, v_bad)
        ref, vjp_ref = jax.vjp(lambda q, k, v: reference_attention(q, k, v, window=100),
                               q, k, v)
        return out, vjp(do_bad), ref, vjp_ref(do)

    out, (dq, _, dv), ref, (rdq, _, rdv) = both(q, k, v, v_bad, do, do_bad)
    assert np.isnan(np.asarray(out[:, 256:])).all()  # the injected NaN is live...
    assert rel_rms(out[:, :256], ref[:, :256]) < 1e-5  # ...yet never reaches these rows
    assert np.isnan(np.asarray(dq[:, :128])).all()
    assert rel_rms(dq[:, 128:256], rdq[:, 128:256]) < 1e-5
    # dV = P^T dO: key blocks 1-2 must not visit query block 0 (NaN dO). dK is not
    # checked: it also reads delta = rowsum(dO * O), NaN on rows 256+ through O.
    assert rel_rms(dv[:, 128:], rdv[:, 128:]) < 1e-5


def test_block_bands():
    """The scalar-prefetched bands list exactly the blocks with a visible (q, k) pair."""
    for causal, window, t, s in ((True, None, 300, 300), (True, 100, 384, 384),
                                 (False, 200, 63, 300), (False, 40, 640, 512)):
        cfg = TpuFlashConfig(t=t, s=s, causal=causal, window=window, scale=1.0,
                             block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)
        tp, sp = -(-t // 128) * 128, -(-s // 128) * 128
        mask = np.asarray(visible(jnp.arange(t), jnp.arange(s), causal=causal, window=window))
        need = np.zeros((tp // 128, sp // 128), bool)
        for i in range(tp // 128):
            for j in range(sp // 128):
                need[i, j] = mask[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].any()
        start, count = kv_band(tp // 128, 128, sp // 128, 128, cfg)
        got = np.zeros_like(need)
        for i in range(tp // 128):
            got[i, start[i]:start[i] + count[i]] = True
        np.testing.assert_array_equal(got, need)
        start, count = q_band(sp // 128, 128, tp // 128, 128, cfg)
        got = np.zeros_like(need)
        for j in range(sp // 128):
            got[start[j]:start[j] + count[j], j] = True
        np.testing.assert_array_equal(got, need)


@pytest.mark.parametrize("n, blocks, want", [
    (63, (512, 256), (128, (128, 128))),
    (300, (512, 256), (384, (384, 128))),
    (1000, (512, 256), (1024, (512, 256))),
    (8192, (512, 256), (8192, (512, 256))),
])
def test_fit_blocks(n, blocks, want):
    assert fit_blocks(n, blocks) == want


@pytest.mark.parametrize("impl, backend, want", [
    (None, "cpu", "xla"), (None, "tpu", "pallas_tpu"), ("pallas", "tpu", "pallas_tpu"),
    ("pallas", "cpu", "pallas_triton"), ("pallas_tpu", "cpu", "pallas_tpu"),
    ("pallas_triton", "gpu", "pallas_triton"), ("xla", "tpu", "xla"),
])
def test_resolve_impl(impl, backend, want):
    assert ops.resolve_impl(impl, backend) == want


@pytest.mark.parametrize("impl, backend", [("pallas_tpu", "gpu"), ("pallas_triton", "tpu"),
                                           ("pallas_gpu", "tpu")])
def test_impl_refused_on_backend_lists_allowed(impl, backend):
    with pytest.raises(ValueError, match=rf"impl='{impl}' cannot run on backend '{backend}'; "
                                         r"it can run \(None, 'pallas', 'xla'"):
        ops.resolve_impl(impl, backend)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_q=192), "block_q=192 must be a multiple of 128"),
    (dict(block_k_bwd=64), "block_k_bwd=64 must be a multiple of 128"),
    (dict(interpret="yes"), "interpret='yes' must be None, a bool or a pltpu.InterpretParams"),
], ids=["block-q", "block-k-bwd", "interpret"])
def test_tpu_argument_errors(kwargs, match):
    q = jnp.ones((1, 8, 2, 64))
    with pytest.raises(ValueError, match=match):
        flash_attention(q, q, q, impl="pallas_tpu", **kwargs)


@pytest.mark.parametrize("platform, kind, want", [
    ("tpu", "TPU v5 lite", "pallas_tpu"),
    ("cuda", "NVIDIA H100 80GB HBM3", "pallas_gpu"),
    ("cuda", "NVIDIA A100-SXM4-80GB", "pallas_triton"),
])
def test_default_impl_follows_the_abstract_mesh(platform, kind, want):
    """Deviceless compiles set an abstract device: impl=None must pick its kernel."""
    from jax.sharding import AbstractDevice, AbstractMesh
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind=kind, num_cores=None, platform=platform))
    with jax.sharding.use_abstract_mesh(mesh):
        assert ops.resolve_impl(None, ops.current_backend()) == want
