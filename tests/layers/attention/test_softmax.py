"""Attention: blockwise and the fused dense path == the reference (values, gradients),
calls into a KV cache (q_offset / kv_len) == the reference, GQA == MHA with repeated
K/V, masked rows, the module's decode path, and configuration errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import AttentionConfig
from layers.attention.blockwise import blockwise_attention, cached_attention
from layers.attention.dense import dense_attention
from layers.positions import alibi_slopes
from pallas_kernels.attention.reference import reference_attention
from tests.helpers import normal, rel_rms

CASES = {
    # id: (B, T, H, K, Dh, causal, window, segments, alibi, dtype, block_q, block_k)
    "causal-T63-gqa": (2, 63, 6, 2, 16, True, None, False, False, jnp.float32, 16, 8),
    "window-T70-mqa-seg": (2, 70, 4, 1, 8, True, 20, True, False, jnp.float32, 16, 16),
    "bidir-T50-seg-alibi": (1, 50, 4, 4, 8, False, None, True, True, jnp.float32, 32, 16),
    "bidir-window-T45": (2, 45, 2, 2, 12, False, 9, False, False, jnp.float32, 8, 16),
    "causal-bf16-T40": (2, 40, 4, 2, 16, True, None, False, False, jnp.bfloat16, 16, 16),
}


def _inputs(b, t, h, k, d, dtype, seed=0):
    return (normal(seed, (b, t, h, d), dtype), normal(seed + 1, (b, t, k, d), dtype),
            normal(seed + 2, (b, t, k, d), dtype))


@pytest.mark.parametrize("path", ["blockwise", "dense"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fast_paths_equal_reference_values_and_grads(case, path):
    b, t, h, k, d, causal, window, seg, ali, dtype, bq, bk = CASES[case]
    q, kk, v = _inputs(b, t, h, k, d, dtype)
    sid = (jnp.arange(t)[None, :] >= t // 3).astype(jnp.int32).repeat(b, 0) if seg else None
    slopes = alibi_slopes(h) if ali else None
    kw = dict(causal=causal, window=window, segment_ids=sid, alibi_slopes=slopes)
    if path == "blockwise":
        fast = lambda q, k, v: blockwise_attention(q, k, v, block_q=bq, block_k=bk, **kw)
    else:
        fast = lambda q, k, v: dense_attention(q, k, v, **kw)
    ref = lambda q, k, v: reference_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                              v.astype(jnp.float32), **kw)
    w = normal(9, q.shape)

    @jax.jit
    def both(q, k, v):  # one compile: outputs and gradients of both paths
        vjp = lambda f: jax.value_and_grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w),
                                           argnums=(0, 1, 2))(q, k, v)[1]
        return fast(q, k, v), ref(q, k, v), vjp(fast), vjp(ref)
    out, out_ref, g_fast, g_ref = both(q, kk, v)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert out.dtype == dtype
    assert rel_rms(out.astype(jnp.float32), out_ref) < tol
    for gf, gr in zip(g_fast, g_ref):
        assert rel_rms(gf.astype(jnp.float32), gr) < (1e-5 if dtype == jnp.float32 else 3e-2)


def test_gqa_equals_mha_with_repeated_kv_and_kh_equal_h_is_mha():
    q, k, v = _inputs(2, 21, 6, 2, 8, jnp.float32, seed=3)
    gqa = reference_attention(q, k, v)
    mha = reference_attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2))
    assert rel_rms(gqa, mha) < 1e-6
    # per-head softmax written out in numpy (K == H)
    kr, vr = np.repeat(np.asarray(k), 3, 2), np.repeat(np.asarray(v), 3, 2)
    s = np.einsum("bthd,bshd->bhts", np.asarray(q), kr) / np.sqrt(8)
    s = np.where(np.tril(np.ones((21, 21), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert rel_rms(mha, np.einsum("bhts,bshd->bthd", p, vr)) < 1e-5
    bw = blockwise_attention(q, k, v, block_q=8, block_k=8)
    assert rel_rms(bw, gqa) < 1e-5


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = _inputs(1, 16, 2, 2, 8, jnp.float32, seed=5)
    q_seg = jnp.array([[0] * 8 + [2] * 8])  # segment 2 has no keys
    kv_seg = jnp.zeros((1, 16), jnp.int32)
    for fn in (reference_attention, dense_attention,
               lambda *a, **kw: blockwise_attention(*a, block_q=8, block_k=8, **kw)):
        f = lambda q: fn(q, k, v, causal=False, segment_ids=(q_seg, kv_seg))
        out, g = jax.jit(lambda q: (f(q), jax.grad(lambda q: f(q).sum())(q)))(q)
        assert np.all(np.isfinite(np.asarray(out)))
        assert np.all(np.asarray(out)[0, 8:] == 0)
        assert np.all(np.asarray(out)[0, :8] != 0)
        assert np.all(np.isfinite(np.asarray(g)))


CACHE_CASES = {
    # id: (T new queries, S cache slots, q_offset, window, alibi, block_q, block_k)
    "prefill-empty-T13": (13, 40, 0, None, False, 4, 8),
    "chunk-mid-cache-window-alibi": (7, 33, 10, 5, True, 4, 8),
    "decode-T1": (1, 40, 17, None, False, 128, 8),
    "decode-T1-last-slot-window": (1, 64, 63, 7, True, 1, 16),
    "prefill-one-block": (16, 64, 0, None, False, 16, 16),
}


@pytest.mark.parametrize("path", ["blockwise", "dense"])
@pytest.mark.parametrize("case", list(CACHE_CASES), ids=list(CACHE_CASES))
def test_calls_into_a_cache_equal_reference_values_and_grads(case, path):
    """T queries at q_offset against a cache filled up to kv_len = q_offset + T (the
    prefill / decode calls of the layer), unfilled slots holding garbage."""
    t, s, off, window, ali, bq, bk = CACHE_CASES[case]
    q = normal(20, (2, t, 6, 8))
    ck, cv = normal(21, (2, s, 2, 8)), normal(22, (2, s, 2, 8))
    slopes = alibi_slopes(6) if ali else None
    kv_len = off + t
    if path == "blockwise":
        fast = lambda q, k, v: cached_attention(q, k, v, jnp.int32(off), jnp.int32(kv_len),
                                                window=window, alibi_slopes=slopes,
                                                block_q=bq, block_k=bk)
    else:
        fast = lambda q, k, v: dense_attention(q, k, v, window=window, alibi_slopes=slopes,
                                               q_offset=jnp.int32(off), kv_len=jnp.int32(kv_len))
    ref = lambda q, k, v: reference_attention(q, k, v, window=window, alibi_slopes=slopes,
                                              q_offset=off, kv_len=kv_len)
    w = normal(23, q.shape)
    grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, ck, cv)
    out, out_ref, g_fast, g_ref = jax.jit(
        lambda: (fast(q, ck, cv), ref(q, ck, cv), grads(fast), grads(ref)))()
    assert rel_rms(out, out_ref) < 1e-5
    for gf, gr in zip(g_fast, g_ref):
        assert rel_rms(gf, gr) < 1e-5
    assert np.all(np.asarray(g_fast[1])[:, kv_len:] == 0)  # unfilled slots get no gradient


@pytest.mark.parametrize("attn_impl,window,position", [("dense", None, "rope"),
                                                      ("blockwise", None, "rope"),
                                                      ("blockwise", 7, "alibi")],
                         ids=["dense-rope", "blockwise-rope", "blockwise-window-alibi"])
def test_attention_module_prefill_decode_equals_parallel(attn_impl, window, position):
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2, attn_impl=attn_impl, window=window,
                          position=position, block_q=8, block_k=8)
    mod = cfg.make(32, jnp.float32, jnp.float32)
    x = normal(11, (2, 19, 32))
    pos = jnp.broadcast_to(jnp.arange(19), (2, 19))
    p = mod.init(jax.random.PRNGKey(0), x, positions=pos)
    full, none_cache, aux = jax.jit(lambda p, x: mod.apply(p, x, positions=pos))(p, x)
    assert none_cache is None and aux == {}
    step = jax.jit(lambda p, x, pos, c: mod.apply(p, x, positions=pos, cache=c))
    cache = cfg.init_cache(32, 2, 32, jnp.float32)
    y, cache, _ = step(p, x[:, :9], pos[:, :9], cache)
    outs = [y]
    for t in range(9, 19):
        y, cache, _ = step(p, x[:, t:t + 1], pos[:, t:t + 1], cache)
        outs.append(y)
    assert int(cache.index) == 19
    assert rel_rms(jnp.concatenate(outs, 1), full) < 1e-5
    assert cfg.state_size(32, 100) == 2 * 100 * 2 * 8 * 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_heads=6, n_kv_heads=4), "divisible"),
    (dict(n_heads=5), "d_model=64 must be divisible"),
    (dict(n_heads=4, head_dim=15), "odd"),
    (dict(attn_impl="flash"), "attn_impl"),
    (dict(n_heads=0), "n_heads"),
    (dict(window=-3), "window"),
])
def test_attention_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(**kwargs).validate(64, "model.pattern.0.mixer")


def test_pallas_impl_through_the_layer_equals_dense():
    """The layer's attn_impl switch reaches the Pallas kernel (interpret mode on CPU)."""
    dense = AttentionConfig(n_heads=4, n_kv_heads=2, attn_impl="dense")
    pallas = AttentionConfig(n_heads=4, n_kv_heads=2, attn_impl="pallas")
    x = normal(12, (2, 20, 32))
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
    p = dense.make(32, jnp.float32, jnp.float32).init(jax.random.PRNGKey(0), x, positions=pos)

    def run(cfg):
        mod = cfg.make(32, jnp.float32, jnp.float32)
        f = lambda p, x: jnp.sum(mod.apply(p, x, positions=pos)[0] ** 2)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(p, x)
    (ld, (gpd, gxd)), (lp, (gpp, gxp)) = run(dense), run(pallas)
    assert abs(float(ld) - float(lp)) < 1e-5 * abs(float(ld))
    assert rel_rms(gxp, gxd) < 1e-5
    assert max(rel_rms(a, b) for a, b in zip(jax.tree.leaves(gpp), jax.tree.leaves(gpd))) < 1e-5
