"""Presets of the recurrent family (mamba, mamba2, rwkv6, retnet, linear_transformer,
performer): registered, every size builds, and at size tiny the model's prefill +
token-by-token decode equals the full forward (docs/conventions.md)."""

import functools
import math

import jax
import jax.numpy as jnp
import pytest

import archs
from layers.recurrent.rwkv6 import RWKV6ChannelMixConfig, RWKV6Config
from tests.helpers import rel_rms

PRESETS = ["mamba", "mamba2", "rwkv6", "retnet", "linear_transformer", "performer"]
# Tiny shapes: XLA:CPU backend optimizations cost more compile time than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def n_params(variables) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name", PRESETS)
def test_sizes_build_with_expected_parameter_counts(name):
    assert name in archs.names()
    for size, lo, hi in (("tiny", 20_000, 1_000_000), ("small", 300_000, 2_500_000)):
        cfg = archs.preset(name, size)
        model = archs.build(cfg)
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
        assert lo < n_params(shapes) < hi, (size, n_params(shapes))
        # decode state is fixed-size: no growth with the context length
        assert model.state_size(16) == model.state_size(cfg.max_len) > 0


@pytest.mark.parametrize("name", PRESETS)
def test_tiny_prefill_then_decode_equals_forward(name):
    cfg = archs.preset(name, "tiny")
    model = archs.build(cfg)
    b, t, t1 = 2, 21, 8
    tokens = jax.random.randint(jax.random.PRNGKey(0), (b, t), 0, cfg.vocab_size)

    @jit
    def run(tokens):
        variables = model.init(jax.random.PRNGKey(1), tokens)
        logits, aux = model.apply(variables, tokens)
        cache = model.init_cache(b, 32)
        first, _, cache = model.apply(variables, tokens[:, :t1], cache=cache)

        def step(cache, tok):
            out, _, cache = model.apply(variables, tok[:, None], cache=cache)
            return cache, out[:, 0]
        cache, rest = jax.lax.scan(step, cache, tokens[:, t1:].T)
        return logits, aux, jnp.concatenate([first, rest.swapaxes(0, 1)], axis=1), cache.index

    logits, aux, decoded, index = run(tokens)
    assert logits.shape == (b, t, cfg.vocab_size)
    assert bool(jnp.isfinite(logits).all())
    assert aux == {"losses": {}, "metrics": {}}
    assert int(index) == t
    assert rel_rms(decoded, logits) < 1e-5


def test_rwkv6_layer_is_one_block_time_mix_then_channel_mix_ffn():
    """``n_layers`` counts RWKV layers: one block per layer (time mixing as the mixer,
    channel mixing as the FFN with its one-token cache); the decode state counts both."""
    cfg = archs.preset("rwkv6", "tiny")
    (spec,) = cfg.pattern
    assert isinstance(spec.mixer, RWKV6Config) and isinstance(spec.ffn, RWKV6ChannelMixConfig)
    d, dh = cfg.d_model, spec.mixer.head_dim
    per_layer = 4 * (d + (d // dh) * dh * dh) + 4 * d   # fp32: TM shift + wkv state, CM shift
    assert archs.build(cfg).state_size(16) == cfg.n_layers * per_layer
