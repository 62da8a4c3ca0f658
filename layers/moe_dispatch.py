"""MoE dispatch: running the experts on the tokens routed to them.

All paths compute the same thing whenever no token is dropped: for every token ``n``,
``y[n] = sum_e combine[n, e] * SwiGLU_e(x[n])``. Expert weights are a dict
``{"wi": [E, D, F], "wg": [E, D, F], "wo": [E, F, D]}`` (SwiGLU per expert).

* (a) :func:`dense_moe`: every expert on every token, weighted by a dense combine
  matrix [N, E]. ``E`` times the active FLOPs; the test reference.
* (b) capacity (:func:`capacity_plan` + :func:`run_plan`): per routing group (one
  sequence of S tokens), assignments are sorted by expert (argsort, priority kept
  within an expert) and gathered into ``[E, C, D]`` buffers per group, the experts run
  as one batched matmul over ``[E, G*C, D]`` and the results are scatter-added back with
  their combine weights. Assignments past an expert's capacity C are dropped (the
  token passes through the residual). Priority (who is dropped first):

  - ``"position"``: token order, then choice rank (token-major). A token is only
    displaced by *earlier* tokens of its own sequence, so it is causal.
  - ``"choice"``: all first choices before any second choice, then token order
    (GShard / Switch). Not causal for k > 1.
  - ``"score"``: first choices first, by descending router weight within a rank
    (batch-prioritized routing, Riquelme et al. 2021). Not causal.

  The same plan format serves expert choice (:func:`expert_choice_plan`) and the
  expert-parallel path (layers/expert_parallel.py), which replaces the local expert
  matmul by all-to-all + local experts + all-to-all.
* (c) dropless (:func:`dropless_moe`): all N*k assignments sorted by expert, then
  ``pallas_kernels.grouped_matmul`` grouped matmuls on the sorted rows; nothing is dropped.
  (``jax.lax.ragged_dot`` is not used: on CPU it computes every expert.)
* (d) one-hot (:func:`onehot_moe`): the GShard formulation (Lepikhin et al. 2020):
  positions from a cumulative sum over one-hot assignments, dispatch/combine tensors
  ``[G, S, E, C]`` and einsums. Same drops as (b); O(S * E * C) memory and FLOPs for
  the dispatch itself; a baseline for benchmarks.

Combine weights are fp32; expert matmuls run in the dtype of ``x``; the combine
accumulates in fp32.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from layers.typing import Array

PRIORITIES = ("position", "choice", "score")


class Plan(NamedTuple):
    """Capacity-buffer routing plan of one group (leading ``[G]`` axis when batched).

    slot_token: [E*C] int32 token in each buffer slot (``S`` = empty slot).
    slot_weight: [E*C] fp32 combine weight of each slot (0 for empty).
    kept: [S, k] bool, which assignments were processed (expert choice: [S, E]).
    """
    slot_token: Array
    slot_weight: Array
    kept: Array


def expert_capacity(n_tokens: int, n_experts: int, k: int | float, factor: float) -> int:
    """``C = ceil(factor * S * k / E)``, at least 1 and at most S (S never drops)."""
    return int(min(n_tokens, max(1, math.ceil(factor * n_tokens * k / n_experts))))


def priority_order(weights: Array, priority: str) -> Array:
    """Flat assignment indices ``a = t * k + j`` in priority order. weights [S, k] -> [A]."""
    s, k = weights.shape
    idx = jnp.arange(s * k, dtype=jnp.int32).reshape(s, k)
    if priority == "position":
        return idx.reshape(-1)
    if priority == "choice":
        return idx.T.reshape(-1)
    if priority == "score":
        by_score = jnp.argsort(-weights, axis=0, stable=True)           # [S, k] tokens per rank
        return jnp.take_along_axis(idx, by_score, axis=0).T.reshape(-1)
    raise ValueError(f"priority={priority!r} is not allowed; choose one of {list(PRIORITIES)}")


def capacity_plan(experts: Array, weights: Array, n_experts: int, capacity: int,
                  priority: str = "position", valid: Array | None = None) -> Plan:
    """Sort-based capacity plan for one group.

    Args:
      experts: [S, k] int32 chosen experts; weights: [S, k] fp32 combine weights.
      n_experts: E. capacity: C slots per expert.
      priority: one of PRIORITIES (see the module docstring).
      valid: optional [S, k] bool; invalid assignments are never processed.
    """
    s, k = experts.shape
    a, e, c = s * k, n_experts, capacity
    flat_e = experts.reshape(-1)
    if valid is not None:
        flat_e = jnp.where(valid.reshape(-1), flat_e, e)                # invalid -> sentinel E
    perm = priority_order(weights, priority)                            # [A] by priority
    order = jnp.argsort(flat_e[perm], stable=True)                      # by expert, then priority
    sorted_a = perm[order]                                              # assignment ids
    sorted_e = flat_e[sorted_a]
    counts = jnp.zeros((e + 1,), jnp.int32).at[flat_e].add(1)
    starts = jnp.cumsum(counts) - counts
    pos = jnp.arange(a, dtype=jnp.int32) - starts[sorted_e]             # rank within expert
    keep = (pos < c) & (sorted_e < e)
    slot = jnp.where(keep, sorted_e * c + pos, e * c)                   # E*C = trash slot
    slot_assign = jnp.full((e * c + 1,), a, jnp.int32).at[slot].set(sorted_a)[:e * c]
    slot_token = jnp.where(slot_assign < a, slot_assign // k, s)
    slot_weight = jnp.concatenate([weights.reshape(-1), jnp.zeros((1,), weights.dtype)])[slot_assign]
    kept = jnp.zeros((a,), bool).at[sorted_a].set(keep).reshape(s, k)
    return Plan(slot_token.astype(jnp.int32), slot_weight, kept)


def expert_choice_plan(gates: Array, tokens: Array, n_tokens: int) -> Plan:
    """Plan from expert-choice routing: gates, tokens [E, C] (routers.expert_choice_route)."""
    e, c = tokens.shape
    kept = jnp.zeros((n_tokens, e), bool).at[tokens, jnp.arange(e)[:, None]].set(True)
    return Plan(tokens.reshape(-1), gates.reshape(-1), kept)


def combine_from_plan(plan: Plan, n_tokens: int, n_experts: int) -> Array:
    """Dense combine matrix [S, E] of a (single-group) plan, for the dense reference."""
    c = plan.slot_token.shape[-1] // n_experts
    col = jnp.repeat(jnp.arange(n_experts), c)
    m = jnp.zeros((n_tokens + 1, n_experts), jnp.float32)
    return m.at[plan.slot_token, col].add(plan.slot_weight.astype(jnp.float32))[:n_tokens]


def combine_from_assignments(experts: Array, weights: Array, n_experts: int,
                             kept: Array | None = None) -> Array:
    """Dense combine matrix [..., E] from token choice (experts, weights [..., k])."""
    w = weights.astype(jnp.float32) if kept is None else jnp.where(kept, weights, 0.0)
    return jnp.einsum("...k,...ke->...e", w, jax.nn.one_hot(experts, n_experts, dtype=jnp.float32))


# ----------------------------------------------------------------------------- experts

def expert_swiglu(h: Array, w: dict) -> Array:
    """Per-expert SwiGLU. h: [E, R, D] -> [E, R, D] (R rows per expert)."""
    dt = h.dtype
    a = jnp.einsum("erd,edf->erf", h, w["wi"].astype(dt))
    g = jnp.einsum("erd,edf->erf", h, w["wg"].astype(dt))
    return jnp.einsum("erf,efd->erd", jax.nn.silu(a) * g, w["wo"].astype(dt))


def dense_moe(x: Array, combine: Array, w: dict) -> Array:
    """Reference: every expert on every token. x [N, D], combine [N, E] -> [N, D]."""
    e = combine.shape[-1]
    out = expert_swiglu(jnp.broadcast_to(x, (e,) + x.shape), w)           # [E, N, D]
    return jnp.einsum("ne,end->nd", combine, out.astype(jnp.float32)).astype(x.dtype)


def run_plan(x: Array, slot_token: Array, slot_weight: Array, w: dict, n_experts: int,
             experts_fn: Callable[[Array, dict], Array] = expert_swiglu) -> Array:
    """Gather -> experts -> weighted scatter-add. x [G, S, D]; slots [G, E*C] -> [G, S, D].

    The buffers are gathered straight into the expert-major layout ``[E, G*C, D]``
    (row ``g*C + c`` of expert e is slot c of group g), so the experts run as one batched
    matmul with no activation transposes. ``experts_fn(buf [E, R, D], w) -> [E, R, D]``
    (the expert-parallel path swaps in all-to-all around the local experts).
    """
    g, s, d = x.shape
    e = n_experts
    c = slot_token.shape[-1] // e
    flat = jnp.where(slot_token < s, slot_token + s * jnp.arange(g, dtype=jnp.int32)[:, None], g * s)
    idx = jnp.transpose(flat.reshape(g, e, c), (1, 0, 2)).reshape(e, g * c)         # [E, G*C]
    wt = jnp.transpose(slot_weight.reshape(g, e, c), (1, 0, 2)).reshape(e, g * c, 1)
    x_pad = jnp.concatenate([x.reshape(g * s, d), jnp.zeros((1, d), x.dtype)])      # row G*S: empty
    out = experts_fn(x_pad[idx], w)                                                 # [E, G*C, D]
    out = (out.astype(jnp.float32) * wt.astype(jnp.float32)).reshape(e * g * c, d)
    y = jnp.zeros((g * s + 1, d), jnp.float32).at[idx.reshape(-1)].add(out)
    return y[:g * s].reshape(g, s, d).astype(x.dtype)


# ----------------------------------------------------------------------------- dropless

def dropless_moe(x: Array, experts: Array, weights: Array, w: dict, impl: str | None = None) -> Array:
    """Dropless token choice through ``pallas_kernels.grouped_matmul``. x [N, D]; experts, weights [N, k]."""
    from pallas_kernels import gmm  # late import: kernels are optional at import time

    n, k = experts.shape
    e = w["wi"].shape[0]
    dt = x.dtype
    flat_e = experts.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)                             # [A] assignments by expert
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    group_sizes = jnp.zeros((e,), jnp.int32).at[flat_e].add(1)
    rows = x[order // k]                                                 # [A, D] sorted rows
    a = gmm(rows, w["wi"].astype(dt), group_sizes, impl=impl)
    g = gmm(rows, w["wg"].astype(dt), group_sizes, impl=impl)
    out = gmm(jax.nn.silu(a) * g, w["wo"].astype(dt), group_sizes, impl=impl)  # [A, D]
    out = out[inverse].reshape(n, k, -1).astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", out, weights.astype(jnp.float32)).astype(dt)


# ----------------------------------------------------------------------------- GShard one-hot

def onehot_masks(experts: Array, weights: Array, n_experts: int, capacity: int,
                 priority: str = "position", valid: Array | None = None) -> tuple[Array, Array, Array]:
    """GShard dispatch [S, E, C] (0/1), combine [S, E, C] (fp32) and kept [S, k] for one group."""
    s, k = experts.shape
    perm = priority_order(weights, priority)
    oh = jax.nn.one_hot(experts.reshape(-1), n_experts, dtype=jnp.int32)  # [A, E]
    if valid is not None:
        oh = oh * valid.reshape(-1, 1)
    oh_p = oh[perm]                                                      # priority order
    pos_p = jnp.sum((jnp.cumsum(oh_p, axis=0) - 1) * oh_p, axis=-1)      # [A] rank within expert
    pos = jnp.zeros_like(pos_p).at[perm].set(pos_p)                      # back to assignment order
    keep = (pos < capacity) & (oh.sum(-1) > 0)
    disp = (oh[:, :, None] * jax.nn.one_hot(pos, capacity, dtype=jnp.int32)[:, None, :]
            * keep[:, None, None])                                       # [A, E, C]
    disp = disp.reshape(s, k, n_experts, capacity).astype(jnp.float32)
    combine = jnp.einsum("skec,sk->sec", disp, weights.astype(jnp.float32))
    return disp.sum(1), combine, keep.reshape(s, k)


def onehot_moe(x: Array, experts: Array, weights: Array, w: dict, capacity: int,
               priority: str = "position", valid: Array | None = None) -> tuple[Array, Array]:
    """GShard one-hot einsum dispatch. x [G, S, D]; experts, weights [G, S, k].

    Returns y [G, S, D] and kept [G, S, k] (assignments within capacity).
    """
    e = w["wi"].shape[0]
    disp, comb, kept = jax.vmap(lambda ex, wt, v: onehot_masks(ex, wt, e, capacity, priority, v))(
        experts, weights, valid if valid is not None else jnp.ones(experts.shape, bool))
    g, _, d = x.shape
    buf = jnp.einsum("gsec,gsd->egcd", disp.astype(x.dtype), x)          # [E, G, C, D]
    out = expert_swiglu(buf.reshape(e, g * capacity, d), w).reshape(buf.shape)
    y = jnp.einsum("gsec,egcd->gsd", comb, out.astype(jnp.float32)).astype(x.dtype)
    return y, kept
