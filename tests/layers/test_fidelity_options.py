"""Options that make presets compute what the published models compute: RoPE scalings
with HF semantics (yarn, llama3, dynamic NTK, partial rotary), Mamba's discretization,
the tied head's scale and the output-projection bias. The end-to-end check against the
reference implementations is tests/archs/test_hf_golden.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import archs
from layers.positions import RopeConfig, apply_rope, rope_frequencies
from layers.recurrent.mamba import selective_scan
from tests.helpers import normal, rel_rms


def test_yarn_ramps_in_dimension_index_with_rounded_correction_range():
    cfg = RopeConfig(base=10000.0, scaling="yarn", factor=4.0, original_max_len=4096)
    inv, scale = rope_frequencies(64, cfg)
    # correction dims: floor(d(32)) and ceil(d(1)) with d(r) = 64 ln(4096 / (2 pi r)) / (2 ln 1e4)
    d = lambda r: 64 * math.log(4096 / (2 * math.pi * r)) / (2 * math.log(10000.0))
    low, high = math.floor(d(32.0)), math.ceil(d(1.0))
    ramp = np.clip((np.arange(32) - low) / (high - low), 0, 1)
    inv0 = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(inv, inv0 / 4 * ramp + inv0 * (1 - ramp), rtol=1e-5)
    assert math.isclose(scale, 0.1 * math.log(4.0) + 1.0)
    assert rope_frequencies(64, RopeConfig(scaling="yarn", factor=4.0, attention_factor=1.5))[1] == 1.5


def test_llama3_frequency_bands():
    cfg = RopeConfig(base=500000.0, scaling="llama3", factor=8.0, original_max_len=8192,
                     low_freq_factor=1.0, high_freq_factor=4.0)
    inv, scale = rope_frequencies(64, cfg)
    inv0 = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    wl = 2 * np.pi / inv0
    inv = np.asarray(inv)
    assert scale == 1.0
    hi, lo = wl < 8192 / 4, wl > 8192 / 1
    np.testing.assert_allclose(inv[hi], inv0[hi], rtol=1e-6)
    np.testing.assert_allclose(inv[lo], inv0[lo] / 8, rtol=1e-6)
    mid = ~hi & ~lo
    s = (8192 / wl[mid] - 1) / 3
    np.testing.assert_allclose(inv[mid], (1 - s) * inv0[mid] / 8 + s * inv0[mid], rtol=1e-5)


def test_dynamic_ntk_depends_on_the_longest_position():
    cfg = RopeConfig(scaling="dynamic", factor=2.0, original_max_len=8)
    short = jnp.arange(6)[None]
    inv_short, _ = rope_frequencies(16, cfg, short)
    np.testing.assert_allclose(inv_short, rope_frequencies(16, RopeConfig())[0], rtol=1e-6)
    inv_long, _ = rope_frequencies(16, cfg, jnp.arange(16)[None])   # L = 16
    base = 10000.0 * (2.0 * 16 / 8 - 1) ** (16 / 14)
    np.testing.assert_allclose(inv_long, 1.0 / base ** (np.arange(0, 16, 2) / 16), rtol=1e-5)


def test_partial_rotary_rotates_only_the_leading_fraction():
    x = normal(0, (1, 5, 2, 16))
    pos = jnp.arange(5)[None]
    y = apply_rope(x, pos, RopeConfig(fraction=0.5))
    np.testing.assert_array_equal(y[..., 8:], x[..., 8:])
    np.testing.assert_allclose(y[..., :8], apply_rope(x[..., :8], pos, RopeConfig()), rtol=1e-6)
    with pytest.raises(ValueError, match="fraction"):
        RopeConfig(fraction=1.5).validate()


@pytest.mark.parametrize("disc", ["delta_b", "zoh"])
def test_mamba_discretization_matches_numpy(disc):
    b, t, di, n = 1, 5, 3, 2
    x, bm, cm = normal(1, (b, t, di)), normal(2, (b, t, n)), normal(3, (b, t, n))
    dt = jax.nn.softplus(normal(4, (b, t, di)))                  # Delta ~ 0.7: far from ZOH ~ Euler
    a = -jnp.exp(normal(5, (di, n)))
    y, _ = selective_scan(x, dt, a, bm, cm, chunk=2, discretization=disc)
    h = np.zeros((b, di, n))
    ys = []
    x_, dt_, a_, bm_, cm_ = (np.asarray(z, np.float64) for z in (x, dt, a, bm, cm))
    for i in range(t):
        da = dt_[:, i, :, None] * a_
        bbar = dt_[:, i, :, None] if disc == "delta_b" else np.expm1(da) / a_
        h = np.exp(da) * h + bbar * bm_[:, i, None, :] * x_[:, i, :, None]
        ys.append((h * cm_[:, i, None, :]).sum(-1))
    assert rel_rms(y, np.stack(ys, 1)) < 1e-5
    with pytest.raises(ValueError, match="discretization"):
        selective_scan(x, dt, a, bm, cm, discretization="euler")


def test_tied_head_is_unscaled_by_default_and_rsqrt_d_selectable():
    cfg = archs.preset("llama", "tiny", n_layers=1)
    assert cfg.tie_embeddings and cfg.tied_head_scale == "none"
    tok = jnp.array([[1, 2, 3]])
    m = archs.build(cfg)
    params = m.init(jax.random.PRNGKey(0), tok)
    logits, _ = m.apply(params, tok)
    scaled, _ = archs.build(archs.preset("llama", "tiny", n_layers=1, tied_head_scale="rsqrt_d")
                            ).apply(params, tok)
    np.testing.assert_allclose(scaled, logits * cfg.d_model ** -0.5, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="tied_head_scale"):
        archs.preset("llama", "tiny", tied_head_scale="sqrt")


def test_o_bias_and_rwkv_ln0_and_jamba_defaults():
    cfg = archs.preset("llama", "tiny", n_layers=1, o_bias=True)
    shapes = jax.eval_shape(archs.build(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    assert shapes["params"]["layers"]["block_0"]["mixer"]["o_bias"].value.shape == (1, cfg.d_model)
    rwkv = archs.preset("rwkv6", "tiny")
    assert rwkv.embed_norm
    shapes = jax.eval_shape(archs.build(rwkv).init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    assert "embed_norm" in shapes["params"]
    jamba = archs.preset("jamba", "tiny")
    moe = [s.ffn for s in jamba.pattern if s.ffn.kind == "moe"][0]
    assert not moe.renormalize
    assert all(s.mixer.dt_bc_norm and s.mixer.discretization == "delta_b"
               for s in jamba.pattern if s.mixer.kind == "mamba")


def test_linear_attention_unnormalized_identity_is_masked_qk_v():
    from layers.recurrent.linear_attention import kernel_attention, LinearAttentionConfig
    q, k, v = normal(6, (1, 7, 2, 4)), normal(7, (1, 7, 2, 4)), normal(8, (1, 7, 2, 4))
    out, _ = kernel_attention(q, k, v, eps=1e-6, h0=None, segment_ids=None, scan_impl="chunked",
                              chunk=4, normalize=False)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * jnp.tril(jnp.ones((7, 7)))
    assert rel_rms(out, jnp.einsum("bhts,bshd->bthd", scores, v)) < 1e-5
    with pytest.raises(ValueError, match="normalize"):
        LinearAttentionConfig(feature_map="identity").validate(64)
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttentionConfig(feature_map="cosine").validate(64)
