"""Routers, balancing losses and state updates (layers/moe/routers.py) on hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.moe import routers as R
from layers.moe.dispatch import priority_order


def close(a, b, tol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- routers

SCORES = jnp.array([[0.1, 0.5, 0.3, 0.1]])


@pytest.mark.parametrize("renorm,scaling,expected", [
    (True, 1.0, [0.625, 0.375]),     # Mixtral: renormalized over the selected two
    (False, 1.0, [0.5, 0.3]),        # Qwen2-MoE: raw softmax weights
    (True, 2.5, [1.5625, 0.9375]),   # DeepSeek-V3 routed scaling
], ids=["renorm", "no-renorm", "scaled"])
def test_topk_weights(renorm, scaling, expected):
    w, e = R.topk_route(SCORES, 2, renormalize=renorm, scaling=scaling)
    assert e.tolist() == [[1, 2]] and e.dtype == jnp.int32
    close(w, [expected])


def test_bias_changes_selection_not_weights():
    bias = jnp.array([0.0, 0.0, 0.0, 0.45])  # expert 3: 0.1 + 0.45 = 0.55 beats expert 1 (0.5)
    w, e = R.topk_route(SCORES, 2, bias=bias)
    assert e.tolist() == [[3, 1]]
    close(w, [[0.1 / 0.6, 0.5 / 0.6]])  # combine weights from the UNBIASED scores
    g = jax.grad(lambda s: R.topk_route(s, 2, bias=bias)[0][0, 0])(SCORES)
    close(g, [[0.0, -0.1 / 0.36, 0.0, 0.5 / 0.36]])  # d(s3 / (s3 + s1)); no gradient via bias


def test_pool_limited_routing():
    # pools {0, 1} (top-2 sum 0.5) and {2, 3} (0.75): the best single expert 0 is excluded
    scores = jnp.array([[0.5, 0.0, 0.4, 0.35]])
    _, e = R.topk_route(scores, 2, n_expert_pools=2, topk_pools=1)
    assert e.tolist() == [[2, 3]]
    _, e = R.topk_route(scores, 2, n_expert_pools=2, topk_pools=2)
    assert e.tolist() == [[0, 2]]


def test_expert_choice_route():
    scores = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    gates, tokens = R.expert_choice_route(scores, 2)
    assert tokens.tolist() == [[0, 2], [1, 3]]
    close(gates, [[0.9, 0.6], [0.8, 0.7]])


def test_threshold_route_and_update():
    scores = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    w, e, valid = R.threshold_route(scores, jnp.array([0.5, 0.75]))
    assert valid.tolist() == [[True, False], [False, True], [True, False], [False, False]]
    assert e.tolist() == [[0, 1]] * 4
    close(w, scores)
    # top-2 cutoffs: expert 0 -> 0.6, expert 1 -> 0.7; EMA 0.5 from [0, 0]
    close(R.threshold_update(jnp.zeros(2), scores[None], 2, 0.5), [0.3, 0.35])
    thr = jnp.zeros(2)
    for _ in range(60):
        thr = R.threshold_update(thr, scores[None], 2, 0.8)
    close(thr, [0.6, 0.7], tol=1e-4)


def test_priority_order():
    w = jnp.array([[0.5, 0.1], [0.9, 0.05], [0.7, 0.2]])  # [T=3, k=2]; a = t * 2 + j
    assert priority_order(w, "position").tolist() == [0, 1, 2, 3, 4, 5]
    assert priority_order(w, "choice").tolist() == [0, 2, 4, 1, 3, 5]
    assert priority_order(w, "score").tolist() == [2, 4, 0, 5, 1, 3]


def test_noisy_logits():
    logits = jnp.array([[1.0, 2.0, 3.0]])
    key = jax.random.PRNGKey(0)
    close(R.noisy_logits(logits, key, "gaussian", jnp.zeros_like(logits)), logits)
    noisy = R.noisy_logits(logits, key, "gaussian", jnp.full_like(logits, 2.0))
    close(noisy - logits, 2.0 * jax.random.normal(key, logits.shape))
    g = R.noisy_logits(logits, key, "gumbel", scale=0.5)
    close(g - logits, 0.5 * jax.random.gumbel(key, logits.shape))


# ----------------------------------------------------------------------------- losses

PROBS = jnp.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
SEL = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # top-1


def test_switch_balance_loss_value_and_grad():
    # f = [2/3, 1/3], P = [1.7/3, 1.3/3]; loss = E * sum f P
    close(R.switch_balance_loss(PROBS, SEL), 2 * (2 / 3 * 1.7 / 3 + 1 / 3 * 1.3 / 3))
    g = jax.grad(R.switch_balance_loss)(PROBS, SEL)
    close(g, jnp.broadcast_to(2 * jnp.array([2 / 3, 1 / 3]) / 3, (3, 2)))  # f is a constant
    uniform = jnp.full((4, 4), 0.25)
    close(R.switch_balance_loss(uniform, jnp.eye(4)), 1.0)  # 1.0 at perfect balance


def test_sequence_balance_loss():
    probs = jnp.stack([PROBS, PROBS[::-1]])  # [B=2, T=3, E=2]
    sel = jnp.stack([SEL, jnp.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])])
    # seq 0: f = E/(kT) counts = 2/3 [2, 1], P = [1.7/3, 1.3/3]; seq 1: f = 2/3 [3, 0]
    l0 = (2 / 3) * (2 * 1.7 / 3 + 1 * 1.3 / 3)
    l1 = (2 / 3) * (3 * 1.7 / 3)
    close(R.sequence_balance_loss(probs, sel, k=1), (l0 + l1) / 2)


def test_z_loss():
    logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])  # lse = ln 2, ln 4
    close(R.z_loss(logits), (math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_entropy_kl_and_mutual_information():
    close(R.entropy_loss(jnp.full((3, 4), 0.25)), math.log(4))
    close(R.entropy_loss(jnp.eye(4)), 0.0)
    close(R.kl_uniform_loss(jnp.eye(4)), 0.0)                       # marginal is uniform
    close(R.kl_uniform_loss(jnp.array([[1.0, 0.0], [1.0, 0.0]])), math.log(2))
    p = PROBS
    m = p.mean(0)
    mi = np.sum(np.asarray(p) / 3 * np.log(np.asarray(p) / np.asarray(m)))  # I(token; expert)
    close(R.entropy_loss(p) + R.kl_uniform_loss(p), math.log(2) - mi, tol=1e-5)


def test_load_deviation_loss():
    # routed mass: expert 0: 0.9 + 0.6 = 1.5, expert 1: 0.8 -> L = [1.5, 0.8] / 2.3
    load = np.array([1.5, 0.8]) / 2.3
    close(R.load_deviation_loss(PROBS, SEL), 2 * np.sum((load - 0.5) ** 2))
    close(R.load_deviation_loss(jnp.full((4, 4), 0.25), jnp.eye(4)), 0.0)


def test_diagnostics():
    load = R.load_fraction(SEL)
    close(load, [2 / 3, 1 / 3])
    close(R.coefficient_of_variation(load), np.std([2 / 3, 1 / 3]) / 0.5)
    close(R.coefficient_of_variation(jnp.full((8,), 0.125)), 0.0)


# ----------------------------------------------------------------------------- aux-free bias

def test_bias_update_rule():
    bias = R.aux_free_bias_update(jnp.zeros(4), jnp.array([10.0, 2.0, 4.0, 0.0]), rate=0.1)
    close(bias, [-0.1, 0.1, 0.0, 0.1])  # mean 4: overloaded down, underloaded up, equal kept


def test_bias_update_balances_a_skewed_router():
    """DeepSeek-V3 update on a fixed batch: load CV falls by > 3x within 10 steps."""
    e, k = 8, 2
    logits = jax.random.normal(jax.random.PRNGKey(0), (256, e)) * 0.5 + jnp.linspace(1.0, -1.0, e)
    scores = jax.nn.sigmoid(logits)
    bias, cvs, maxes = jnp.zeros(e), [], []
    for _ in range(11):
        _, experts = R.topk_route(scores, k, bias=bias)
        load = jnp.zeros(e).at[experts.reshape(-1)].add(1.0)
        cvs.append(float(R.coefficient_of_variation(load)))
        maxes.append(float(load.max()))
        bias = R.aux_free_bias_update(bias, load, rate=0.02)
    assert cvs[0] > 1.0, cvs                  # the router starts badly skewed
    assert cvs[-1] < cvs[0] / 3, cvs
    assert maxes[-1] < 0.5 * maxes[0], maxes  # the hottest expert sheds load
