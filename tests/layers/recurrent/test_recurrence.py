"""Recurrence primitives (layers/recurrence.py): every parallel form equals the
``lax.scan`` reference in values, final states and gradients, with initial states,
segment resets, grouped heads, T not a multiple of the chunk, and extreme decays."""

import functools

import jax
import jax.numpy as jnp
import pytest

from tests.helpers import rel_rms
from layers.recurrence import (linear_scan, linear_scan_ref, matrix_recurrence,
                               matrix_recurrence_ref)


# Tiny shapes: XLA:CPU backend optimizations cost more compile time than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def test_linear_scan_equals_lax_scan_with_initial_state():
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    # diagonal state [B, T, Di, N] and a matrix state [B, T, H, Dh, Dv] with broadcast decay
    a1 = jax.random.uniform(ks[0], (2, 37, 5, 3), minval=0.5, maxval=1.0)
    b1 = jax.random.normal(ks[1], (2, 37, 5, 3))
    h1 = jax.random.normal(ks[2], (2, 5, 3))
    a2 = jax.random.uniform(ks[3], (2, 37, 3, 4, 1), minval=0.5, maxval=1.0)
    b2 = jax.random.normal(ks[4], (2, 37, 3, 4, 6))
    h2 = jax.random.normal(ks[5], (2, 3, 4, 6))
    fns = {"assoc": linear_scan, "ref": linear_scan_ref,
           "log": lambda a, b, h: linear_scan(jnp.log(a), b, h, log_space=True)}

    @jit
    def run(a1, b1, h1, a2, b2, h2):
        out = {}
        for name, fn in fns.items():
            def loss(*args):
                o1, o2 = fn(*args[:3]), fn(*args[3:])
                w1 = jnp.cos(jnp.arange(b1.size)).reshape(b1.shape)
                return jnp.sum(o1[0] * w1) + jnp.sum(o2[0] ** 2) + jnp.sum(o2[1]), (o1, o2)
            out[name] = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(a1, b1, h1, a2, b2, h2)
        return out

    out = run(a1, b1, h1, a2, b2, h2)
    for name in ("assoc", "log"):
        for got, want in zip(jax.tree.leaves(out[name]), jax.tree.leaves(out["ref"])):
            assert rel_rms(got, want) < 1e-5, name
    # the returned last state is the last element of the sequence of states
    (_, (o1, _)), _ = out["ref"]
    assert rel_rms(o1[1], o1[0][:, -1]) == 0.0


def test_linear_scan_log_space_reset():
    """A -inf log-decay is a reset: the state restarts from b_t, products never underflow."""
    la = jnp.full((1, 6, 2), -1e-3).at[0, 3].set(-jnp.inf)
    b = jnp.arange(12.0).reshape(1, 6, 2)
    h, last = linear_scan(la, b, jnp.ones((1, 2)), log_space=True)
    href, _ = linear_scan_ref(jnp.exp(la), b, jnp.ones((1, 2)))
    assert rel_rms(h, href) < 1e-6
    assert jnp.allclose(h[0, 3], b[0, 3])
    assert bool(jnp.isfinite(h).all())


def _inputs(key, b, t, kh, g, dh, dv, decay, dtype=jnp.float32):
    """q, k [B, T, K, Dh]; v [B, T, H, Dv] with H = K * G; log-decays; h0; bonus u [H, Dh]."""
    ks = jax.random.split(key, 6)
    h = kh * g
    q = jax.random.normal(ks[0], (b, t, kh, dh)) * 0.5
    k = jax.random.normal(ks[1], (b, t, kh, dh)) * 0.5
    v = jax.random.normal(ks[2], (b, t, h, dv))
    shape = {"none": None, "scalar": (b, t, h), "vector": (b, t, h, dh)}[decay]
    ld = None if shape is None else -jax.nn.softplus(jax.random.normal(ks[3], shape) - 1.0)
    h0 = jax.random.normal(ks[4], (b, h, dh, dv))
    u = jax.random.normal(ks[5], (h, dh))
    cast = lambda x: None if x is None else x.astype(dtype)
    return cast(q), cast(k), cast(v), cast(ld), h0, u


CASES = [  # (id, K q/k heads, G value heads per q/k head, decay, bonus)
    ("nodecay-incl", 3, 1, "none", False),          # linear attention / Performer
    ("scalar-grouped-incl", 2, 3, "scalar", False),  # Mamba-2 SSD with B/C heads, RetNet
    ("vector-bonus", 3, 1, "vector", True),          # RWKV-6
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matrix_recurrence_forms_agree(case):
    """outputs, final states and gradients (q, k, v, decays, h0) of all four forms; T = 37
    with chunk 8, batch 2, an initial state and packed segments in one batch row."""
    _, kh, g, decay, use_bonus = case
    q, k, v, ld, h0, u = _inputs(jax.random.PRNGKey(1), 2, 37, kh, g, 6, 5, decay)
    bonus = u if use_bonus else None
    seg = jnp.array([[0] * 11 + [1] * 19 + [2] * 7, [0] * 37])

    @jit
    def run(q, k, v, ld, h0):
        out = {}
        for impl in ("sequential", "chunked", "parallel", "associative"):
            def loss(q, k, v, ld, h0):
                o, s = matrix_recurrence(q, k, v, ld, bonus=bonus, h0=h0, segment_ids=seg,
                                         scan_impl=impl, chunk=8)
                wo = jnp.cos(jnp.arange(o.size)).reshape(o.shape)
                return jnp.sum(o * wo) + jnp.sum(s ** 2), (o, s)
            out[impl] = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, ld, h0)
        return out

    out = run(q, k, v, ld, h0)
    ref = jax.tree.leaves(out["sequential"])
    for impl in ("chunked", "parallel", "associative"):
        for got, want in zip(jax.tree.leaves(out[impl]), ref):
            assert rel_rms(got, want) < 2e-5, impl


