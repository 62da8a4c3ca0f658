"""The recurrent family (Mamba, Mamba-2, RWKV-6 time mixing and its channel-mixing FFN,
RetNet, linear attention, Performer) at module level: every implementation == the sequential reference ==
prefill + token-by-token decode, in outputs, final states and gradients; packed
segments == separate sequences; bf16 close to fp32; fixed-size state; finite at
T = 16k. One jit per mixer keeps the CPU compile budget small."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from tests.helpers import rel_rms
from layers.feature_maps import favor_features, orthogonal_gaussian
from layers.recurrent.linear_attention import (LinearAttentionConfig, PerformerConfig,
                                               kernel_attention)
from layers.recurrent.mamba import MambaConfig
from layers.recurrent.mamba2 import Mamba2Config
from layers.recurrent.retnet import RetNetConfig
from layers.recurrent.rwkv6 import RWKV6ChannelMixConfig, RWKV6Config
from pallas_kernels.attention.reference import reference_attention

D, B, T, T1, LA = 24, 2, 29, 11, 13   # T and T1 are not multiples of the chunk (8)

# (id, config, variants compared with the config's own scan_impl: field overrides). The
# channel-mixing FFN follows the same call contract (cache, aux) as the mixers.
MIXERS = [
    ("mamba", MambaConfig(d_state=4, scan_chunk=8),
     [dict(scan_impl="sequential"), dict(scan_chunk=0)]),
    ("mamba_zoh_jamba", MambaConfig(d_state=4, scan_chunk=8, discretization="zoh",
                                    dt_bc_norm=True, proj_bias=True),
     [dict(scan_impl="sequential")]),
    ("mamba2", Mamba2Config(d_state=8, head_dim=8, n_bc_heads=2, chunk=8),     # 6 heads, 2 B/C heads
     [dict(scan_impl="sequential"), dict(scan_impl="parallel"), dict(scan_impl="associative")]),
    ("rwkv6", RWKV6Config(head_dim=8, mix_rank=4, decay_rank=6, chunk=8),      # 3 heads
     [dict(scan_impl="sequential"), dict(scan_impl="parallel"), dict(scan_impl="associative")]),
    ("rwkv6_channel_mix", RWKV6ChannelMixConfig(hidden=40), []),
    ("retnet", RetNetConfig(n_heads=3, chunk=8),
     [dict(scan_impl="sequential"), dict(scan_impl="parallel"), dict(scan_impl="associative")]),
    ("linear_attention", LinearAttentionConfig(n_heads=3, chunk=8),
     [dict(scan_impl="sequential"), dict(scan_impl="parallel"), dict(scan_impl="associative")]),
    ("retnet_rms_out_norm", RetNetConfig(n_heads=3, chunk=8, out_norm="rms"),
     [dict(scan_impl="sequential")]),
    ("linear_attention_relu_unnormalized", LinearAttentionConfig(n_heads=3, chunk=8,
                                                                 feature_map="relu", normalize=False),
     [dict(scan_impl="sequential")]),
    ("performer", PerformerConfig(n_heads=3, n_features=12, chunk=8),
     [dict(scan_impl="sequential"), dict(scan_impl="parallel"), dict(scan_impl="associative")]),
]


# Tiny shapes: XLA:CPU backend optimizations cost more compile time than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def init_perturbed(module, x, pos, key=0):
    """Init, then add noise to every parameter so zero/one-initialized paths (LoRA A,
    D skips, norm affines) are exercised."""
    @jit
    def init(x, pos):
        variables = module.init(jax.random.PRNGKey(key), x, positions=pos)
        leaves, tree = jax.tree.flatten(variables["params"])
        keys = jax.random.split(jax.random.PRNGKey(key + 100), len(leaves))
        leaves = [p + 0.2 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
        return {**variables, "params": jax.tree.unflatten(tree, leaves)}
    return init(x, pos)


@pytest.mark.parametrize("name,cfg,variants", MIXERS, ids=[m[0] for m in MIXERS])
def test_mixer_forms_decode_segments(name, cfg, variants):
    cfg.validate(D, name)
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    module = cfg.make(D, jnp.float32, jnp.float32)
    variables = init_perturbed(module, x, pos)
    cfgs = [cfg] + [dataclasses.replace(cfg, **v) for v in variants]
    seg = jnp.broadcast_to((jnp.arange(T) >= LA).astype(jnp.int32), (B, T))
    pos_seg = jnp.where(jnp.arange(T) >= LA, jnp.arange(T) - LA, jnp.arange(T)).astype(jnp.int32)
    pos_seg = jnp.broadcast_to(pos_seg, (B, T))

    @jit
    def run(variables, x):
        out = {}
        wo = jnp.cos(jnp.arange(B * T * D, dtype=jnp.float32)).reshape(B, T, D)
        for i, c in enumerate(cfgs):   # outputs and final state of every form
            m = c.make(D, jnp.float32, jnp.float32)

            def loss(params, x):
                y, state, aux = m.apply({**variables, "params": params}, x, positions=pos,
                                        cache=c.init_cache(D, B, T, jnp.float32))
                assert aux == {}
                return jnp.sum(y * wo) + sum(jnp.sum(s.astype(jnp.float32) ** 2)
                                             for s in jax.tree.leaves(state)), (y, state)
            if i < 2:  # gradients: the default form and the sequential reference (the
                # primitives' tests compare the gradients of all four forms)
                out[f"form{i}"] = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
                    variables["params"], x)
            else:
                out[f"form{i}"] = (loss(variables["params"], x), None)
        out["no_cache"] = module.apply(variables, x, positions=pos)[0]
        # prefill T1 tokens, then decode one token at a time
        y1, cache, _ = module.apply(variables, x[:, :T1], positions=pos[:, :T1],
                                    cache=cfg.init_cache(D, B, T, jnp.float32))

        def step(cache, xt):
            xt, pt = xt
            y, cache, _ = module.apply(variables, xt[:, None], positions=pt[:, None], cache=cache)
            return cache, y[:, 0]
        cache, ys = jax.lax.scan(step, cache, (x[:, T1:].swapaxes(0, 1), pos[:, T1:].T))
        out["decode"] = (jnp.concatenate([y1, ys.swapaxes(0, 1)], axis=1), cache)
        # packed segments == separate sequences
        out["packed"] = module.apply(variables, x, positions=pos_seg, segment_ids=seg)[0]
        out["separate"] = jnp.concatenate([module.apply(variables, x[:, :LA], positions=pos[:, :LA])[0],
                                           module.apply(variables, x[:, LA:], positions=pos[:, :T - LA])[0]],
                                          axis=1)
        # bf16 compute with the same fp32 parameters
        out["bf16"] = cfg.make(D, jnp.bfloat16, jnp.float32).apply(variables, x.astype(jnp.bfloat16),
                                                                    positions=pos)[0]
        return out

    out = run(variables, x)
    (_, (y_ref, state_ref)), grads_ref = out["form0"]
    assert bool(jnp.isfinite(y_ref).all())
    for i in range(1, len(cfgs)):
        (_, (y, state)), grads = out[f"form{i}"]
        assert rel_rms(y, y_ref) < 1e-5, cfgs[i]
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(state_ref)):
            assert rel_rms(got, want) < 1e-5, cfgs[i]
        if grads is not None:
            for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
                assert rel_rms(got, want) < 1e-4, cfgs[i]
    assert rel_rms(out["no_cache"], y_ref) < 1e-5
    y_dec, cache_dec = out["decode"]
    assert rel_rms(y_dec, y_ref) < 1e-5
    for got, want in zip(jax.tree.leaves(cache_dec), jax.tree.leaves(state_ref)):
        assert rel_rms(got, want) < 1e-5
    assert rel_rms(out["packed"], out["separate"]) < 1e-5
    assert out["bf16"].dtype == jnp.bfloat16
    assert rel_rms(out["bf16"], y_ref) < 5e-2


@pytest.mark.parametrize("name,cfg,variants", MIXERS, ids=[m[0] for m in MIXERS])
def test_state_size_is_fixed_and_matches_cache(name, cfg, variants):
    sizes = {cfg.state_size(D, n) for n in (16, 1024, 1 << 20)}
    assert len(sizes) == 1
    cache = cfg.init_cache(D, 1, 64, jnp.float32)
    assert sizes.pop() == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) > 0


LONG = [  # one tiny-width case per family at T = 16k: forward is finite
    ("mamba", MambaConfig(d_state=4, expand=1)),
    ("mamba2", Mamba2Config(d_state=4, head_dim=8, expand=1)),
    ("rwkv6", RWKV6Config(head_dim=4, mix_rank=2, decay_rank=2)),
    ("retnet", RetNetConfig(n_heads=2)),
    ("performer", PerformerConfig(n_heads=2, n_features=8)),
]


@pytest.mark.parametrize("name,cfg", LONG, ids=[m[0] for m in LONG])
def test_long_sequence_finite(name, cfg):
    d, t = 8, 16384
    x = jax.random.normal(jax.random.PRNGKey(0), (1, t, d))
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    module = cfg.make(d, jnp.float32, jnp.float32)
    variables = jit(lambda x: module.init(jax.random.PRNGKey(0), x[:, :16], positions=pos[:, :16]))(x)
    y = jit(lambda v, x: module.apply(v, x, positions=pos)[0])(variables, x)
    assert bool(jnp.isfinite(y).all())
    assert float(jnp.std(y[:, -512:])) > 0


def test_performer_approaches_softmax_attention():
    """FAVOR+ estimate of causal softmax attention: the error falls as the number of
    features grows (fixed seeds; averaged over 4 projection draws)."""
    b, t, h, dh = 1, 32, 2, 8
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (b, t, h, dh)) * 0.5 for kk in ks)
    exact = reference_attention(q, k, v, causal=True)     # softmax(q k^T / sqrt(Dh))

    @jit
    def errors(keys):
        def approx(key, n):
            w = orthogonal_gaussian(key, n, dh)
            s = dh ** -0.25
            fq = favor_features(q * s, w, is_query=True)
            fk = favor_features(k * s, w, is_query=False)
            o = kernel_attention(fq, fk, v, eps=1e-6, h0=None, segment_ids=None,
                                 scan_impl="chunked", chunk=8)[0]
            return jnp.sqrt(jnp.mean((o - exact) ** 2) / jnp.mean(exact ** 2))
        return [jnp.mean(jax.vmap(lambda kk: approx(kk, n))(keys)) for n in (8, 64, 512)]

    errs = [float(e) for e in errors(jax.random.split(jax.random.PRNGKey(1), 4))]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.1, errs


def test_performer_feature_redraw_follows_rng():
    cfg = PerformerConfig(n_heads=2, n_features=8)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 10, 16))
    pos = jnp.arange(10)[None]
    m = cfg.make(16, jnp.float32, jnp.float32)
    variables = m.init(jax.random.PRNGKey(1), x, positions=pos)
    assert "projection" in variables["state"]

    @jit
    def run(variables, key1, key2):
        train = lambda key: m.apply(variables, x, positions=pos, train=True, rngs={"features": key})[0]
        return (m.apply(variables, x, positions=pos)[0], train(key1), train(key1), train(key2))

    y_eval, y_a, y_a2, y_b = run(variables, jax.random.PRNGKey(2), jax.random.PRNGKey(3))
    assert rel_rms(y_a, y_a2) == 0.0          # fixed key: deterministic
    assert rel_rms(y_a, y_b) > 1e-3           # new key: new features
    assert rel_rms(y_a, y_eval) > 1e-3        # eval uses the stored projection
    with pytest.raises(ValueError, match="features"):
        m.apply(variables, x, positions=pos, train=True)


def test_validation_names_the_field():
    with pytest.raises(ValueError, match=r"mamba2\.head_dim"):
        Mamba2Config(head_dim=48).validate(64, "mamba2")
    with pytest.raises(ValueError, match=r"mamba2\.n_bc_heads"):
        Mamba2Config(head_dim=16, n_bc_heads=3).validate(64, "mamba2")
    with pytest.raises(ValueError, match=r"rwkv6\.head_dim"):
        RWKV6Config(head_dim=48).validate(64, "rwkv6")
    with pytest.raises(ValueError, match=r"retnet\.scan_impl"):
        RetNetConfig(scan_impl="fast").validate(64, "retnet")
    with pytest.raises(ValueError, match=r"retnet\.n_kv_heads"):
        RetNetConfig(n_heads=4, n_kv_heads=2).validate(64, "retnet")
    with pytest.raises(ValueError, match=r"performer\.chunk"):
        PerformerConfig(chunk=0).validate(64, "performer")
    with pytest.raises(ValueError, match=r"rwkv6_channel_mix\.layer_ratio"):
        RWKV6ChannelMixConfig(layer_ratio=1.5).validate(64, "rwkv6_channel_mix")
    with pytest.raises(ValueError, match=r"mamba\.dt_min"):
        MambaConfig(dt_min=0.5, dt_max=0.1).validate(64, "mamba")
