"""tokamax as an implementation (its XLA paths on CPU) vs archlab's references.

gmm/tgmm through ``tokamax.ragged_dot``: ragged and empty groups, rows beyond
``sum(group_sizes)``, a traced group offset, fp32 and bf16, values and gradients.
Attention through ``tokamax.dot_product_attention``: causal/GQA, sliding window
(causal and not), segment ids, kv_len with fully masked rows, bf16, values and
gradients; and the features that do not map are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gmm, gmm_reference, tgmm
from pallas_kernels.attention.reference import reference_attention
from pallas_kernels.attention.tokamax import tokamax_attention
from tests.helpers import rel_rms

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


# --------------------------------------------------------------------------------------
# gmm

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_gmm_values_and_grads(dtype):
    m, k, n = 100, 48, 40
    ks = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(ks[0], (m, k), jnp.float32).astype(dtype)
    rhs6 = jax.random.normal(ks[1], (6, k, n), jnp.float32).astype(dtype)
    dout = jax.random.normal(ks[2], (m, n), jnp.float32).astype(dtype)
    sizes = jnp.asarray((30, 0, 25, 7, 0, 20), jnp.int32)  # 18 rows owned by no group

    def run(lhs, rhs, sizes, dout, offset, with_offset):
        off = offset if with_offset else None
        f = lambda x, w: gmm(x, w, sizes, impl="tokamax", group_offset=off)
        r = lambda x, w: gmm_reference(x.astype(jnp.float32), w.astype(jnp.float32), sizes,
                                       group_offset=off)
        out, vjp = jax.vjp(f, lhs, rhs)
        ref, vjp_ref = jax.vjp(r, lhs, rhs)
        direct = tgmm(lhs, dout, sizes, rhs.shape[0], impl="tokamax", group_offset=off)
        return (out, *vjp(dout), direct), (ref, *vjp_ref(dout.astype(jnp.float32)))

    run = jax.jit(run, static_argnums=5)
    # whole model, then the shard holding global groups 2..4 (traced offset)
    for rhs, off, first, last in ((rhs6, None, 0, 82), (rhs6[:3], 2, 30, 62)):
        (out, dlhs, drhs, direct), (ref, rdlhs, rdrhs) = run(
            lhs, rhs, sizes, dout, jnp.int32(off or 0), off is not None)
        for name, x, r in (("out", out, ref), ("dlhs", dlhs, rdlhs), ("drhs", drhs, rdrhs),
                           ("tgmm", direct, rdrhs)):
            assert x.dtype == dtype and x.shape == r.shape, name
            assert rel_rms(x, r) < TOL[dtype], (name, off, rel_rms(x, r))
        for x in (out, dlhs):  # rows of other shards / no group: exactly zero
            np.testing.assert_array_equal(np.asarray(x[:first], np.float32), 0)
            np.testing.assert_array_equal(np.asarray(x[last:], np.float32), 0)


# --------------------------------------------------------------------------------------
# attention

def _qkv(b, t, h, kh, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, kh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, kh, d), jnp.float32).astype(dtype)
    dout = jax.random.normal(ks[3], q.shape, jnp.float32).astype(dtype)
    return q, k, v, dout


SEG = jnp.stack([jnp.repeat(jnp.arange(3), 16)[:37], jnp.zeros(37, jnp.int32)])  # [2, 37]


@pytest.mark.parametrize("kwargs, dtype", [
    (dict(causal=True), jnp.bfloat16),
    (dict(causal=True, window=5), jnp.float32),
    (dict(causal=False, window=6, segment_ids=SEG), jnp.float32),
    (dict(causal=True, window=3, kv_len=10), jnp.float32),  # rows t >= 12 see no key
], ids=["causal-gqa-bf16", "causal-window", "bidir-window-segments", "window-kv_len-empty-rows"])
def test_attention_values_and_grads(kwargs, dtype):
    q, k, v, dout = _qkv(2, 37, 4, 2, 16, dtype)  # GQA 4/2, T not a power of two

    @jax.jit
    def run(q, k, v, dout):
        out, vjp = jax.vjp(lambda *a: tokamax_attention(*a, **kwargs), q, k, v)
        f32 = lambda x: x.astype(jnp.float32)
        ref, vjp_ref = jax.vjp(lambda *a: reference_attention(*a, **kwargs),
                               f32(q), f32(k), f32(v))
        return (out, *vjp(dout)), (ref, *vjp_ref(f32(dout)))

    got, want = run(q, k, v, dout)
    tol = 5e-3 if dtype == jnp.bfloat16 else TOL[dtype]
    for name, x, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert x.dtype == dtype, name
        assert np.isfinite(np.asarray(x, np.float32)).all(), name
        assert rel_rms(x, r) < (tol if name == "out" else 8e-3 if dtype == jnp.bfloat16
                                else tol), (name, rel_rms(x, r))
    if "kv_len" in kwargs:  # fully masked rows are zeros, not NaN
        np.testing.assert_array_equal(np.asarray(got[0][:, 12:]), 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(q_offset=3), "q_offset=3 is not supported"),
    (dict(alibi_slopes=jnp.ones(4)), "alibi_slopes is not supported"),
    (dict(impl="xla"), "impl='xla' not allowed"),
    (dict(window=0), "window=0 must be None or an int >= 1"),
])
def test_attention_features_that_do_not_map_are_refused(kwargs, match):
    q, k, v, _ = _qkv(1, 8, 2, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match=match):
        tokamax_attention(q, k, v, **kwargs)


def test_flash_attention_dispatches_tokamax():
    """``flash_attention(impl="tokamax")`` passes masks and segment ids through."""
    from pallas_kernels import flash_attention
    q, k, v, _ = _qkv(2, 37, 4, 2, 16, jnp.float32, seed=1)
    kw = dict(causal=True, window=7, segment_ids=SEG)
    got = jax.jit(lambda q, k, v: flash_attention(q, k, v, impl="tokamax", **kw))(q, k, v)
    assert rel_rms(got, reference_attention(q, k, v, **kw)) < 1e-5
