"""Sparse attention mixers: each pattern equals dense softmax attention under the
equivalent explicit boolean mask (built here from the pattern's definition), in values
and gradients, at T not a multiple of the block; XLA FLOPs grow linearly in T for the
window, BigBird, strided and routed patterns; xPos; configuration errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import (BigBirdConfig, LinformerConfig, LongformerConfig, RoutedAttentionConfig,
                              SlidingWindowConfig, SparseTransformerConfig, TransNormerConfig)
from layers.attention.hierarchical import hierarchical_attention
from layers.attention.linformer import linformer_attention
from layers.attention.routed import block_means, route
from layers.attention.transnormer import transnormer_reference
from layers.feature_maps import elu_feature_map as phi
from layers.positions import RopeConfig, alibi_slopes, apply_rope, apply_xpos
from pallas_kernels.attention.reference import reference_attention
from tests.helpers import normal, rel_rms

B, T, H, K, DH = 2, 63, 4, 2, 8          # T = 63: never a multiple of the blocks below
TP = np.arange(T)[:, None]
SP = np.arange(T)[None, :]
D = TP - SP


def dense_masked(q, k, v, mask):
    """Reference: fp32 softmax attention under an explicit mask [T,S] | [B,T,S] | [B,K,T,S]."""
    b, t, h, dh = q.shape
    kh = k.shape[2]
    m = jnp.asarray(mask)
    m = m[None, None] if m.ndim == 2 else (m[:, None] if m.ndim == 3 else m)
    s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, kh, h // kh, dh).astype(jnp.float32),
                   k.astype(jnp.float32)) * dh ** -0.5
    s = jnp.where(m[:, :, None], s, -jnp.inf)
    p = jnp.exp(s - jnp.max(jnp.where(m[:, :, None], s, -1e30), -1, keepdims=True))
    p = jnp.where(m[:, :, None], p, 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    return jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32)).reshape(b, t, h, dh)


def segments():
    """Two packed segments per row, boundaries at 25 and 40."""
    return jnp.asarray((np.arange(T)[None] >= np.array([[25], [40]])).astype(np.int32))


def same_seg(seg):
    return np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :]


def check(fast, ref, dtype=jnp.float32, tol=1e-5, gtol=1e-4, seed=0, kv_heads=K):
    """Values and q/k/v gradients of ``fast`` vs ``ref`` (one jit for both)."""
    q, k, v = (normal(seed, (B, T, H, DH), dtype), normal(seed + 1, (B, T, kv_heads, DH), dtype),
               normal(seed + 2, (B, T, kv_heads, DH), dtype))
    w = normal(seed + 9, (B, T, H, DH))

    @jax.jit
    def both(q, k, v):
        grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w), (0, 1, 2))(q, k, v)
        return fast(q, k, v), ref(q, k, v), grads(fast), grads(ref)
    out, out_ref, g_fast, g_ref = both(q, k, v)
    assert out.dtype == dtype
    assert rel_rms(out.astype(jnp.float32), out_ref) < tol
    for gf, gr in zip(g_fast, g_ref):
        assert rel_rms(gf.astype(jnp.float32), gr) < gtol


# ------------------------------------------------------------------ window / Longformer / BigBird

@pytest.mark.parametrize("causal,seg,dtype", [(True, True, jnp.float32), (False, False, jnp.bfloat16)],
                         ids=["causal-seg", "bidir-bf16"])
def test_sliding_window(causal, seg, dtype):
    cfg = SlidingWindowConfig(window=13, causal=causal, block_q=16, block_k=8, query_chunk=32)
    sid = segments() if seg else None
    mask = ((D >= 0) & (D < 13)) if causal else (np.abs(D) < 13)
    if seg:
        mask = mask[None] & same_seg(sid)
    tol = (1e-5, 1e-4) if dtype == jnp.float32 else (2e-2, 3e-2)
    check(lambda q, k, v: cfg.attend(q, k, v, sid, None), lambda q, k, v: dense_masked(q, k, v, mask),
          dtype, *tol)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_longformer(causal):
    cfg = LongformerConfig(window=9, n_global=5, causal=causal, block_q=16, block_k=8,
                           query_chunk=None)
    sid = segments()
    mask = (np.abs(D) < 9) | (SP < 5) | (TP < 5)
    mask = (mask & (D >= 0)) if causal else mask
    mask = mask[None] & same_seg(sid)
    check(lambda q, k, v: cfg.attend(q, k, v, sid, None), lambda q, k, v: dense_masked(q, k, v, mask))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_bigbird(causal):
    bq = bk = 8
    cfg = BigBirdConfig(window=9, n_global=5, n_random=2, seed=3, causal=causal, block_q=bq,
                        block_k=bk, query_chunk=16)
    nq = -(-T // bq)
    ridx, rval = (np.asarray(a) for a in cfg.random_blocks(jnp.arange(nq), nq, bq, bk))
    rand = np.zeros((nq, nq), bool)
    for i in range(nq):
        rand[i, ridx[i][rval[i]]] = True
    assert rval.sum() > nq // 2                                      # random blocks do get used
    far = np.abs(D) >= 9
    assert (far | ~rand[TP // bq, SP // bk]).all()                   # they lie outside the window
    if causal:
        assert ((D > 0) | ~rand[TP // bq, SP // bk]).all()           # ... and in the past
    mask = (np.abs(D) < 9) | (SP < 5) | (TP < 5) | rand[TP // bq, SP // bk]
    mask = (mask & (D >= 0)) if causal else mask
    check(lambda q, k, v: cfg.attend(q, k, v, None, None), lambda q, k, v: dense_masked(q, k, v, mask))
    if causal:  # the decode mask is the same pattern; the blocks depend on the seed only
        assert (np.asarray(cfg.visible(jnp.arange(T), jnp.arange(T))) == mask).all()
        again = BigBirdConfig(window=9, n_global=5, n_random=2, seed=3, block_q=bq, block_k=bk)
        assert (np.asarray(again.random_blocks(jnp.arange(nq), nq, bq, bk)[0]) == ridx).all()


# ------------------------------------------------------------------ Sparse Transformer

def st_masks(pattern, causal, stride, n_strided, summary):
    if pattern == "strided":
        a = (D >= 0) & (D < stride) if causal else np.abs(D) < stride
        b = (D % stride == 0) & (np.abs(D) // stride < n_strided)
    else:
        a = TP // stride == SP // stride
        b = SP % stride >= stride - summary
    causal_ok = (D >= 0) if causal else True
    return a & causal_ok, b & causal_ok


@pytest.mark.parametrize("pattern,causal,seg", [("strided", True, True), ("fixed", True, False),
                                                ("fixed", False, True)],
                         ids=["strided-causal-seg", "fixed-causal", "fixed-bidir-seg"])
def test_sparse_transformer_heads(pattern, causal, seg):
    cfg = SparseTransformerConfig(pattern=pattern, stride=8, n_strided=3, summary=2, layout="heads",
                                  causal=causal, n_heads=H, n_kv_heads=K, block_q=16, block_k=8,
                                  query_chunk=32)
    sid = segments() if seg else None
    a, b = st_masks(pattern, causal, 8, 3, 2)
    if seg:
        a, b = a[None] & same_seg(sid), b[None] & same_seg(sid)
    else:
        a, b = np.broadcast_to(a, (B, T, T)), np.broadcast_to(b, (B, T, T))
    mask = np.stack([a, b], axis=1)                                   # kv head 0: part A, 1: part B
    check(lambda q, k, v: cfg.attend(q, k, v, sid, None), lambda q, k, v: dense_masked(q, k, v, mask))
    if causal and not seg:
        assert (np.asarray(cfg.visible(jnp.arange(T), jnp.arange(T)))[0] == mask[0]).all()


def test_sparse_transformer_strided_far_with_alibi_unbounded():
    cfg = SparseTransformerConfig(pattern="strided", stride=8, n_strided=None, layout="b", block_q=16,
                                  block_k=16)
    slopes = alibi_slopes(H)
    mask = (D >= 0) & (D % 8 == 0)
    check(lambda q, k, v: cfg.attend(q, k, v, None, slopes),
          lambda q, k, v: _alibi_dense(q, k, v, mask, slopes))


def _alibi_dense(q, k, v, mask, slopes):
    b, t, h, dh = q.shape
    kk, vv = jnp.repeat(k, h // k.shape[2], 2), jnp.repeat(v, h // v.shape[2], 2)
    s = jnp.einsum("bthd,bshd->bhts", q, kk) * dh ** -0.5 - slopes[:, None, None] * np.abs(D)
    s = jnp.where(mask, s, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), vv)


# ------------------------------------------------------------------ routed, hierarchical

def test_routed_selection_is_causal_top_k():
    q, k = normal(0, (B, T, H, DH)), normal(1, (B, T, K, DH))
    bk, top = 8, 3
    idx, valid = (np.asarray(a) for a in route(q, block_means(k, bk), jnp.arange(T), top, bk))
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    for bi, kh, t in [(0, 0, 62), (1, 1, 40), (0, 1, 17), (1, 0, 5)]:
        own = t // bk
        scores = [(qn[bi, t, kh * 2:kh * 2 + 2].sum(0) @ kn[bi, j * bk:(j + 1) * bk, kh].mean(0), j)
                  for j in range(own)]                               # wholly earlier blocks only
        want = {j for _, j in sorted(scores, reverse=True)[:top]}
        assert set(idx[bi, kh, t][valid[bi, kh, t]]) == want


@pytest.mark.parametrize("seg", [True], ids=["packed"])
def test_routed_attention(seg):
    cfg = RoutedAttentionConfig(top_k=3, block_k=8, query_chunk=32)
    sid = segments() if seg else None

    def ref(q, k, v):  # the selection is the pattern: take it, build the mask densely
        kbar = block_means(k, 8)
        ok = None
        if seg:
            sp = np.pad(np.asarray(sid), ((0, 0), (0, 1)), constant_values=-1)
            first, last = sp[:, ::8], sp[:, 7::8]
            s_ = np.asarray(sid)[:, :, None]
            ok = jnp.asarray((first[:, None] == s_) & (last[:, None] == s_))
        idx, valid = route(q, kbar, jnp.arange(T), 3, 8, ok)
        sel = jnp.any((idx[..., None] == (SP // 8)) & valid[..., None], axis=3)   # [B, K, T, S]
        mask = sel | ((TP // 8 == SP // 8) & (D >= 0))
        if seg:
            mask = mask & same_seg(sid)[:, None]
        return dense_masked(q, k, v, mask)
    check(lambda q, k, v: cfg.attend(q, k, v, sid, None), ref)


@pytest.mark.parametrize("causal,seg", [(True, True), (False, False)], ids=["causal-packed", "bidir"])
def test_hierarchical(causal, seg):
    sb = 8
    sid = segments() if seg else None
    ng = -(-T // sb)

    def ref(q, k, v):  # explicit block summaries appended in front of the tokens
        sids = np.asarray(sid) if seg else np.zeros((B, T), int)
        w = np.zeros((B, ng, T))
        for n in range(ng):
            last = min(T, n * sb + sb) - 1
            w[:, n, n * sb:last + 1] = sids[:, n * sb:last + 1] == sids[:, last:last + 1]
        w = jnp.asarray(w / w.sum(-1, keepdims=True), jnp.float32)
        ksum, vsum = jnp.einsum("bnt,btkd->bnkd", w, k), jnp.einsum("bnt,btkd->bnkd", w, v)
        blk = np.arange(ng)[None]
        m_sum = (blk < TP // sb) if causal else (blk != TP // sb)
        m_fine = (TP // sb == SP // sb) & ((D >= 0) if causal else True)
        m_sum, m_fine = np.broadcast_to(m_sum, (B, T, ng)), np.broadcast_to(m_fine, (B, T, T))
        if seg:
            seg_sum = sids[:, np.minimum(np.arange(ng) * sb + sb, T) - 1]
            m_sum = m_sum & (sids[:, :, None] == seg_sum[:, None, :])
            m_fine = m_fine & same_seg(sid)
        mask = np.concatenate([m_sum, m_fine], -1)
        return dense_masked(q, jnp.concatenate([ksum, k], 1), jnp.concatenate([vsum, v], 1), mask)
    check(lambda q, k, v: hierarchical_attention(q, k, v, summary_block=sb, causal=causal,
                                                 segment_ids=sid, block_q=16, block_k=8,
                                                 query_chunk=32), ref)


# ------------------------------------------------------------------ TransNormer, Linformer

@pytest.mark.parametrize("seg", [True], ids=["packed"])
def test_transnormer_local_and_global(seg):
    cfg = TransNormerConfig(block=8, block_q=16, block_k=8, query_chunk=32)
    sid = segments() if seg else None
    same = same_seg(sid) if seg else np.ones((B, T, T), bool)
    local_mask = (TP // 8 == SP // 8) & (D >= 0) & same
    earlier = (SP < (TP // 8) * 8) & same                              # keys of earlier blocks

    def fast(q, k, v):
        return (cfg.local(q, k, v, sid, None).astype(jnp.float32)
                + cfg.global_linear(phi(q), phi(k), v, sid))

    def ref(q, k, v):
        fq, fk = phi(q).reshape(B, T, K, H // K, DH), phi(k)
        lin = jnp.einsum("btkgd,bskd,bts,bske->btkge", fq, fk, jnp.asarray(earlier, jnp.float32), v)
        return dense_masked(q, k, v, local_mask) + lin.reshape(B, T, H, DH)

    check(fast, ref)
    # the dense reference beside the fast path is this definition too
    q, k, v = normal(0, (B, T, H, DH)), normal(1, (B, T, K, DH)), normal(2, (B, T, K, DH))
    loc, glob = transnormer_reference(q, k, v, phi(q), phi(k), block=8, segment_ids=sid)
    assert rel_rms(loc + glob, ref(q, k, v)) < 1e-5


def test_transnormer_fast_path_equals_its_reference_with_alibi():
    """Local part with ALiBi, global part through the shared linear scan, T = 63."""
    cfg = TransNormerConfig(block=16, block_q=8, block_k=16, query_chunk=16, position="alibi")
    sid = None
    slopes = alibi_slopes(H)

    def fast(q, k, v):
        return (cfg.local(q, k, v, sid, slopes).astype(jnp.float32)
                + cfg.global_linear(phi(q), phi(k), v, sid))

    def ref(q, k, v):
        loc, glob = transnormer_reference(q, k, v, phi(q), phi(k), block=16, segment_ids=sid,
                                          slopes=slopes)
        return loc + glob
    check(fast, ref, seed=4)


def test_linformer_matches_explicit_projection_and_refuses_causal():
    e, f = normal(5, (T, 16)), normal(6, (T, 16))

    def ref(q, k, v):
        kp, vp = jnp.einsum("bskd,sr->brkd", k, e), jnp.einsum("bskd,sr->brkd", v, f)
        return dense_masked(q, kp, vp, np.ones((T, 16), bool))
    check(lambda q, k, v: linformer_attention(q, k, v, e, f), ref)
    with pytest.raises(ValueError, match="leak future tokens"):
        LinformerConfig(causal=True).validate(64, "model.pattern.0.mixer")


# ------------------------------------------------------------------ FLOPs scale linearly

FLOP_CASES = {
    "window": SlidingWindowConfig(window=256, block_q=128, block_k=128, query_chunk=None),
    "bigbird": BigBirdConfig(window=128, n_global=16, n_random=2, block_q=64, block_k=64,
                             query_chunk=None),
    "strided": SparseTransformerConfig(pattern="strided", stride=64, n_strided=4, layout="b",
                                       block_q=128, block_k=128, query_chunk=None),
    "routed": RoutedAttentionConfig(top_k=8, block_k=64, query_chunk=None),
}


def _flops(fn, t):
    x = jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32)
    cost = jax.jit(fn).lower(x, x, x).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@pytest.mark.parametrize("name", list(FLOP_CASES), ids=list(FLOP_CASES))
def test_forward_flops_grow_linearly(name):
    """XLA's CPU cost analysis counts a while-loop body once, so the core runs with one
    chunk and its slot loop unrolled (same math); dense attention is the control."""
    cfg = FLOP_CASES[name]
    fn = lambda q, k, v: cfg.attend(q, k, v, None, None, unroll=True)
    ratio = _flops(fn, 8192) / _flops(fn, 4096)
    assert 1.8 < ratio <= 2.2, ratio


def test_flop_metric_sees_quadratic_dense_attention():
    fn = lambda q, k, v: reference_attention(q, k, v, causal=True)
    assert _flops(fn, 8192) / _flops(fn, 4096) > 3.5


# ------------------------------------------------------------------ xPos, errors
# (decode caches, including the sliding-window ring buffer, are checked model-level in
# tests/archs/test_attention_presets.py)

def test_xpos_is_scaled_rope_and_relative():
    cfg = RopeConfig(xpos_scale_base=64.0)
    q, k = normal(0, (1, 1, 1, 16)), normal(1, (1, 1, 1, 16))

    @jax.jit
    def score(q, k, n, m):
        return jnp.sum(apply_xpos(q, jnp.full((1, 1), n), cfg, key=False)
                       * apply_xpos(k, jnp.full((1, 1), m), cfg, key=True))
    assert abs(score(q, k, 40, 13) - score(q, k, 140, 113)) < 1e-4 * abs(score(q, k, 40, 13))
    # Sun et al. (2022): RoPE times zeta_i^(+n/gamma) (queries), zeta_i = (i / (Dh/2) + 0.4) / 1.4
    zeta = (np.arange(8) / 8 + 0.4) / 1.4
    want = np.asarray(apply_rope(q, jnp.full((1, 1), 30), cfg)) * np.tile(zeta ** (30 / 64.0), 2)
    got = apply_xpos(q, jnp.full((1, 1), 30), cfg, key=False)
    assert rel_rms(got, want) < 1e-6


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="mixer.window"):
        SlidingWindowConfig(window=0).validate(64, "mixer")
    with pytest.raises(ValueError, match="mixer.layout"):
        SparseTransformerConfig(layout="rows").validate(64, "mixer")
    with pytest.raises(ValueError, match="mixer.causal=False"):
        RoutedAttentionConfig(causal=False).validate(64, "mixer")
    with pytest.raises(ValueError, match="mixer.position"):
        SparseTransformerConfig(pattern="fixed", position="alibi").validate(64, "mixer")
