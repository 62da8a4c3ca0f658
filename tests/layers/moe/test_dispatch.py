"""MoE dispatch paths (layers/moe/dispatch.py) against the dense reference (values and
gradients, fp32 and bf16), expert-choice / threshold plans, and priority dropping."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.moe import routers as R
from layers.moe.dispatch import (capacity_plan, combine_from_assignments, combine_from_plan,
                                 dense_moe, dropless_moe, expert_choice_plan, onehot_moe, run_plan,
                                 sorted_dropless_moe)
from tests.helpers import rel_rms

B, T, D, E, TOP_K, F = 2, 63, 48, 6, 2, 40  # awkward shapes: T=63, odd-ish E


@functools.lru_cache(maxsize=None)
@functools.partial(jax.jit, static_argnums=0)
def problem(dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    x = jax.random.normal(ks[0], (B, T, D), jnp.float32)
    w = {"wi": jax.random.normal(ks[1], (E, D, F)) / D ** 0.5,
         "wg": jax.random.normal(ks[2], (E, D, F)) / D ** 0.5,
         "wo": jax.random.normal(ks[3], (E, F, D)) / F ** 0.5}
    scores = jax.nn.softmax(jax.random.normal(ks[4], (B, T, E)) * 2.0)
    cot = jax.random.normal(ks[5], (B, T, D))
    weights, experts = jax.vmap(lambda s: R.topk_route(s, TOP_K))(scores)
    return x.astype(dtype), jax.tree.map(lambda a: a.astype(dtype), w), weights, experts, cot


def dense_path(x, w, weights, experts):
    comb = combine_from_assignments(experts, weights, E).reshape(B * T, E)
    return dense_moe(x.reshape(B * T, D), comb, w).reshape(B, T, D)


PATHS = {
    "capacity": lambda x, w, wt, ex: run_plan(
        x, *jax.vmap(capacity_plan, in_axes=(0, 0, None, None))(ex, wt, E, T)[:2], w, E),
    "onehot": lambda x, w, wt, ex: onehot_moe(x, ex, wt, w, T)[0],
    # on CPU: capacity buffers at the mean load + the overflow loop (layers/moe/overflow.py)
    "dropless": lambda x, w, wt, ex: dropless_moe(
        x.reshape(B * T, D), ex.reshape(-1, TOP_K), wt.reshape(-1, TOP_K), w).reshape(B, T, D),
    # the kernel path's structure (sort + three grouped matmuls), with the XLA gmm
    "dropless-sorted": lambda x, w, wt, ex: sorted_dropless_moe(
        x.reshape(B * T, D), ex.reshape(-1, TOP_K), wt.reshape(-1, TOP_K), w,
        gmm_impl="xla").reshape(B, T, D),
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
    """Ample capacity (Cap = T): values and gradients equal the dense reference (fp32)."""
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
    scores = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(3), (B, T, E)))

    @jax.jit
    def expert_choice(x, w, scores):
        gates, tokens = jax.vmap(R.expert_choice_route, in_axes=(0, None))(scores, 20)
        plan = jax.vmap(expert_choice_plan, in_axes=(0, 0, None))(gates, tokens, T)
        comb = jax.vmap(combine_from_plan, in_axes=(0, None, None))(plan, T, E)
        y = run_plan(x, plan.slot_token, plan.slot_weight, w, E)
        return gates, tokens, comb, y, dense_moe(x.reshape(B * T, D), comb.reshape(B * T, E), w)

    @jax.jit
    def threshold(x, w, scores):
        wt, ex, valid = jax.vmap(R.threshold_route, in_axes=(0, None))(scores, jnp.full((E,), 0.2))
        plan = jax.vmap(capacity_plan, in_axes=(0, 0, None, None, None, 0))(
            ex, wt, E, T, "position", valid)
        comb = combine_from_assignments(ex, wt, E, valid).reshape(B * T, E)
        return (run_plan(x, plan.slot_token, plan.slot_weight, w, E),
                dense_moe(x.reshape(B * T, D), comb, w).reshape(B, T, D))

    gates, tokens, comb, y, y_ref = expert_choice(x, w, scores)
    # hand-built combine: expert e weighs its chosen tokens by their gates
    want = np.zeros((B, T, E))
    for b in range(B):
        for e in range(E):
            want[b, np.asarray(tokens[b, e]), e] = np.asarray(gates[b, e])
    np.testing.assert_allclose(comb, want, rtol=1e-6)
    assert rel_rms(y, y_ref.reshape(B, T, D)) < 1e-5
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
    t, k = experts.shape
    cap = 3 if k == 1 else 2
    want = np.zeros((t, k), bool)
    for item in kept:
        want[item if isinstance(item, tuple) else (item, 0)] = True
    x = jax.random.normal(jax.random.PRNGKey(1), (1, t, 8))
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
    dropped = [i for i in range(t) if not want[i].any()]
    np.testing.assert_array_equal(np.asarray(y)[0, dropped], 0.0)  # residual only
