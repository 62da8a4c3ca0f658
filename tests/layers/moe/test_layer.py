"""The MoE layer (layers/moe/layer.py): state protocol, noise, causality, losses and
diagnostics, fine-grained split, config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.moe import STATE_COLLECTION, MoEConfig
from layers.moe import routers as R


def make(cfg, d=16):
    cfg.validate(d)
    return cfg.make(d, jnp.float32, jnp.float32)


def init(m, x, seed=1):
    """Variables with the module's shapes drawn in numpy (compiling Flax's initializers
    costs seconds on CPU; these tests need no particular init)."""
    rng = np.random.RandomState(seed)

    def draw(path, s):
        if STATE_COLLECTION in jax.tree_util.keystr(path):
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(rng.standard_normal(s.shape) * s.shape[-2 if len(s.shape) > 1 else 0] ** -0.5,
                           s.dtype)
    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(m.init, jax.random.PRNGKey(0), x))


def apply(m, **kw):
    """jit(module.apply) with static keyword arguments (CPU: eager op-by-op is slow)."""
    return jax.jit(functools.partial(m.apply, **kw))


def test_aux_free_bias_state_protocol():
    cfg = MoEConfig(n_experts=4, top_k=1, granularity=2, hidden=32, score="sigmoid",
                    aux_free_bias=True, bias_rate=0.01, n_shared=1, dispatch="capacity",
                    capacity_factor=4.0)
    m = make(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 16))
    v = init(m, x)
    bias0 = v[STATE_COLLECTION]["router_bias"]
    np.testing.assert_array_equal(bias0, 0.0)
    (y, _, aux), new = apply(m, train=True, mutable=[STATE_COLLECTION])(v, x)
    counts = aux["metrics"]["moe_load"] * (2 * 9 * cfg.k_active)
    want = 0.01 * np.sign(np.mean(counts) - counts)
    np.testing.assert_allclose(new[STATE_COLLECTION]["router_bias"], want, atol=1e-7)
    assert float(aux["metrics"]["moe_dropped"]) == 0.0
    # eval: read-only state (no update); no state at all: the initial (zero) bias
    ev = apply(m)
    y_eval, _, _ = ev(v, x)
    y_nostate, _, _ = ev({"params": v["params"]}, x)
    np.testing.assert_allclose(y_eval, y, atol=1e-6)
    np.testing.assert_allclose(y_nostate, y, atol=1e-6)
    # the stored bias steers the next step's selection (scaled up to flip choices for sure)
    v2 = {**v, STATE_COLLECTION: jax.tree.map(lambda b: 100.0 * b, new[STATE_COLLECTION])}
    assert not np.allclose(ev(v2, x)[0], y)


def test_noise_only_in_training():
    m = make(MoEConfig(n_experts=4, top_k=2, hidden=32, noise="gumbel", dispatch="dense"))
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 7, 16))
    v = init(m, x)
    y0, _, _ = apply(m)(v, x)  # no "noise" rng needed
    tr = jax.jit(lambda v, x, key: m.apply(v, x, train=True, rngs={"noise": key}))
    y1, _, _ = tr(v, x, jax.random.PRNGKey(2))
    y2, _, _ = tr(v, x, jax.random.PRNGKey(3))
    assert not np.allclose(y1, y0) and not np.allclose(y1, y2)
    with pytest.raises(Exception, match="noise"):
        jax.jit(lambda v, x: m.apply(v, x, train=True))(v, x)


@pytest.mark.parametrize("kw,causal", [
    (dict(router="topk", priority="position", capacity_factor=0.5), True),
    (dict(router="expert_threshold", capacity_factor=0.5), True),
    (dict(router="expert_choice", allow_noncausal_routing=True), False),
], ids=["capacity-position", "expert-threshold", "expert-choice-leaks"])
def test_causality(kw, causal):
    """Changing future tokens never changes earlier outputs, except under expert choice."""
    cfg = MoEConfig(n_experts=4, top_k=2, hidden=32, **kw)
    assert cfg.causal == causal
    m = make(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 24, 16))
    x2 = x.at[:, 12:].set(jax.random.normal(jax.random.PRNGKey(5), (2, 12, 16)) * 3.0)
    v = init(m, x)
    f = jax.jit(lambda x: m.apply(v, x))
    (y1, _, aux), (y2, _, _) = f(x), f(x2)
    assert np.allclose(y1[:, :12], y2[:, :12], atol=1e-6) == causal
    if causal:  # the capacity is tight: tokens are dropped, and only by earlier tokens
        assert float(aux["metrics"]["moe_dropped"]) > 0.1


def test_layer_losses_and_metrics():
    coefs = dict(load_balance_coef=0.01, seq_balance_coef=0.02, z_loss_coef=1e-3,
                 entropy_coef=0.1, kl_uniform_coef=0.2, load_deviation_coef=0.3)
    cfg = MoEConfig(n_experts=4, top_k=2, hidden=32, dispatch="dropless",
                    shared_hidden=24, shared_gate=True, **coefs)
    m = make(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 16))
    v = init(m, x)
    assert set(v["params"]) == {"router", "wi", "wg", "wo", "shared", "shared_gate"}
    y, cache, aux = apply(m, positions=None, segment_ids=None, cache=None)(v, x)
    assert y.shape == x.shape and cache is None  # FFN contract: stateless, (y, None, aux)

    @jax.jit
    def expected(x, router):
        logits = jnp.einsum("btd,de->bte", x, router)
        p = jax.nn.softmax(logits)
        sel = jax.nn.one_hot(jax.lax.top_k(p, 2)[1], 4).sum(-2)
        fp, fs = p.reshape(-1, 4), sel.reshape(-1, 4)
        return fp, fs, {"moe_load_balance": 0.01 * R.switch_balance_loss(fp, fs),
                        "moe_seq_balance": 0.02 * R.sequence_balance_loss(p, sel, 2),
                        "moe_z_loss": 1e-3 * R.z_loss(logits), "moe_entropy": 0.1 * R.entropy_loss(fp),
                        "moe_kl_uniform": 0.2 * R.kl_uniform_loss(fp),
                        "moe_load_deviation": 0.3 * R.load_deviation_loss(fp, fs)}

    fp, fs, want = expected(x, v["params"]["router"].value)
    assert set(aux["losses"]) == set(want)
    for name, val in want.items():
        np.testing.assert_allclose(aux["losses"][name], val, rtol=1e-5, err_msg=name)
    met = aux["metrics"]
    np.testing.assert_allclose(met["moe_load"], fs.sum(0) / fs.sum(), rtol=1e-6)
    load = np.asarray(met["moe_load"])
    np.testing.assert_allclose(met["moe_load_cv"], np.std(load) / np.mean(load), rtol=1e-5)
    np.testing.assert_allclose(met["moe_router_entropy"], want["moe_entropy"] / 0.1, rtol=1e-6)
    assert float(met["moe_dropped"]) == 0.0


def test_fine_grained_split_keeps_params_and_active_width():
    base = MoEConfig(n_experts=4, top_k=1, hidden=64)
    fine = MoEConfig(n_experts=4, top_k=1, hidden=64, granularity=4)
    x = jnp.zeros((1, 3, 16))
    count = lambda c: sum(a.size for a in jax.tree.leaves(
        jax.eval_shape(make(c).init, jax.random.PRNGKey(0), x)["params"]))
    router = lambda c: 16 * c.n_routed
    assert count(base) - router(base) == count(fine) - router(fine)
    assert (fine.n_routed, fine.k_active, fine.expert_hidden(16)) == (16, 4, 16)
    assert base.k_active * base.expert_hidden(16) == fine.k_active * fine.expert_hidden(16)


@pytest.mark.parametrize("kw,match", [
    (dict(router="expert_choice"), r"router='expert_choice'.*future.*allow_noncausal_routing"),
    (dict(priority="score"), r"priority='score'.*future"),
    (dict(router="learned"), r"moe\.router='learned' is not allowed"),
    (dict(top_k=9), r"moe\.top_k=9"),
    (dict(hidden=30, granularity=4), r"moe\.granularity=4 must divide"),
    (dict(n_expert_pools=3), r"moe\.n_expert_pools=3"),
    (dict(router="expert_threshold", dispatch="dropless"), r"moe\.dispatch='dropless'"),
    (dict(capacity_factor=0.0), r"moe\.capacity_factor"),
    (dict(dispatch="dropless", gmm_impl="cuda"), r"moe\.gmm_impl='cuda' is not allowed.*'xla'"),
], ids=["expert-choice-causal", "score-priority", "router", "top-k", "granularity", "pools",
        "threshold-dropless", "capacity", "gmm-impl"])
def test_validate_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kw).validate(16, "moe")
