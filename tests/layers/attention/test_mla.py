"""Multi-head latent attention: absorbed == naive == a dense per-head reference (values
and gradients), DeepSeek's interleaved RoPE, the module's decode == forward through the
latent cache, packed segments, state size, and configuration errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import MLAConfig
from layers.attention.mla import mla_attention_absorbed, mla_attention_naive, rotate
from layers.positions import RopeConfig
from pallas_kernels.attention.reference import reference_attention
from tests.helpers import normal, rel_rms

B, T, H, R, DN, DR, DV, D = 2, 13, 3, 10, 6, 4, 5, 24


def _inputs(seed=0, s=T):
    return (normal(seed, (B, T, H, DN)), normal(seed + 1, (B, T, H, DR)),
            normal(seed + 2, (B, s, R)), normal(seed + 3, (B, s, DR)),
            normal(seed + 4, (R, H, DN + DV)) * R ** -0.5)


def dense_reference(q_nope, q_rope, latent, k_rope, w_kv, scale, **kw):
    """Per-head keys [kn | kr] and values (zero-padded to the qk dim) through the dense oracle."""
    kv = jnp.einsum("bsr,rhk->bshk", latent, w_kv)
    k_rope_h = jnp.broadcast_to(k_rope[:, :, None], k_rope.shape[:2] + (H, DR))
    k = jnp.concatenate([kv[..., :DN], k_rope_h], -1)
    v = jnp.pad(kv[..., DN:], ((0, 0), (0, 0), (0, 0), (0, DN + DR - DV)))
    q = jnp.concatenate([q_nope, q_rope], -1)
    return reference_attention(q, k, v, scale=scale, **kw)[..., :DV]


CASES = {  # id: (causal, q_offset, S, segments)
    "causal-segments": (True, 0, T, True),
    "bidirectional": (False, 0, T, False),
    "decode-offset": (True, 4, 20, False),   # T queries at 4.. against 17 valid of 20 keys
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_absorbed_and_naive_match_dense_reference(case):
    causal, off, s, seg = CASES[case]
    args = _inputs(seed=1, s=s)
    sid = (jnp.arange(T)[None] >= 5).astype(jnp.int32).repeat(B, 0) if seg else None
    kw = dict(causal=causal, q_offset=off, kv_len=off + T if s != T else None, segment_ids=sid)
    w = normal(7, (B, T, H, DV))

    @jax.jit
    def run():
        def vg(f):
            return jax.value_and_grad(lambda *a: jnp.sum(f(*a, 0.3, **kw) * w),
                                      argnums=(0, 1, 2, 3, 4))(*args)
        fwd = [f(*args, 0.3, **kw) for f in (mla_attention_absorbed, mla_attention_naive,
                                              dense_reference)]
        return fwd, [vg(f)[1] for f in (mla_attention_absorbed, mla_attention_naive,
                                        dense_reference)]
    (absorbed, naive, ref), (g_abs, g_naive, g_ref) = run()
    assert rel_rms(absorbed, ref) < 1e-5 and rel_rms(naive, ref) < 1e-5
    for ga, gn, gr in zip(g_abs, g_naive, g_ref):
        assert rel_rms(ga, gr) < 1e-5 and rel_rms(gn, gr) < 1e-5


def test_interleaved_rope_rotates_adjacent_pairs():
    x = normal(0, (1, 6, 2, 8))
    pos = jnp.arange(6)[None] * 3
    inv = 10000.0 ** (-jnp.arange(4) * 2.0 / 8)
    out = np.asarray(rotate(x, pos, inv, 1.0, True))
    xc = np.asarray(x[..., 0::2]) + 1j * np.asarray(x[..., 1::2])          # pairs (2i, 2i+1)
    rot = xc * np.exp(1j * np.asarray(pos)[..., None, None] * np.asarray(inv))
    np.testing.assert_allclose(out, np.concatenate([rot.real, rot.imag], -1), atol=1e-5)
    half = np.asarray(rotate(x, pos, inv, 1.0, False))
    xh = np.asarray(x[..., :4]) + 1j * np.asarray(x[..., 4:])              # pairs (i, i+4)
    roth = xh * np.exp(1j * np.asarray(pos)[..., None, None] * np.asarray(inv))
    np.testing.assert_allclose(half, np.concatenate([roth.real, roth.imag], -1), atol=1e-5)


def _module(cfg, t=11, seed=0):
    mod = cfg.make(D, jnp.float32, jnp.float32)
    x = normal(seed, (B, t, D))
    pos = jnp.broadcast_to(jnp.arange(t), (B, t))
    params = jax.jit(lambda: mod.init(jax.random.PRNGKey(seed), x, positions=pos))()
    return mod, params, x, pos


MODULES = {
    "absorbed": MLAConfig(n_heads=H, q_lora_rank=12, kv_lora_rank=R, qk_nope_head_dim=DN,
                          qk_rope_head_dim=DR, v_head_dim=DV),
    "naive-no-qlora": MLAConfig(n_heads=H, q_lora_rank=None, kv_lora_rank=R, qk_nope_head_dim=DN,
                                qk_rope_head_dim=DR, v_head_dim=DV, absorb=False),
}


@pytest.mark.parametrize("name", list(MODULES), ids=list(MODULES))
def test_decode_equals_forward(name):
    cfg = MODULES[name]
    mod, params, x, pos = _module(cfg)
    full = jax.jit(lambda: mod.apply(params, x, positions=pos)[0])()
    step = jax.jit(lambda c, xt, pt: mod.apply(params, xt, positions=pt, cache=c)[:2])
    y, cache = step(cfg.init_cache(D, B, 16, jnp.float32), x[:, :5], pos[:, :5])  # prefill
    outs = [y]
    for t in range(5, x.shape[1]):
        y, cache = step(cache, x[:, t:t + 1], pos[:, t:t + 1])
        outs.append(y)
    assert int(cache.index) == x.shape[1]
    assert cache.latent.shape == (B, 16, R) and cache.k_rope.shape == (B, 16, DR)
    assert rel_rms(jnp.concatenate(outs, 1), full) < 1e-5


def test_packed_segments_equal_separate_sequences():
    cfg = MODULES["absorbed"]
    mod, params, x, _ = _module(cfg, t=10)
    sid = jnp.array([[0] * 4 + [1] * 6] * B)
    pos = jnp.array([list(range(4)) + list(range(6))] * B)

    @jax.jit
    def run():
        packed = mod.apply(params, x, positions=pos, segment_ids=sid)[0]
        first = mod.apply(params, x[:, :4], positions=pos[:, :4])[0]
        return packed, first, mod.apply(params, x[:, 4:], positions=pos[:, 4:])[0]
    packed, first, second = run()
    assert rel_rms(packed, jnp.concatenate([first, second], 1)) < 1e-5


def test_state_size_counts_latent_and_rope_part():
    cfg = MODULES["absorbed"]
    assert cfg.state_size(D, 100, jnp.bfloat16) == 100 * (R + DR) * 2
    cache = jax.eval_shape(lambda: cfg.init_cache(D, 1, 100, jnp.bfloat16))
    assert cache.latent.shape == (1, 100, R) and cache.k_rope.shape == (1, 100, DR)


def test_yarn_softmax_scale():
    cfg = dataclasses.replace(MODULES["absorbed"], mscale_all_dim=1.0,
                              rope=RopeConfig(scaling="yarn", factor=40.0, original_max_len=64))
    m = 0.1 * np.log(40.0) + 1
    assert cfg.softmax_scale() == pytest.approx((DN + DR) ** -0.5 * m * m)
    assert MODULES["absorbed"].softmax_scale() == pytest.approx((DN + DR) ** -0.5)


@pytest.mark.parametrize("field,value,match", [
    ("qk_rope_head_dim", 5, "qk_rope_head_dim=5 must be even"),
    ("kv_lora_rank", 0, "kv_lora_rank=0 must be a positive integer"),
    ("q_lora_rank", -3, r"q_lora_rank=-3 must be a positive integer \(or None\)"),
    ("latent_eps", 0.0, "latent_eps=0.0 must be a finite number"),
    ("rope", RopeConfig(fraction=0.5), r"rope.fraction=0.5 is not allowed"),
], ids=["odd-rope", "kv-rank", "q-rank", "eps", "partial-rotary"])
def test_validation_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(MODULES["absorbed"], **{field: value}).validate(D, "mla")


def test_bidirectional_has_no_cache():
    with pytest.raises(ValueError, match="no decode cache"):
        dataclasses.replace(MODULES["absorbed"], causal=False).init_cache(D, 1, 8, jnp.float32)
