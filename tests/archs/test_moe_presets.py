"""MoE presets (archs/moe.py): registry, sizes, prefill + decode == forward, the
train-step state protocol of the aux-loss-free bias, and overrides reaching the right
component of a hybrid (jamba)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import archs
from archs.model import STATE_COLLECTION
from layers.registry import FFNS
from layers.moe import STATE_COLLECTION as MOE_STATE
from layers.moe import MoEConfig

NAMES = ["mixtral", "switch", "deepseek_moe", "qwen_moe", "jamba"]
B, T, P, MAX = 2, 11, 6, 16  # batch, tokens, prompt (prefill) length, cache length


def fast_init(model, tokens, seed=0):
    """Random variables with the model's shapes, drawn in numpy: jit-compiling Flax's
    initializers costs seconds per model on CPU and these tests need no particular init."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    rng = np.random.RandomState(seed)
    d = model.cfg.d_model

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if STATE_COLLECTION in name:
            return jnp.zeros(s.shape, s.dtype)
        if "scale" in name:
            return jnp.ones(s.shape, s.dtype)
        std = 1.0 if "table" in name else d ** -0.5
        return jnp.asarray(rng.standard_normal(s.shape) * std, s.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def rel_rms(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


def test_registry():
    assert set(NAMES) <= set(archs.names())
    assert FFNS["moe"] is MoEConfig and MOE_STATE == STATE_COLLECTION
    for name in NAMES:
        assert archs.sizes(name) == ("tiny", "small")
        for size in ("tiny", "small"):
            cfg = archs.preset(name, size)
            model = archs.build(cfg)
            shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
            n = sum(a.size for a in jax.tree.leaves(shapes["params"]))
            assert n < 1_000_000 if size == "tiny" else 300_000 < n < 2_500_000, (name, size, n)
            assert (STATE_COLLECTION in shapes) == (name == "deepseek_moe")
            assert cfg.causal and all(b.ffn.causal for b in cfg.pattern if isinstance(b.ffn, MoEConfig))


@pytest.mark.parametrize("name", NAMES)
def test_prefill_and_decode_match_forward(name):
    # switch: capacity C = T so the full forward drops nothing (decode never drops)
    cfg = archs.preset(name, "tiny", **({"capacity_factor": 8.0} if name == "switch" else {}))
    model = archs.build(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, cfg.vocab_size)
    variables = fast_init(model, tokens)

    @jax.jit
    def run(variables, tokens):
        full, aux = model.apply(variables, tokens)
        cache = model.init_cache(B, MAX)
        pre, _, cache = model.apply(variables, tokens[:, :P], cache=cache)

        def step(cache, tok):
            logits, _, cache = model.apply(variables, tok[:, None], cache=cache)
            return cache, logits[:, 0]
        _, dec = jax.lax.scan(step, cache, tokens[:, P:].T)
        return full, aux, jnp.concatenate([pre, jnp.swapaxes(dec, 0, 1)], axis=1)

    full, aux, stepped = run(variables, tokens)
    assert rel_rms(stepped, full) < 1e-5
    moe_blocks = [i for i, b in enumerate(cfg.pattern) if isinstance(b.ffn, MoEConfig)]
    assert moe_blocks
    for i in moe_blocks:  # diagnostics stacked over pattern repeats
        load = aux["metrics"][f"moe_load/block_{i}"]
        assert load.shape == (cfg.n_repeats, cfg.pattern[i].ffn.n_routed)
        np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(aux["metrics"][f"moe_dropped/block_{i}"], 0.0)


def test_train_step_updates_aux_free_bias():
    """The train-loop protocol: mutable state + train=True returns the updated bias
    (computed from this step's loads), which changes routing from the next step on."""
    # capacity dispatch: this test is about the state protocol (compiles faster than gmm)
    cfg = archs.preset("deepseek_moe", "tiny", dispatch="capacity", capacity_factor=2.0)
    moe = cfg.pattern[0].ffn
    model = archs.build(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, cfg.vocab_size)
    variables = fast_init(model, tokens)

    @jax.jit
    def train_forward(variables, tokens):
        (_, aux), new = model.apply(variables, tokens, train=True, mutable=[STATE_COLLECTION])
        return aux, new[STATE_COLLECTION]

    aux, new_state = train_forward(variables, tokens)
    (bias,) = jax.tree.leaves(new_state)  # the scanned block's router_bias [layers, E]
    assert bias.shape == (cfg.n_repeats, moe.n_routed)
    load = np.asarray(aux["metrics"]["moe_load/block_0"])   # [layers, E]
    want = moe.bias_rate * np.sign(load.mean(-1, keepdims=True) - load)
    np.testing.assert_allclose(bias, want, atol=1e-7)
    assert "moe_seq_balance" in aux["losses"]
    # the next step routes with the new bias: a large bias step moves the load
    boosted = jax.tree.map(lambda b: b * 1e3, new_state)
    aux2, _ = train_forward({**variables, STATE_COLLECTION: boosted}, tokens)
    assert not np.allclose(aux2["metrics"]["moe_load/block_0"], load)


def test_jamba_attention_override_reaches_only_attention():
    """``attn_impl`` names the attention switch only, so a hybrid takes it: the attention
    block gets it, the Mamba mixers and the FFNs are untouched, and the model traces."""
    cfg = archs.preset("jamba", "tiny", attn_impl="blockwise", capacity_factor=2.0)
    mixers = [b.mixer for b in cfg.pattern]
    assert [getattr(m, "attn_impl", None) for m in mixers].count("blockwise") == 1
    assert mixers[4].attn_impl == "blockwise"
    assert all(b.ffn.capacity_factor == 2.0 for b in cfg.pattern if isinstance(b.ffn, MoEConfig))
    model = archs.build(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    logits, _ = jax.eval_shape(model.apply, variables, tokens)
    assert logits.shape == (1, 8, cfg.vocab_size)
