"""Norms, RoPE (+ scaling), ALiBi, FFN sizing and the short convolution vs references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.conv import ShortConv, causal_conv
from layers.ffn import FFNConfig, llama_hidden
from layers.norms import LayerNorm, RMSNorm
from layers.positions import RopeConfig, alibi_slopes, apply_rope, rope_frequencies
from tests.helpers import normal, rel_rms


def test_rmsnorm_and_layernorm_match_numpy():
    x = normal(0, (3, 7, 24)) * 3 + 1
    p = RMSNorm().init(jax.random.PRNGKey(0), x)
    p = jax.tree.map(lambda s: s * 0 + np.linspace(0.5, 1.5, 24), p)
    y = RMSNorm(eps=1e-5).apply(p, x)
    xn = np.asarray(x, np.float64)
    ref = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-5) * np.linspace(0.5, 1.5, 24)
    assert rel_rms(y, ref) < 1e-6
    ln = LayerNorm(eps=1e-5)
    p = ln.init(jax.random.PRNGKey(0), x)
    ref = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
    assert rel_rms(ln.apply(p, x), ref) < 1e-6


def test_rmsnorm_bf16_computes_in_fp32():
    x = normal(1, (2, 5, 32)) * 100
    p = RMSNorm(dtype=jnp.bfloat16).init(jax.random.PRNGKey(0), x)
    y = RMSNorm(dtype=jnp.bfloat16).apply(p, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    ref = RMSNorm().apply(p, x)
    assert rel_rms(y.astype(jnp.float32), ref) < 1e-2


@pytest.mark.parametrize("scaling", ["none", "linear", "ntk", "yarn"])
def test_rope_scores_depend_only_on_offsets(scaling):
    cfg = RopeConfig(base=500000.0, scaling=scaling, factor=4.0, original_max_len=64)
    q, k = normal(2, (1, 1, 1, 32)), normal(3, (1, 1, 1, 32))

    def score(m, n):
        qm = apply_rope(q, jnp.array([[m]]), cfg)
        kn = apply_rope(k, jnp.array([[n]]), cfg)
        return float(jnp.sum(qm * kn))
    for m, n, shift in [(5, 2, 17), (40, 40, 300), (3, 9, 1000)]:
        assert abs(score(m, n) - score(m + shift, n + shift)) < 1e-3 * (1 + abs(score(m, n)))


def test_rope_rotate_half_layout_and_scalings():
    x = normal(4, (1, 3, 2, 8))
    pos = jnp.array([[0, 1, 7]])
    y = apply_rope(x, pos, RopeConfig(base=10000.0))
    inv = 10000.0 ** (-np.arange(4) * 2 / 8)
    ang = np.asarray(pos)[..., None, None] * inv  # [1, 3, 1, 4]
    x1, x2 = np.asarray(x)[..., :4], np.asarray(x)[..., 4:]
    ref = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
    assert rel_rms(y, ref) < 1e-6
    # linear interpolation == plain RoPE at positions / factor
    lin = apply_rope(x, pos, RopeConfig(scaling="linear", factor=4.0))
    plain = apply_rope(x, pos / 4.0, RopeConfig())
    assert rel_rms(lin, plain) < 1e-6
    # NTK-aware: base * factor^(d/(d-2))
    inv_ntk, _ = rope_frequencies(8, RopeConfig(scaling="ntk", factor=2.0))
    assert np.allclose(inv_ntk, (10000.0 * 2 ** (8 / 6)) ** (-np.arange(4) * 2 / 8), rtol=1e-5)
    # YaRN: high frequencies kept, low frequencies interpolated, attention scale 0.1 ln s + 1
    inv_y, mscale = rope_frequencies(64, RopeConfig(scaling="yarn", factor=8.0, original_max_len=4096))
    inv0, _ = rope_frequencies(64, RopeConfig())
    assert np.isclose(inv_y[0], inv0[0]) and np.isclose(inv_y[-1], inv0[-1] / 8.0, rtol=1e-5)
    assert math.isclose(mscale, 0.1 * math.log(8.0) + 1.0)


def test_alibi_slopes_match_paper():
    assert np.allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    s6 = np.asarray(alibi_slopes(6))  # 4 from n=4, then every other of n=8
    assert np.allclose(s6, [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


def test_llama_ffn_sizing():
    assert llama_hidden(4096, 1024, 1.3) == 14336  # Llama-3 8B
    assert FFNConfig(activation="swiglu", multiple_of=16).hidden_dim(64) == 176
    assert FFNConfig(activation="gelu").hidden_dim(64) == 256


def test_swiglu_matches_formula():
    cfg = FFNConfig(hidden=40)
    x = normal(5, (2, 3, 16))
    mod = cfg.make(16, jnp.float32, jnp.float32)
    p = mod.init(jax.random.PRNGKey(0), x)
    y, cache, aux = mod.apply(p, x)
    w = jax.tree.map(lambda a: a, p["params"])
    wi, wg, wo = (np.asarray(w[n]["kernel"].value) for n in ("wi", "wg", "wo"))
    xn = np.asarray(x, np.float64)
    h = xn @ wi
    ref = ((h / (1 + np.exp(-h))) * (xn @ wg)) @ wo
    assert rel_rms(y, ref) < 1e-5 and cache is None and aux == {}


def test_short_conv_matches_explicit_sum_decode_and_segments():
    x = normal(6, (2, 11, 5))
    w = normal(7, (4, 5))
    b = normal(8, (5,))
    y, state = causal_conv(x, w, b)
    xn, wn = np.asarray(x), np.asarray(w)
    ref = np.zeros_like(xn)
    for t in range(11):
        for j in range(4):
            src = t - 3 + j
            if src >= 0:
                ref[:, t] += wn[j] * xn[:, src]
    assert rel_rms(y, ref + np.asarray(b)) < 1e-6
    assert np.allclose(state, xn[:, -3:])
    # prefill 6 then one token at a time == full
    y1, st = causal_conv(x[:, :6], w, b)
    outs = [y1]
    for t in range(6, 11):
        yt, st = causal_conv(x[:, t:t + 1], w, b, st)
        outs.append(yt)
    assert rel_rms(jnp.concatenate(outs, 1), y) < 1e-6
    # packed segments == separate sequences
    seg = jnp.array([[0] * 4 + [1] * 7] * 2)
    ys, _ = causal_conv(x, w, b, segment_ids=seg)
    ya, _ = causal_conv(x[:, :4], w, b)
    yb, _ = causal_conv(x[:, 4:], w, b)
    assert rel_rms(ys, jnp.concatenate([ya, yb], 1)) < 1e-6
    mod = ShortConv(width=4)
    p = mod.init(jax.random.PRNGKey(0), x)
    assert p["params"]["kernel"].value.shape == (4, 5)
