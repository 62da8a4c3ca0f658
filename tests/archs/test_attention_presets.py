"""Attention-variant presets (archs/sparse_attention.py, archs/memory_attention.py,
archs/efficient_attention.py): every preset builds at ``tiny`` (< 1M params) and
``small``; for every causal preset prefill + token-by-token decode equals the full
forward (model level, through the mixers' caches), and for Llama with xPos positions;
the encoder preset refuses decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import archs
from archs import efficient_attention, memory_attention, sparse_attention
from tests.helpers import rel_rms

FAMILY = {**sparse_attention.PRESETS, **memory_attention.PRESETS, **efficient_attention.PRESETS}
CAUSAL = {n: (n, {}) for n in FAMILY if n != "linformer"}
CAUSAL["llama-xpos"] = ("llama", {"position": "xpos"})   # the position scheme added with these mixers


def _params(model, tokens):
    """Random parameters of the right shapes (numpy RNG: no init compile)."""
    shapes = jax.eval_shape(model.init, jax.random.key(1), tokens)
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def _count(params):
    return sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("case", list(CAUSAL), ids=list(CAUSAL))
def test_prefill_then_decode_equals_forward(case):
    name, overrides = CAUSAL[case]
    cfg = archs.preset(name, "tiny", **overrides)
    assert cfg.causal
    model = archs.build(cfg)
    b, t, p = 2, 41, 19
    tokens = jax.random.randint(jax.random.key(0), (b, t), 0, cfg.vocab_size)
    params = _params(model, tokens)
    assert _count(params) < 1_000_000

    @jax.jit
    def run(params, tokens):  # one compile: full forward, prefill, then one token at a time
        full = model.apply(params, tokens)[0]
        logits, _, cache = model.apply(params, tokens[:, :p], cache=model.init_cache(b, 64))

        def step(cache, tok):
            out, _, cache = model.apply(params, tok[:, None], cache=cache)
            return cache, out[:, 0]
        _, steps = jax.lax.scan(step, cache, tokens[:, p:].T)
        return full, jnp.concatenate([logits, jnp.moveaxis(steps, 0, 1)], axis=1)
    full, decoded = run(params, tokens)
    assert bool(jnp.isfinite(full).all()) and float(full.std()) > 0
    assert rel_rms(decoded, full) < 1e-5


def test_sliding_window_decode_state_is_a_ring_of_w_slots():
    cfg = archs.preset("sliding_window", "tiny")
    mixer = cfg.pattern[0].mixer
    assert mixer.window < 19                       # the decode test above prefills past the window
    cache = archs.build(cfg).init_cache(2, 1024)
    assert cache.layers[0]["mixer"].k.shape[2] == mixer.window   # [groups, B, W, K, Dh]
    assert mixer.state_size(cfg.d_model, 10 ** 6) == mixer.state_size(cfg.d_model, mixer.window)


def test_linformer_is_an_encoder_preset():
    cfg = archs.preset("linformer", "tiny")
    assert not cfg.causal
    model = archs.build(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 30), 0, cfg.vocab_size)
    params = _params(model, tokens)
    assert _count(params) < 1_000_000
    logits, _ = jax.jit(model.apply)(params, tokens)
    later = tokens.at[:, 20:].set((tokens[:, 20:] + 1) % cfg.vocab_size)
    changed = jax.jit(model.apply)(params, later)[0]
    assert float(jnp.abs(changed[:, :20] - logits[:, :20]).max()) > 0   # bidirectional by design
    with pytest.raises(ValueError, match="no decode cache"):
        model.init_cache(2, 32)
    with pytest.raises(ValueError, match="leak"):
        archs.preset("linformer", "tiny", causal=True)


@pytest.mark.parametrize("name", list(FAMILY), ids=list(FAMILY))
def test_small_preset_shapes(name):
    cfg = archs.preset(name, "small")
    model = archs.build(cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64), jnp.int32))
    assert 100_000 < _count(shapes) < 5_000_000
    assert cfg.vocab_size == 512


def test_multiscale_pattern_cycles_local_strided_full():
    cfg = archs.preset("multiscale", "tiny")
    kinds = [b.mixer.kind for b in cfg.pattern]
    assert kinds == ["sliding_window", "sparse_transformer", "attention"]
    assert cfg.pattern[1].mixer.layout == "b" and cfg.n_layers % 3 == 0
