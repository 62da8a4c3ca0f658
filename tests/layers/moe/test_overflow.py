"""The XLA dropless path (layers/moe/overflow.py and ``dispatch.buffered_dropless_moe``)
against the dense reference: values and gradients (x, expert weights, combine weights) on
awkward routings: empty experts, every token on one expert, heavy and no overflow, M*k
not a multiple of any tile, k = 1 and 2, fp32 and bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.moe import routers as R
from layers.moe.dispatch import (buffered_dropless_moe, combine_from_assignments, dense_moe,
                                 sort_assignments)
from layers.moe.overflow import tiled_moe
from tests.helpers import rel_rms

D, F, E = 24, 20, 5
SMALL_TILES = ((16, 2), (4, 3))  # several tiles per expert at these sizes


def routing(kind: str, m: int, k: int, seed: int = 0):
    """(weights [M, k] fp32, experts [M, k] int32)."""
    key = jax.random.PRNGKey(seed)
    if kind == "random":
        logits = jax.random.normal(key, (m, E)) * 2.0
    elif kind == "skewed":  # expert 1 in every token, experts 3 and 4 in none
        logits = jax.random.normal(key, (m, E)) + jnp.array([1.0, 4.0, 0.5, -30.0, -30.0])
    elif kind == "one-expert":  # every token's first choice is expert 2
        logits = jax.random.normal(key, (m, E)) + jnp.array([0.0, 0.0, 50.0, 0.0, -50.0])
    else:
        raise ValueError(kind)
    return R.topk_route(jax.nn.softmax(logits), k)


def params(dtype, seed: int = 1):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    w = {"wi": jax.random.normal(ks[0], (E, D, F)) / D ** 0.5,
         "wg": jax.random.normal(ks[1], (E, D, F)) / D ** 0.5,
         "wo": jax.random.normal(ks[2], (E, F, D)) / F ** 0.5}
    return jax.tree.map(lambda a: a.astype(dtype), w)


@functools.partial(jax.jit, static_argnums=(0,))
def value_and_grads(fn, x, w, weights, cot):
    y, vjp = jax.vjp(fn, x, w, weights)
    return y, vjp(cot.astype(y.dtype))


def check(fn, weights, experts, dtype, tol):
    """``fn(x, w, weights, experts=...)`` and its gradients equal the dense fp32 reference."""
    m = experts.shape[0]
    x = jax.random.normal(jax.random.PRNGKey(2), (m, D)).astype(dtype)
    cot = jax.random.normal(jax.random.PRNGKey(3), (m, D))
    w = params(dtype)
    ref = lambda x, w, wt: dense_moe(x.astype(jnp.float32), combine_from_assignments(  # noqa: E731
        experts, wt, E), jax.tree.map(lambda a: a.astype(jnp.float32), w))
    y, grads = value_and_grads(functools.partial(fn, experts=experts), x, w, weights, cot)
    y_ref, grads_ref = value_and_grads(ref, x, w, weights, cot)
    assert y.dtype == dtype
    assert rel_rms(y, y_ref) < tol
    for name, g, g_ref in zip(["x", "w", "weights"], grads, grads_ref):
        for leaf, leaf_ref in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            assert rel_rms(leaf, leaf_ref) < tol, name


CASES = [  # (routing, M, k, capacity of the buffers)
    ("random", 63, 2, None),        # M*k = 126: no tile size divides the runs
    ("random", 63, 2, 3),           # tiny buffers: nearly everything overflows
    ("random", 63, 2, 63),          # buffers hold every assignment: empty loop
    ("skewed", 80, 2, None),        # two empty experts, one heavy overflow
    ("one-expert", 50, 1, None),    # every token on one expert (k = 1)
    ("one-expert", 50, 2, None),    # every first choice on one expert (k = 2)
    ("random", 37, 1, None),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,m,k,cap", CASES,
                         ids=[f"{c[0]}-M{c[1]}-k{c[2]}-cap{c[3]}" for c in CASES])
def test_buffered_dropless_matches_dense(kind, m, k, cap, dtype):
    weights, experts = routing(kind, m, k)
    counts = np.bincount(np.asarray(experts).reshape(-1), minlength=E)
    if kind == "skewed":
        assert counts[3] == counts[4] == 0 and counts[1] == m  # expert 1 in every token
    if kind == "one-expert":
        assert counts[2] == m
    fn = lambda x, w, wt, experts: buffered_dropless_moe(  # noqa: E731
        x, experts, wt, w, capacity=cap, tile_sizes=SMALL_TILES)
    check(fn, weights, experts, dtype, 1e-5 if dtype == jnp.float32 else 3e-2)


@pytest.mark.parametrize("kind,k", [("random", 2), ("skewed", 2), ("one-expert", 1)])
@pytest.mark.parametrize("tiles", [SMALL_TILES, ((8, 1),), ((32, 2), (8, 2), (2, 5))],
                         ids=["16x2+4x3", "8x1", "32x2+8x2+2x5"])
def test_tiled_loop_alone_matches_dense(kind, k, tiles):
    """All assignments through the loop (no buffers), for several tile plans."""
    m = 45
    weights, experts = routing(kind, m, k, seed=4)

    def fn(x, w, wt, experts):
        s = sort_assignments(experts, wt, E)
        return tiled_moe(x, wt, w, s.order, s.starts, s.ends, tiles).astype(x.dtype)
    check(fn, weights, experts, jnp.float32, 1e-5)


def test_loop_skips_assignments_outside_the_runs():
    """Only the assignments in [starts, ends) of the sorted list are computed."""
    m, k = 40, 2
    weights, experts = routing("random", m, k, seed=5)
    valid = jax.random.bernoulli(jax.random.PRNGKey(6), 0.5, (m, k))
    x = jax.random.normal(jax.random.PRNGKey(2), (m, D))
    w = params(jnp.float32)
    s = sort_assignments(experts, weights, E, valid=valid)      # invalid ones sort last
    y = jax.jit(lambda x, w: tiled_moe(x, weights, w, s.order, s.starts, s.ends,
                                       SMALL_TILES))(x, w)
    y_ref = dense_moe(x, combine_from_assignments(experts, weights, E, valid), w)
    assert rel_rms(y, y_ref) < 1e-5
    np.testing.assert_array_equal(np.asarray(s.ends[-1]), np.asarray(valid.sum()))
