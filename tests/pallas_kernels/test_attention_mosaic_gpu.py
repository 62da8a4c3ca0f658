"""Mosaic GPU flash attention in the Mosaic GPU interpreter on CPU vs reference_attention.

Values and dQ/dK/dV of ``flash_attention_mosaic_gpu(..., interpret=True)`` (TMA
copies, barriers, warpgroup threads and wgmma simulated on CPU) against the fp32
oracle on the same 16-bit inputs. The grid is a covering sample kept small
(each interpreted CTA costs ~0.1-1 s): causal / full / window (one- and
two-sided), GQA and MQA, segment ids with fully masked rows, T != S, T in
{63, 128, 300}, Dh in {48 (padded), 64, 128}, bf16 and fp16, one and two compute
warpgroups, one case under the interpreter's race detector. Plus: skipped blocks
are never read, dispatch through ``flash_attention(impl="pallas_gpu")``, input
refusals, and lowering of all three kernels to Mosaic GPU for an abstract H100.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # get_races
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention import ops
from pallas_kernels.attention.mosaic_gpu import flash_attention_mosaic_gpu
from pallas_kernels.attention.reference import reference_attention
from tests.helpers import rel_rms

TOL_OUT, TOL_GRAD = 5e-3, 8e-3  # relative RMS, 16-bit inputs vs the fp32 oracle


@dataclasses.dataclass(frozen=True)
class Case:
    t: int
    d: int
    h: int = 2
    kh: int = 1
    s: int | None = None
    causal: bool = True
    window: int | None = None
    seg: str | None = None  # None | "packed" (shared ids) | "pair" (some rows fully masked)
    dtype: type = jnp.bfloat16
    kw: tuple = ()  # extra kernel settings, e.g. (("compute_wgs", 1),)
    races: bool = False  # run under the interpreter's race detector

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
        parts += [f"{k}{v}" for k, v in self.kw]
        if self.races:
            parts.append("race-checked")
        parts.append("bf16" if self.dtype == jnp.bfloat16 else "f16")
        return "-".join(parts)


CASES = [
    Case(t=63, d=64),
    Case(t=128, d=128, h=2, kh=2, causal=False, kw=(("compute_wgs", 1), ("stages", 3),
                                                   ("block_k", 64))),
    Case(t=300, d=64, window=40),
    Case(t=63, d=48, h=1, causal=False, window=20, dtype=jnp.float16),
    Case(t=128, d=64, h=2, kh=2, seg="pair", races=True),
    Case(t=300, d=128, window=64, seg="packed"),
    Case(t=40, s=200, d=64, kw=(("block_k", 64),)),
]


def make_inputs(c: Case, seed: int = 0):
    s = c.s or c.t
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (1, c.t, c.h, c.d), jnp.float32).astype(c.dtype)
    k = jax.random.normal(ks[1], (1, s, c.kh, c.d), jnp.float32).astype(c.dtype)
    v = jax.random.normal(ks[2], (1, s, c.kh, c.d), jnp.float32).astype(c.dtype)
    do = jax.random.normal(ks[3], (1, c.t, c.h, c.d), jnp.float32).astype(c.dtype)
    seg = None
    if c.seg == "packed":  # sorted ids: packed documents sharing one sequence
        seg = jnp.sort(jax.random.randint(ks[4], (1, c.t), 0, 4), axis=1)
    elif c.seg == "pair":  # query id 7 never occurs among keys: those rows see nothing
        kv_seg = jnp.sort(jax.random.randint(ks[4], (1, s), 0, 3), axis=1)
        seg = (kv_seg.at[:, 5:20].set(7), kv_seg)
    return q, k, v, do, seg


def _segs(seg):
    if seg is None:
        return None, None
    return seg if isinstance(seg, tuple) else (seg, seg)


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_values_and_grads_match_reference(c: Case):
    q, k, v, do, seg = make_inputs(c)
    q_seg, kv_seg = _segs(seg)
    kw = dict(causal=c.causal, window=c.window)
    interpret = plgpu.InterpretGPUParams(detect_races=True) if c.races else True

    @jax.jit
    def both(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention_mosaic_gpu(
            q, k, v, q_seg, kv_seg, interpret=interpret, **kw, **dict(c.kw)), q, k, v)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref, vjp_ref = jax.vjp(lambda q, k, v: reference_attention(
            q, k, v, segment_ids=seg, **kw), *f32)
        return (out, vjp(do)), (ref, vjp_ref(do.astype(jnp.float32)))

    (out, grads), (ref, ref_grads) = both(q, k, v, do)
    if c.races:  # TMA ring reuse, barriers and SMEM tiles shared by warpgroups are race-free
        assert not interpret_pallas_call.get_races().races_found
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_rms(out, ref) < TOL_OUT
    for name, g, gr in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == c.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert rel_rms(g, gr) < TOL_GRAD, name
    if c.seg == "pair":  # fully masked rows: exactly zero output and dq, no NaN
        np.testing.assert_array_equal(np.asarray(out[:, 5:20], np.float32), 0.0)
        np.testing.assert_array_equal(np.asarray(grads[0][:, 5:20], np.float32), 0.0)


def test_skipped_blocks_are_not_read():
    """Blocks outside the causal window band get no TMA copy and no wgmma.

    T = 256, window 32, 64-key blocks, CTAs of 128 query rows (two warpgroups).
    NaN in K/V of key block 0 (keys 0..63, seen by rows <= 94 only) can reach the
    output and dQ of rows >= 128 only if their CTA visits block 0 (0 * NaN in the
    P V and dS K products). NaN in dO of query rows 192..255 (seeing keys >= 161)
    can reach dK/dV of keys < 128 only if that key tile visits query block 3.
    """
    t, win = 256, 32
    c = Case(t=t, d=64, h=1, kh=1, window=win)
    q, k, v, do, _ = make_inputs(c, seed=1)
    kernel = lambda q, k, v: flash_attention_mosaic_gpu(q, k, v, window=win, block_k=64,
                                                        interpret=True)
    oracle = lambda q, k, v: reference_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                 v.astype(jnp.float32), window=win)

    @jax.jit
    def run(q, k, v, do):
        out, vjp = jax.vjp(kernel, q, k, v)
        return out, vjp(do)

    ref, vjp_ref = jax.vjp(oracle, q, k, v)
    rdq, rdk, rdv = vjp_ref(do.astype(jnp.float32))

    k_bad, v_bad = k.at[:, :64].set(jnp.nan), v.at[:, :64].set(jnp.nan)
    out, (dq, _, _) = run(q, k_bad, v_bad, do)
    assert np.isnan(np.asarray(out[:, :64], np.float32)).all()  # the NaN is live...
    assert rel_rms(out[:, 128:], ref[:, 128:]) < TOL_OUT  # ...yet never reaches these rows
    assert rel_rms(dq[:, 128:], rdq[:, 128:]) < TOL_GRAD

    do_bad = do.at[:, 192:].set(jnp.nan)
    _, (dq, dk, dv) = run(q, k, v, do_bad)
    assert np.isnan(np.asarray(dk[:, 200:], np.float32)).all()
    assert rel_rms(dk[:, :128], rdk[:, :128]) < TOL_GRAD
    assert rel_rms(dv[:, :128], rdv[:, :128]) < TOL_GRAD
    assert rel_rms(dq[:, :192], rdq[:, :192]) < TOL_GRAD


def test_dispatch_pallas_gpu_on_cpu():
    """impl="pallas_gpu" runs this kernel in the interpreter for 16-bit inputs, and the
    Triton kernel (generic interpreter) for fp32 ones, which wgmma cannot take."""
    assert ops.resolve_impl("pallas_gpu", "cpu") == "pallas_gpu"
    q, k, v, _, _ = make_inputs(Case(t=63, d=64, h=1, window=9))
    out = ops.flash_attention(q, k, v, window=9, impl="pallas_gpu")
    ref = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                              v.astype(jnp.float32), window=9)
    assert out.dtype == q.dtype and rel_rms(out, ref) < TOL_OUT
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    out = ops.flash_attention(q, k, v, window=9, impl="pallas_gpu")
    assert out.dtype == jnp.float32 and rel_rms(out, ref) < 1e-5
    with pytest.raises(ValueError, match="impl='pallas_gpu' with interpret=False cannot run"):
        ops.flash_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), impl="pallas_gpu",
                            interpret=False)


@pytest.mark.parametrize("dtypes, d, kwargs, match", [
    ((jnp.float32,) * 3, 64, {}, "wgmma needs one 16-bit dtype"),
    ((jnp.bfloat16, jnp.float16, jnp.bfloat16), 64, {}, "wgmma needs one 16-bit dtype"),
    ((jnp.bfloat16,) * 3, 192, {}, "head dim Dh=192 not allowed"),
    ((jnp.bfloat16,) * 3, 64, dict(block_k=96), "block_k=96 not allowed"),
    ((jnp.bfloat16,) * 3, 64, dict(compute_wgs=3), "compute_wgs=3 not allowed"),
], ids=["fp32", "mixed", "dh192", "block_k", "compute_wgs"])
def test_refusals(dtypes, d, kwargs, match):
    q, k, v = (jnp.ones((1, 8, 2, d), dt) for dt in dtypes)
    with pytest.raises(ValueError, match=match):
        flash_attention_mosaic_gpu(q, k, v, interpret=True, **kwargs)


def test_lowers_to_mosaic_gpu_for_h100():
    """Forward, dQ and dK/dV lower to Mosaic GPU kernels for an abstract H100 (sm_90).

    Runs the Mosaic GPU lowering (layouts, TMA descriptors, wgmma shapes) without
    a GPU or the CUDA plugin; the PTX compile is tests_aot's deviceless compile.
    """
    from jax.sharding import AbstractDevice, AbstractMesh
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda"))
    q = jax.ShapeDtypeStruct((1, 200, 4, 128), jnp.bfloat16)  # G = 2, padded T
    kv = jax.ShapeDtypeStruct((1, 200, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 200), jnp.int32)

    def loss(q, k, v, seg):
        o = flash_attention_mosaic_gpu(q, k, v, seg, seg, causal=True, window=100)
        return o.astype(jnp.float32).sum()

    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(
            lowering_platforms=("cuda",))
    assert lowered.as_text().count("custom_call @mosaic_gpu") == 3  # fwd, dq, dkv