def test_matrix_recurrence_bf16_inputs_loose():
    q, k, v, ld, h0, u = _inputs(jax.random.PRNGKey(2), 2, 45, 2, 2, 8, 8, "vector")
    want = matrix_recurrence_ref(q, k, v, ld, bonus=u[: 4], h0=h0)
    qb, kb, vb, ldb, _, _ = _inputs(jax.random.PRNGKey(2), 2, 45, 2, 2, 8, 8, "vector", jnp.bfloat16)
    got = jit(lambda *a: matrix_recurrence(*a, bonus=u[: 4], h0=h0, chunk=16))(qb, kb, vb, ldb)
    assert got[0].dtype == jnp.float32  # fp32 accumulation
    assert rel_rms(got[0], want[0]) < 3e-2 and rel_rms(got[1], want[1]) < 3e-2


def test_matrix_recurrence_extreme_decays_finite_and_exact():
    """log-decays of -1e4 and -inf (w = 0 exactly) and of ~0 (no forgetting): chunked ==
    reference, and values and gradients are finite."""
    q, k, v, ld, h0, u = _inputs(jax.random.PRNGKey(3), 1, 40, 2, 1, 4, 3, "vector")
    ld = ld.at[:, 5].set(-1e4).at[:, 21, 0].set(-jnp.inf).at[:, 30:].set(-1e-9)

    @jit
    def run(q, ld):
        res = {}
        for impl in ("sequential", "chunked"):
            f = lambda q, ld: matrix_recurrence(q, k, v, ld, bonus=u, h0=h0, scan_impl=impl, chunk=8)
            res[impl] = (f(q, ld), jax.grad(lambda q, ld: f(q, ld)[0].sum(), argnums=(0, 1))(q, ld))
        return res

    res = run(q, ld)
    for leaf in jax.tree.leaves(res["chunked"]):
        assert bool(jnp.isfinite(jnp.where(jnp.isneginf(leaf), 0.0, leaf)).all())
    (o_c, s_c), (gq_c, gl_c) = res["chunked"]
    (o_r, s_r), (gq_r, gl_r) = res["sequential"]
    assert rel_rms(o_c, o_r) < 1e-5 and rel_rms(s_c, s_r) < 1e-5 and rel_rms(gq_c, gq_r) < 1e-5
    finite = jnp.isfinite(ld)
    assert bool(jnp.isfinite(gl_c).all())
    assert rel_rms(jnp.where(finite, gl_c, 0), jnp.where(finite, gl_r, 0)) < 1e-5


def test_matrix_recurrence_grouped_heads_with_bonus():
    """The exclusive form with a bonus on grouped q/k heads (K = 2, G = 3) and a scalar
    decay: chunked and parallel == the reference, values and final state."""
    q, k, v, ld, h0, u = _inputs(jax.random.PRNGKey(4), 2, 19, 2, 3, 4, 5, "scalar")
    seg = jnp.array([[0] * 7 + [1] * 12, [0] * 19])
    run = jit(lambda *a: {impl: matrix_recurrence(*a, bonus=u, h0=h0, segment_ids=seg,
                                                  scan_impl=impl, chunk=8)
                          for impl in ("sequential", "chunked", "parallel")})
    out = run(q, k, v, ld)
    for impl in ("chunked", "parallel"):
        for got, want in zip(out[impl], out["sequential"]):
            assert rel_rms(got, want) < 1e-5, impl


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matrix_recurrence_bf16_row_fla_tolerances(case):
    """bf16 inputs through the default (chunked) form against the fp32 reference on the fp32
    inputs, with fla's tolerances (relative RMS): outputs <= 5e-3, dq/dk/dv <= 8e-3, decay
    (gate) gradients <= 2e-2. Input rounding is included in the error."""
    _, kh, g, decay, use_bonus = case
    q, k, v, ld, h0, u = _inputs(jax.random.PRNGKey(5), 2, 45, kh, g, 8, 8, decay)
    bonus = u if use_bonus else None
    wo = jnp.cos(jnp.arange(2 * 45 * kh * g * 8, dtype=jnp.float32)).reshape(2, 45, kh * g, 8)

    def grads(fn, q, k, v, ld):
        def loss(q, k, v, ld):
            o, _ = fn(q, k, v, ld, bonus=bonus, h0=h0)
            return jnp.sum(o * wo), o
        argnums = (0, 1, 2) if ld is None else (0, 1, 2, 3)
        return jax.value_and_grad(loss, argnums=argnums, has_aux=True)(q, k, v, ld)

    (_, o_ref), g_ref = jit(lambda *a: grads(matrix_recurrence_ref, *a))(q, k, v, ld)
    bf = lambda x: None if x is None else x.astype(jnp.bfloat16)
    chunked = functools.partial(matrix_recurrence, chunk=16)
    (_, o_bf), g_bf = jit(lambda *a: grads(chunked, *a))(bf(q), bf(k), bf(v), bf(ld))
    assert rel_rms(o_bf, o_ref) <= 5e-3
    for name, got, want in zip("qkv", g_bf[:3], g_ref[:3]):
        assert rel_rms(got.astype(jnp.float32), want) <= 8e-3, name
    if ld is not None:
        assert rel_rms(g_bf[3].astype(jnp.float32), g_ref[3]) <= 2e-2
