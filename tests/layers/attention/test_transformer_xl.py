"""Transformer-XL attention: the parallel form equals a float64 reference written from
the paper's score (terms (a)-(d)) under the segment/memory pattern; running the
segments one after another through the cache (memory carried, stop-gradient) equals
one parallel forward in values and parameter gradients; arbitrary prefill/decode
splits give the same values."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import TransformerXLConfig
from tests.helpers import normal, rel_rms

B, T, D, H = 2, 37, 32, 4

CASES = {"mem12-seg8": (12, 8), "mem5-seg8": (5, 8)}


@functools.lru_cache(maxsize=None)
def _setup(mem, seg):
    cfg = TransformerXLConfig(n_heads=H, mem_len=mem, segment_len=seg)
    mod = cfg.make(D, jnp.float32, jnp.float32)
    x = normal(0, (B, T, D))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    params = nn.unbox(jax.jit(lambda key: mod.init(key, x, positions=pos))(jax.random.key(1)))
    params = jax.tree.map(lambda p: p + 0.1 * normal(2, p.shape), params)   # non-zero u, v biases
    forward = jax.jit(lambda p: mod.apply(p, x, positions=pos)[0])        # shared by the tests
    return cfg, mod, x, params, forward


def _reference(params, x, mem, seg):
    """float64 numpy: A_ij = (q_i + u).k_j + (q_i + v).(W_R R_{i-j}) for
    max(0, s(i) - mem) <= j <= i, s(i) = segment start of i; softmax; times W_o."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    xs = np.asarray(x, np.float64)
    q, k, v = (np.einsum("btd,dhe->bthe", xs, p[n]) for n in ("q", "k", "v"))
    dist = np.arange(T)[:, None] - np.arange(T)[None, :]
    inv = 1.0 / 10000.0 ** (np.arange(0, D, 2) / D)
    ang = np.clip(dist, 0, None)[..., None] * inv
    rel = np.concatenate([np.sin(ang), np.cos(ang)], -1)               # R_{i-j}: [T, T, D]
    r = np.einsum("tsd,dhe->tshe", rel, p["r"])
    a_c = np.einsum("bthe,bshe->bhts", q + p["u"], k)
    b_d = np.einsum("bthe,tshe->bhts", q + p["v_bias"], r)
    start = (np.arange(T) // seg) * seg
    mask = (dist >= 0) & (np.arange(T)[None, :] >= (start - mem)[:, None])
    s = np.where(mask, (a_c + b_d) / np.sqrt(D // H), -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshe->bthe", w, v)
    return np.einsum("bthe,hed->btd", out, p["o"])


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_parallel_form_matches_paper_reference(case):
    mem, seg = CASES[case]
    cfg, mod, x, params, forward = _setup(mem, seg)
    assert rel_rms(forward(params), _reference(params, x, mem, seg)) < 1e-5


@pytest.mark.parametrize("case", ["mem12-seg8"], ids=["mem12-seg8"])
def test_segment_by_segment_equals_one_forward_values_and_grads(case):
    mem, seg = CASES[case]
    cfg, mod, x, params, _ = _setup(mem, seg)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    w = normal(7, (B, T, D))

    def parallel(p):
        return mod.apply(p, x, positions=pos)[0]

    def segmented(p):  # the train loop's segment mode: aligned segments, memory carried
        cache, outs = cfg.init_cache(D, B, T, jnp.float32), []
        for s0 in range(0, T, seg):
            y, cache, _ = mod.apply(p, x[:, s0:s0 + seg], positions=pos[:, s0:s0 + seg], cache=cache)
            outs.append(y)
        assert cache.mem.shape == (B, mem + seg - 1, D)             # fixed size
        return jnp.concatenate(outs, 1)

    @jax.jit
    def both(p):
        loss = lambda f: lambda p: jnp.sum(f(p) * w)
        return (parallel(p), segmented(p), jax.grad(loss(parallel))(p), jax.grad(loss(segmented))(p))
    y_par, y_seg, g_par, g_seg = both(params)
    assert rel_rms(y_seg, y_par) < 1e-5
    for name in ("q", "k", "v", "r", "u", "v_bias", "o"):
        assert rel_rms(g_seg["params"][name], g_par["params"][name]) < 1e-4, name
    assert float(jnp.abs(g_par["params"]["k"]).max()) > 0


def test_unaligned_prefill_then_decode_equals_forward():
    mem, seg = CASES["mem5-seg8"]
    cfg, mod, x, params, forward = _setup(mem, seg)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    full = forward(params)
    run = jax.jit(lambda p, x, pos, c: mod.apply(p, x, positions=pos, cache=c))
    cache, outs = cfg.init_cache(D, B, 1000, jnp.float32), []
    y, cache, _ = run(params, x[:, :13], pos[:, :13], cache)          # crosses a segment boundary
    outs.append(y)
    for t in range(13, T):
        y, cache, _ = run(params, x[:, t:t + 1], pos[:, t:t + 1], cache)
        outs.append(y)
    assert rel_rms(jnp.concatenate(outs, 1), full) < 1e-5
    assert int(cache.index) == T


def test_xl_refuses_bidirectional_use_and_grouped_kv_heads():
    with pytest.raises(ValueError, match="mixer.causal=False"):
        TransformerXLConfig(causal=False).validate(64, "mixer")
    with pytest.raises(ValueError, match="mixer.n_kv_heads=2"):
        TransformerXLConfig(n_heads=4, n_kv_heads=2).validate(64, "mixer")
