"""Model-level consistency (docs/conventions.md #5) on the llama preset: prefill + decode == forward,
scanned == unrolled, packed == separate, generate == argmax loop, registry errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import archs
from tests.helpers import rel_rms

VOCAB = 64


def _model(**kw):
    cfg = archs.preset("llama", "tiny", vocab_size=VOCAB, d_model=32, max_len=64, **kw)
    model = archs.build(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 23), 0, VOCAB)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)
    return cfg, model, params, tokens


@pytest.mark.parametrize("kw", [{}, {"short_conv": 4, "window": 6, "attn_impl": "blockwise", "block_q": 8,
                                     "block_k": 8}], ids=["plain", "conv-window-blockwise"])
def test_prefill_then_decode_equals_forward_at_every_step(kw):
    cfg, model, params, tokens = _model(**kw)
    full, aux = jax.jit(model.apply)(params, tokens)
    assert aux == {"losses": {}, "metrics": {}}
    step = jax.jit(lambda p, t, c: model.apply(p, t, cache=c))
    cache = model.init_cache(2, 40)
    logits, _, cache = step(params, tokens[:, :7], cache)
    outs = [logits]
    for t in range(7, 23):
        logits, _, cache = step(params, tokens[:, t:t + 1], cache)
        outs.append(logits)
    dec = jnp.concatenate(outs, axis=1)
    per_step = [rel_rms(dec[:, t], full[:, t]) for t in range(23)]
    assert max(per_step) < 1e-5, per_step
    assert int(cache.index) == 23


def test_scanned_equals_unrolled_and_remat_is_exact():
    cfg, model, params, tokens = _model(n_layers=3)
    unrolled = archs.build(archs.preset("llama", "tiny", vocab_size=VOCAB, d_model=32, max_len=64,
                                        n_layers=3, scan_layers=False))
    stacked = params["params"]["layers"]
    up = {k: v for k, v in params["params"].items() if k != "layers"}
    for i in range(3):
        up[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    a = jax.jit(model.apply)(params, tokens)[0]
    b = jax.jit(unrolled.apply)({"params": up}, tokens)[0]
    assert rel_rms(b, a) < 1e-6
    remat = archs.build(archs.preset("llama", "tiny", vocab_size=VOCAB, d_model=32, max_len=64,
                                     n_layers=3, remat="full"))
    loss = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.mean(m.apply(p, tokens)[0] ** 2)))(params)
    (l1, g1), (l2, g2) = loss(model), loss(remat)
    assert abs(float(l1) - float(l2)) < 1e-6
    assert max(rel_rms(x, y) for x, y in zip(jax.tree.leaves(g2), jax.tree.leaves(g1))) < 1e-5


def test_packed_sequences_equal_separate_sequences():
    cfg, model, params, tokens = _model(short_conv=3)
    a, b = tokens[:1, :9], tokens[:1, 9:23]
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[0] * 9 + [1] * 14])
    out = jax.jit(lambda p, t, s: model.apply(p, t, segment_ids=s))(params, packed, seg)[0]
    sep_a = model.apply(params, a)[0]
    sep_b = model.apply(params, b)[0]
    assert rel_rms(out[:, :9], sep_a) < 1e-5
    assert rel_rms(out[:, 9:], sep_b) < 1e-5


def test_generate_greedy_equals_argmax_loop_and_sampling_is_seeded():
    cfg, model, params, tokens = _model()
    prompt = tokens[:, :5]
    out = archs.generate(model, params, prompt, 6)
    assert out.shape == (2, 11) and bool(jnp.all(out[:, :5] == prompt))
    seq = prompt
    for _ in range(6):  # reference: full forward each step
        nxt = jnp.argmax(model.apply(params, seq)[0][:, -1], axis=-1)
        seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)
    assert bool(jnp.all(out == seq))
    s1 = archs.generate(model, params, prompt, 6, temperature=1.0, top_k=5, rng=jax.random.PRNGKey(3))
    s2 = archs.generate(model, params, prompt, 6, temperature=1.0, top_k=5, rng=jax.random.PRNGKey(3))
    assert bool(jnp.all(s1 == s2))
    with pytest.raises(ValueError, match="max_len"):
        archs.generate(model, params, prompt, 100)
    with pytest.raises(ValueError, match="rng"):
        archs.generate(model, params, prompt, 3, temperature=0.5)


def test_llama3_8b_shape_builds_abstractly():
    cfg = archs.preset("llama", "8b")
    shapes = jax.eval_shape(archs.build(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n == 8_030_261_248  # Llama-3-8B: 8.03B parameters (untied head)
    attn = cfg.pattern[0].mixer
    assert (attn.n_heads, attn.kv_heads, attn.rope.base, cfg.norm_eps) == (32, 8, 500000.0, 1e-5)
    assert cfg.pattern[0].ffn.hidden_dim(4096) == 14336


def test_tiny_is_under_a_million_parameters():
    cfg = archs.preset("llama", "tiny")
    shapes = jax.eval_shape(archs.build(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) < 1_000_000


@pytest.mark.parametrize("call,match", [
    (lambda: archs.preset("lama"), r"unknown preset 'lama'; valid presets: \[.*'llama'"),
    (lambda: archs.preset("llama", "huge"), "valid sizes"),
    (lambda: archs.preset("llama", "tiny", n_kv_heads=3), "divisible"),
    (lambda: archs.preset("llama", "tiny", d_model=66, n_heads=4), "d_model=66 must be divisible"),
    (lambda: archs.preset("llama", "tiny", head_dim=7), "odd"),
    (lambda: archs.preset("llama", "tiny", n_layers=0), "n_layers"),
    (lambda: archs.preset("llama", "tiny", vocab_size=-1), "vocab_size"),
    (lambda: archs.preset("llama", "tiny", flux=3), r"unknown override.*flux.*settable"),
])
def test_preset_errors_name_field_and_allowed(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_sequence_longer_than_max_len_or_cache_is_refused():
    cfg, model, params, tokens = _model()
    with pytest.raises(ValueError, match="max_len=64"):
        model.apply(params, jnp.zeros((1, 65), jnp.int32))
    with pytest.raises(ValueError, match="cache length=8"):
        model.apply(params, jnp.zeros((1, 9), jnp.int32), cache=model.init_cache(1, 8))
