"""MoE dispatch paths against the dense reference, priority dropping, and the MoE layer
(state protocol, noise, causality, diagnostics, config errors)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import routers as R
from layers.moe import STATE_COLLECTION, MoEConfig
from layers.moe_dispatch import (capacity_plan, combine_from_assignments, combine_from_plan,
                                 dense_moe, dropless_moe, expert_choice_plan, onehot_moe, run_plan)

G, S, D, E, K, F = 2, 63, 48, 6, 2, 40  # awkward shapes: T=63, odd-ish E


def rel_rms(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30))


@functools.lru_cache(maxsize=None)
@functools.partial(jax.jit, static_argnums=0)
def problem(dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    x = jax.random.normal(ks[0], (G, S, D), jnp.float32)
    w = {"wi": jax.random.normal(ks[1], (E, D, F)) / D ** 0.5,
         "wg": jax.random.normal(ks[2], (E, D, F)) / D ** 0.5,
         "wo": jax.random.normal(ks[3], (E, F, D)) / F ** 0.5}
    scores = jax.nn.softmax(jax.random.normal(ks[4], (G, S, E)) * 2.0)
    cot = jax.random.normal(ks[5], (G, S, D))
    weights, experts = jax.vmap(lambda s: R.topk_route(s, K))(scores)
    return x.astype(dtype), jax.tree.map(lambda a: a.astype(dtype), w), weights, experts, cot


def dense_path(x, w, weights, experts):
    comb = combine_from_assignments(experts, weights, E).reshape(G * S, E)
    return dense_moe(x.reshape(G * S, D), comb, w).reshape(G, S, D)


PATHS = {
    "capacity": lambda x, w, wt, ex: run_plan(
        x, *jax.vmap(capacity_plan, in_axes=(0, 0, None, None))(ex, wt, E, S)[:2], w, E),
    "onehot": lambda x, w, wt, ex: onehot_moe(x, ex, wt, w, S)[0],
    "dropless": lambda x, w, wt, ex: dropless_moe(
        x.reshape(G * S, D), ex.reshape(-1, K), wt.reshape(-1, K), w).reshape(G, S, D),
}


def value_and_grads(fn, x, w, weights, experts, cot):
    """y and the gradients w.r.t. x, the expert weights and the combine weights."""
    @jax.jit
    def run(x, w, weights):
        y, vjp = jax.vjp(lambda x, w, wt: fn(x, w, wt, experts), x, w, weights)
        return y, vjp(cot.astype(y.dtype))
    return run(x, w, weights)


@functools.lru_cache(maxsize=None)
def reference():
    x, w, weights, experts, cot = problem()
    return value_and_grads(dense_path, x, w, weights, experts, cot)


@pytest.mark.parametrize("path", list(PATHS))
def test_dispatch_matches_dense_reference(path):
    """Ample capacity (C = S): values and gradients equal the dense reference (fp32)."""
    x, w, weights, experts, cot = problem()
    y, grads = value_and_grads(PATHS[path], x, w, weights, experts, cot)
    y_ref, grads_ref = reference()
    assert rel_rms(y, y_ref) < 1e-5
    for name, g, g_ref in zip(["x", "w", "weights"], grads, grads_ref):
        for leaf, leaf_ref in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            assert rel_rms(leaf, leaf_ref) < 1e-5, name


def test_capacity_dispatch_bf16():
    x, w, weights, experts, cot = problem(jnp.bfloat16)
    y, grads = value_and_grads(PATHS["capacity"], x, w, weights, experts, cot)
    y_ref, grads_ref = reference()
    assert y.dtype == jnp.bfloat16
    assert rel_rms(y, y_ref) < 2e-2
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert rel_rms(g, g_ref) < 3e-2


def test_expert_choice_and_threshold_plans_match_dense():
    x, w, _, _, _ = problem()
    scores = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(3), (G, S, E)))

    @jax.jit
    def expert_choice(x, w, scores):
        gates, tokens = jax.vmap(R.expert_choice_route, in_axes=(0, None))(scores, 20)
        plan = jax.vmap(expert_choice_plan, in_axes=(0, 0, None))(gates, tokens, S)
        comb = jax.vmap(combine_from_plan, in_axes=(0, None, None))(plan, S, E)
        y = run_plan(x, plan.slot_token, plan.slot_weight, w, E)
        return gates, tokens, comb, y, dense_moe(x.reshape(G * S, D), comb.reshape(G * S, E), w)

    @jax.jit
    def threshold(x, w, scores):
        wt, ex, valid = jax.vmap(R.threshold_route, in_axes=(0, None))(scores, jnp.full((E,), 0.2))
        plan = jax.vmap(capacity_plan, in_axes=(0, 0, None, None, None, 0))(
            ex, wt, E, S, "position", valid)
        comb = combine_from_assignments(ex, wt, E, valid).reshape(G * S, E)
        return (run_plan(x, plan.slot_token, plan.slot_weight, w, E),
                dense_moe(x.reshape(G * S, D), comb, w).reshape(G, S, D))

    gates, tokens, comb, y, y_ref = expert_choice(x, w, scores)
    # hand-built combine: expert e weighs its chosen tokens by their gates
    want = np.zeros((G, S, E))
    for g in range(G):
        for e in range(E):
            want[g, np.asarray(tokens[g, e]), e] = np.asarray(gates[g, e])
    np.testing.assert_allclose(comb, want, rtol=1e-6)
    assert rel_rms(y, y_ref.reshape(G, S, D)) < 1e-5
    # causal threshold routing (variable experts per token) with ample capacity
    y, y_ref = threshold(x, w, scores)
    assert rel_rms(y, y_ref) < 1e-5


# ----------------------------------------------------------------------------- dropping

WEIGHTS1 = jnp.array([0.9, 0.1, 0.5, 0.8, 0.3, 0.7, 0.6, 0.2])[:, None]
EXPERTS1 = jnp.array([0, 0, 0, 0, 0, 1, 0, 0])[:, None]
EXPERTS2 = jnp.array([[0, 1], [0, 1], [1, 0], [0, 1]])
WEIGHTS2 = jnp.array([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])


@pytest.mark.parametrize("experts,weights,priority,kept", [
    (EXPERTS1, WEIGHTS1, "position", [0, 1, 2, 5]),      # expert 0 keeps its first 3 tokens
    (EXPERTS1, WEIGHTS1, "score", [0, 3, 5, 6]),         # ... its 3 highest weights (0.9, 0.8, 0.6)
    (EXPERTS2, WEIGHTS2, "position", [(0, 0), (0, 1), (1, 0), (1, 1)]),
    (EXPERTS2, WEIGHTS2, "choice", [(0, 0), (0, 1), (1, 0), (2, 0)]),  # first choices first
], ids=["top1-position", "top1-score", "top2-position", "top2-choice"])
def test_overflow_drops_lowest_priority(experts, weights, priority, kept):
    s, k = experts.shape
    cap = 3 if k == 1 else 2
    want = np.zeros((s, k), bool)
    for item in kept:
        want[item if isinstance(item, tuple) else (item, 0)] = True
    x = jax.random.normal(jax.random.PRNGKey(1), (1, s, 8))
    w = {n: jax.random.normal(jax.random.PRNGKey(i), shp) for i, (n, shp) in
         enumerate([("wi", (2, 8, 4)), ("wg", (2, 8, 4)), ("wo", (2, 4, 8))])}

    @jax.jit
    def paths(x, w, experts, weights, want):
        plan = capacity_plan(experts, weights, 2, cap, priority)
        y = run_plan(x, plan.slot_token[None], plan.slot_weight[None], w, 2)
        y_ref = dense_moe(x[0], combine_from_assignments(experts, weights, 2, want), w)
        return plan.kept, y, y_ref, onehot_moe(x, experts[None], weights[None], w, cap, priority)

    plan_kept, y, y_ref, (y_oh, kept_oh) = paths(x, w, experts, weights, jnp.asarray(want))
    # the kept assignments are exactly the highest-priority ones; outputs use only them,
    # identically for the capacity and one-hot paths
    np.testing.assert_array_equal(plan_kept, want)
    assert rel_rms(y[0], y_ref) < 1e-5
    np.testing.assert_array_equal(kept_oh[0], want)
    assert rel_rms(y_oh, y) < 1e-5
    dropped = [t for t in range(s) if not want[t].any()]
    np.testing.assert_array_equal(np.asarray(y)[0, dropped], 0.0)  # residual only


# ----------------------------------------------------------------------------- the layer

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
    (y, aux), new = apply(m, train=True, mutable=[STATE_COLLECTION])(v, x)
    counts = aux["metrics"]["moe_load"] * (2 * 9 * cfg.k_active)
    want = 0.01 * np.sign(np.mean(counts) - counts)
    np.testing.assert_allclose(new[STATE_COLLECTION]["router_bias"], want, atol=1e-7)
    assert float(aux["metrics"]["moe_dropped"]) == 0.0
    # eval: read-only state (no update); no state at all: the initial (zero) bias
    ev = apply(m)
    y_eval, _ = ev(v, x)
    y_nostate, _ = ev({"params": v["params"]}, x)
    np.testing.assert_allclose(y_eval, y, atol=1e-6)
    np.testing.assert_allclose(y_nostate, y, atol=1e-6)
    # the stored bias steers the next step's selection (scaled up to flip choices for sure)
    v2 = {**v, STATE_COLLECTION: jax.tree.map(lambda b: 100.0 * b, new[STATE_COLLECTION])}
    assert not np.allclose(ev(v2, x)[0], y)


def test_noise_only_in_training():
    m = make(MoEConfig(n_experts=4, top_k=2, hidden=32, noise="gumbel", dispatch="dense"))
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 7, 16))
    v = init(m, x)
    y0, _ = apply(m)(v, x)  # no "noise" rng needed
    tr = jax.jit(lambda v, x, key: m.apply(v, x, train=True, rngs={"noise": key}))
    y1, _ = tr(v, x, jax.random.PRNGKey(2))
    y2, _ = tr(v, x, jax.random.PRNGKey(3))
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
    (y1, aux), (y2, _) = f(x), f(x2)
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
    _, aux = apply(m)(v, x)

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
    (dict(n_groups=3), r"moe\.n_groups=3"),
    (dict(router="expert_threshold", dispatch="dropless"), r"moe\.dispatch='dropless'"),
    (dict(capacity_factor=0.0), r"moe\.capacity_factor"),
], ids=["expert-choice-causal", "score-priority", "router", "top-k", "granularity", "groups",
        "threshold-dropless", "capacity"])
def test_validate_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kw).validate(16, "moe")
