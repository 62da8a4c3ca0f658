"""The block-sparse engine equals its dense reference (``block_sparse_reference``) in
values and q/k/v gradients on random patterns: duplicate and invalid list entries,
per-row/per-kv-head lists, whole-block flags, rules, packed segments, ALiBi, S != T,
one-row query blocks, T not a multiple of the blocks. The reference's mask is checked
against a mask written out entry by entry in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention.block_sparse import Band, block_sparse_attention
from layers.attention.block_sparse_reference import block_sparse_reference, pattern_mask
from layers.positions import alibi_slopes
from tests.helpers import normal, rel_rms

CASES = {
    # id: (B, T, S, H, K, block_q, block_k, n, per_head, rule, full, segments, alibi, query_chunk)
    "shared-band-seg-alibi": (2, 37, 37, 4, 2, 8, 8, 4, False, Band(True, 11), False, True, True, 16),
    "per-head-full-cross": (2, 29, 45, 6, 3, 8, 16, 3, True, Band(False, 9), True, False, False, None),
    "one-row-blocks": (1, 21, 21, 2, 1, 1, 4, 3, True, Band(True, None), True, True, False, 5),
}


def _lists(case, seed=0):
    b, t, s, h, kh, bq, bk, n, per_head, *_ = case
    nq, nk = -(-t // bq), -(-s // bk)
    rng = np.random.default_rng(seed)
    shape = (b, kh, nq, n) if per_head else (nq, n)
    idx = rng.integers(0, nk, shape)
    idx[..., -1] = idx[..., 0]                                          # a duplicate entry
    valid = rng.random(shape) < 0.8
    full = rng.random(shape) < 0.5
    return jnp.asarray(idx), jnp.asarray(valid), jnp.asarray(full)


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_engine_equals_dense_reference_values_and_grads(name):
    case = CASES[name]
    b, t, s, h, kh, bq, bk, n, per_head, rule, use_full, seg, ali, qc = case
    idx, valid, full = _lists(case)
    seg_ids = None
    if seg:
        seg_ids = (jnp.asarray(np.arange(t)[None] >= np.array([[t // 3]] * b), jnp.int32),
                   jnp.asarray(np.arange(s)[None] >= np.array([[s // 3]] * b), jnp.int32))
    kw = dict(rule=rule, kv_full=full if use_full else None, segment_ids=seg_ids,
              alibi_slopes=alibi_slopes(h) if ali else None, block_q=bq, block_k=bk)
    q, k, v = normal(1, (b, t, h, 16)), normal(2, (b, s, kh, 16)), normal(3, (b, s, kh, 16))
    w = normal(4, (b, t, h, 16))

    @jax.jit
    def both(q, k, v):
        fast = lambda q, k, v: block_sparse_attention(q, k, v, idx, valid, query_chunk=qc, **kw)
        ref = lambda q, k, v: block_sparse_reference(q, k, v, idx, valid, **kw)
        grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * w), (0, 1, 2))(q, k, v)
        return fast(q, k, v), ref(q, k, v), grads(fast), grads(ref)
    out, out_ref, g_fast, g_ref = both(q, k, v)
    assert float(jnp.abs(out_ref).max()) > 0
    assert rel_rms(out, out_ref) < 1e-5
    for gf, gr in zip(g_fast, g_ref):
        assert rel_rms(gf, gr) < 1e-5


def test_reference_mask_matches_the_definition():
    """visible(t, s) = OR over valid entries c listing s's block of
    (full[c] | rule(t, s)), within segments (written out with loops)."""
    b, t, s, kh, bq, bk = 2, 13, 11, 2, 4, 3
    case = (b, t, s, 2, kh, bq, bk, 3, True)
    idx, valid, full = (np.asarray(a) for a in _lists(case, seed=5))
    rule = Band(True, 4)
    seg = (np.arange(t)[None] >= np.array([[5], [9]])).astype(np.int32)
    kseg = (np.arange(s)[None] >= np.array([[5], [9]])).astype(np.int32)
    want = np.zeros((b, kh, t, s), bool)
    for bi in range(b):
        for ki in range(kh):
            for ti in range(t):
                for si in range(s):
                    for c in range(idx.shape[-1]):
                        dup = any(idx[bi, ki, ti // bq, e] == idx[bi, ki, ti // bq, c]
                                  and valid[bi, ki, ti // bq, e] for e in range(c))
                        if (valid[bi, ki, ti // bq, c] and not dup
                                and idx[bi, ki, ti // bq, c] == si // bk
                                and (full[bi, ki, ti // bq, c] or (0 <= ti - si < 4))):
                            want[bi, ki, ti, si] = seg[bi, ti] == kseg[bi, si]
    got = pattern_mask(t, s, idx, valid, batch=b, kv_heads=kh, rule=rule, kv_full=full,
                       segment_ids=(jnp.asarray(seg), jnp.asarray(kseg)), block_q=bq, block_k=bk)
    assert (np.asarray(got) == want).all()


def test_bad_list_shape_is_refused():
    q, k = normal(0, (1, 16, 2, 8)), normal(1, (1, 16, 2, 8))
    with pytest.raises(ValueError, match="kv_blocks shape"):
        block_sparse_attention(q, k, k, jnp.zeros((3, 2), jnp.int32), jnp.ones((3, 2), bool),
                               block_q=8, block_k=8)
