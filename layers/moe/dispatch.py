"""MoE dispatch: running the experts on the tokens routed to them.

All paths compute the same thing whenever no token is dropped: for every token row
``m``, ``y[m] = sum_e combine[m, e] * SwiGLU_e(x[m])``. Expert weights are a dict
``{"wi": [E, D, F], "wg": [E, D, F], "wo": [E, F, D]}`` (SwiGLU per expert). Shapes
follow layers/typing.py (``M`` token rows, ``E`` experts, ``Cap`` capacity, ``F``
expert width) plus ``k``, the experts each token selects; einsums write the top-k
axis ``j`` and the capacity axis ``p``.

* (a) :func:`dense_moe`: every expert on every token, weighted by a dense combine
  matrix [M, E]. ``E`` times the active FLOPs; the reference every other path is
  tested against (values and gradients).
* (b) capacity (:func:`capacity_plan` + :func:`run_plan`): per sequence (one batch
  row of T tokens; capacity and drops never depend on the other rows), assignments
  are sorted by expert (argsort, priority kept within an expert) and gathered into
  ``[E, Cap, D]`` buffers per sequence, the experts run as one batched matmul over
  ``[E, B*Cap, D]`` and the results are scatter-added back with their combine
  weights. Assignments past an expert's capacity Cap are dropped (the token passes
  through the residual). Priority (who is dropped first):

  - ``"position"``: token order, then choice rank (token-major). A token is only
    displaced by *earlier* tokens of its own sequence, so it is causal.
  - ``"choice"``: all first choices before any second choice, then token order
    (GShard / Switch). Not causal for k > 1.
  - ``"score"``: first choices first, by descending router weight within a rank
    (batch-prioritized routing, Riquelme et al. 2021). Not causal.

  The same plan format serves expert choice (:func:`expert_choice_plan`) and the
  expert-parallel path (layers/moe/expert_parallel.py), which replaces the local
  expert matmul by all-to-all + local experts + all-to-all.
* (c) dropless (:func:`dropless_moe`): nothing is dropped. How depends on ``gmm_impl``:

  - a kernel (``"pallas_*"``, ``"tokamax"``; the TPU/GPU default):
    :func:`sorted_dropless_moe`, all M*k assignments sorted by expert and three
    ``pallas_kernels.gmm`` grouped matmuls on the sorted rows.
  - ``"xla"`` (the CPU default): :func:`buffered_dropless_moe`, the capacity path (b)
    over all M rows with ``Cap`` = the mean expert load ``ceil(M k / E)`` (one batched
    matmul per weight over ``[E, Cap, D]``), plus the assignments past an expert's
    ``Cap`` -- exactly those (b) would drop -- run by layers/moe/overflow.py in a loop
    over row tiles of one expert. Why on CPU: XLA:CPU runs one big batched matmul
    near its peak, while small matmuls in a loop run at roughly half the speed per FLOP
    and any static tiling of ragged groups costs ``M k + E * tile`` rows whatever the
    routing (a batched matmul over tiles with per-tile gathered weights measured
    1.1-1.8x slower than the buffers); ``jax.lax.ragged_dot`` lowers on CPU to a dense
    matmul against every expert. FLOPs ``6 D F (E Cap + sum of the overflow tiles)``
    -- about ``6 D F M k`` plus a few partly filled tiles for balanced routing (vs
    ``capacity_factor`` times that for (b)), and at most ``E - 1`` extra buffers' worth
    when one expert takes everything; memory: the ``[E, Cap, *]`` buffers plus the
    loop's saved pre-activations ``[M k, 2F]`` (train).
* (d) one-hot (:func:`onehot_moe`): the GShard formulation (Lepikhin et al. 2020):
  slot positions from a cumulative sum over one-hot assignments, dispatch/combine
  tensors ``[B, T, E, Cap]`` and einsums. Same drops as (b); O(T * E * Cap) memory and
  FLOPs for the dispatch itself; a baseline for benchmarks.

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
    """Capacity-buffer routing plan of one sequence (leading ``[B]`` axis when batched).

    slot_token: [E*Cap] int32 token in each buffer slot (``T`` = empty slot).
    slot_weight: [E*Cap] fp32 combine weight of each slot (0 for empty).
    kept: [T, k] bool, which assignments were processed (expert choice: [T, E]).
    """
    slot_token: Array
    slot_weight: Array
    kept: Array


def expert_capacity(n_tokens: int, n_experts: int, k: int | float, factor: float) -> int:
    """``Cap = ceil(factor * T * k / E)``, at least 1 and at most T (Cap = T never drops)."""
    return int(min(n_tokens, max(1, math.ceil(factor * n_tokens * k / n_experts))))


def priority_order(weights: Array, priority: str) -> Array:
    """Flat assignment indices ``a = t * k + j`` in priority order. weights [T, k] -> [T*k]."""
    t, k = weights.shape
    idx = jnp.arange(t * k, dtype=jnp.int32).reshape(t, k)
    if priority == "position":
        return idx.reshape(-1)
    if priority == "choice":
        return idx.T.reshape(-1)
    if priority == "score":
        by_score = jnp.argsort(-weights, axis=0, stable=True)           # [T, k] tokens per rank
        return jnp.take_along_axis(idx, by_score, axis=0).T.reshape(-1)
    raise ValueError(f"priority={priority!r} is not allowed; choose one of {list(PRIORITIES)}")


class Sorted(NamedTuple):
    """Assignments of one sequence (or of all M rows) sorted by expert, then priority.

    order: [A] assignment ids ``a = t * k + j`` (A = T * k), invalid ones last.
    expert: [A] expert of each sorted assignment (``E`` = invalid).
    starts, ends: [E] each expert's run ``order[starts[e]:ends[e]]``.
    """
    order: Array
    expert: Array
    starts: Array
    ends: Array


def sort_assignments(experts: Array, weights: Array, n_experts: int,
                     priority: str = "position", valid: Array | None = None) -> Sorted:
    """:class:`Sorted` of token choice ``experts``, ``weights`` [T, k] (``valid`` [T, k]:
    only those count; priority: one of PRIORITIES, see the module docstring)."""
    e = n_experts
    flat_e = experts.reshape(-1)
    if valid is not None:
        flat_e = jnp.where(valid.reshape(-1), flat_e, e)                # invalid -> sentinel E
    perm = priority_order(weights, priority)                            # [T*k] by priority
    order = perm[jnp.argsort(flat_e[perm], stable=True)]                # by expert, then priority
    counts = jnp.zeros((e + 1,), jnp.int32).at[flat_e].add(1)[:e]
    ends = jnp.cumsum(counts)
    return Sorted(order.astype(jnp.int32), flat_e[order], ends - counts, ends)


def capacity_plan(experts: Array, weights: Array, n_experts: int, capacity: int,
                  priority: str = "position", valid: Array | None = None) -> Plan:
    """Sort-based capacity plan for one sequence.

    Args:
      experts: [T, k] int32 chosen experts; weights: [T, k] fp32 combine weights.
      n_experts: E. capacity: Cap slots per expert.
      priority: one of PRIORITIES (see the module docstring).
      valid: optional [T, k] bool; invalid assignments are never processed.
    """
    return plan_from_sorted(sort_assignments(experts, weights, n_experts, priority, valid),
                            weights, capacity)


def plan_from_sorted(s: Sorted, weights: Array, capacity: int) -> Plan:
    """Capacity plan keeping the first ``capacity`` sorted assignments of each expert."""
    t, k = weights.shape
    a, e, cap = t * k, s.starts.shape[0], capacity
    rank = jnp.arange(a, dtype=jnp.int32) - jnp.take(s.starts, s.expert, mode="clip")
    keep = (rank < cap) & (s.expert < e)
    slot = jnp.where(keep, s.expert * cap + rank, e * cap)              # E*Cap = trash slot
    slot_assign = jnp.full((e * cap + 1,), a, jnp.int32).at[slot].set(s.order)[:e * cap]
    slot_token = jnp.where(slot_assign < a, slot_assign // k, t)
    padded = jnp.concatenate([weights.reshape(-1), jnp.zeros((1,), weights.dtype)])  # [T*k + 1]
    slot_weight = padded[slot_assign]
    kept = jnp.zeros((a,), bool).at[s.order].set(keep).reshape(t, k)
    return Plan(slot_token.astype(jnp.int32), slot_weight, kept)


def expert_choice_plan(gates: Array, tokens: Array, n_tokens: int) -> Plan:
    """Plan from expert-choice routing: gates, tokens [E, Cap] (routers.expert_choice_route)."""
    e, _ = tokens.shape
    kept = jnp.zeros((n_tokens, e), bool).at[tokens, jnp.arange(e)[:, None]].set(True)
    return Plan(tokens.reshape(-1), gates.reshape(-1), kept)


def combine_from_plan(plan: Plan, n_tokens: int, n_experts: int) -> Array:
    """Dense combine matrix [T, E] of a (single-sequence) plan, for the dense reference."""
    cap = plan.slot_token.shape[-1] // n_experts
    col = jnp.repeat(jnp.arange(n_experts), cap)
    m = jnp.zeros((n_tokens + 1, n_experts), jnp.float32)
    return m.at[plan.slot_token, col].add(plan.slot_weight.astype(jnp.float32))[:n_tokens]


def combine_from_assignments(experts: Array, weights: Array, n_experts: int,
                             kept: Array | None = None) -> Array:
    """Dense combine matrix [..., E] from token choice (experts, weights [..., k])."""
    w = weights.astype(jnp.float32) if kept is None else jnp.where(kept, weights, 0.0)
    return jnp.einsum("...j,...je->...e", w, jax.nn.one_hot(experts, n_experts, dtype=jnp.float32))


# ----------------------------------------------------------------------------- experts

def expert_swiglu(h: Array, w: dict) -> Array:
    """Per-expert SwiGLU. h: [E, rows, D] -> [E, rows, D]."""
    dt = h.dtype
    a = jnp.einsum("emd,edf->emf", h, w["wi"].astype(dt))
    g = jnp.einsum("emd,edf->emf", h, w["wg"].astype(dt))
    return jnp.einsum("emf,efd->emd", jax.nn.silu(a) * g, w["wo"].astype(dt))


def dense_moe(x: Array, combine: Array, w: dict) -> Array:
    """Reference: every expert on every token. x [M, D], combine [M, E] -> [M, D]."""
    e = combine.shape[-1]
    out = expert_swiglu(jnp.broadcast_to(x, (e,) + x.shape), w)           # [E, M, D]
    return jnp.einsum("me,emd->md", combine, out.astype(jnp.float32)).astype(x.dtype)


def run_plan(x: Array, slot_token: Array, slot_weight: Array, w: dict, n_experts: int,
             experts_fn: Callable[[Array, dict], Array] = expert_swiglu,
             out_dtype=None) -> Array:
    """Gather -> experts -> weighted scatter-add. x [B, T, D]; slots [B, E*Cap] -> [B, T, D].

    The buffers are gathered straight into the expert-major layout ``[E, B*Cap, D]``
    (row ``b*Cap + p`` of expert e is slot p of sequence b), so the experts run as one
    batched matmul with no activation transposes. ``experts_fn(buf [E, rows, D], w) ->
    [E, rows, D]`` (the expert-parallel path swaps in all-to-all around the local experts).
    ``out_dtype``: of y (None: the dtype of x; the combine accumulates in fp32).
    """
    b, t, d = x.shape
    e = n_experts
    cap = slot_token.shape[-1] // e
    row0 = t * jnp.arange(b, dtype=jnp.int32)[:, None]                               # [B, 1]
    flat = jnp.where(slot_token < t, slot_token + row0, b * t)
    idx = jnp.transpose(flat.reshape(b, e, cap), (1, 0, 2)).reshape(e, b * cap)       # [E, B*Cap]
    wt = jnp.transpose(slot_weight.reshape(b, e, cap), (1, 0, 2)).reshape(e, b * cap, 1)
    x_pad = jnp.concatenate([x.reshape(b * t, d), jnp.zeros((1, d), x.dtype)])  # row B*T: empty
    out = experts_fn(x_pad[idx], w)                                              # [E, B*Cap, D]
    out = (out.astype(jnp.float32) * wt.astype(jnp.float32)).reshape(e * b * cap, d)
    y = jnp.zeros((b * t + 1, d), jnp.float32).at[idx.reshape(-1)].add(out)
    return y[:b * t].reshape(b, t, d).astype(out_dtype or x.dtype)


# ----------------------------------------------------------------------------- dropless

def dropless_moe(x: Array, experts: Array, weights: Array, w: dict,
                 gmm_impl: str | None = None) -> Array:
    """Dropless token choice. x [M, D]; experts, weights [M, k] -> [M, D].

    ``gmm_impl`` (None: by backend) selects the grouped-matmul implementation; the pure-XLA
    one (``"xla"``, the CPU default) runs as :func:`buffered_dropless_moe`, every other
    as :func:`sorted_dropless_moe` (see the module docstring).
    """
    from pallas_kernels.dispatch import current_backend  # late: kernels are optional
    from pallas_kernels.grouped_matmul.ops import resolve_impl

    if resolve_impl(gmm_impl, current_backend()) == "xla":
        return buffered_dropless_moe(x, experts, weights, w)
    return sorted_dropless_moe(x, experts, weights, w, gmm_impl)


def buffered_dropless_moe(x: Array, experts: Array, weights: Array, w: dict,
                          capacity: int | None = None, tile_sizes: tuple | None = None) -> Array:
    """Capacity buffers at the mean expert load plus their overflow in a tiled loop (exact).

    x [M, D]; experts, weights [M, k] -> [M, D]. ``capacity``: buffer rows per expert,
    over all M tokens (None: ``ceil(M k / E)``, the mean load); ``tile_sizes``: the
    overflow loop's tiles (None: ``overflow.TILE_SIZES``; see ``overflow.tiled_moe``).
    """
    from layers.moe.overflow import TILE_SIZES, tiled_moe

    m, k = experts.shape
    e = w["wi"].shape[0]
    cap = capacity or expert_capacity(m, e, k, 1.0)
    s = sort_assignments(experts, weights, e)                          # all M tokens, one sort
    plan = plan_from_sorted(s, weights, cap)
    y = run_plan(x[None], plan.slot_token[None], plan.slot_weight[None], w, e,
                 out_dtype=jnp.float32)[0]
    overflow = jnp.minimum(s.starts + cap, s.ends)                    # rows past the buffers
    y = y + tiled_moe(x, weights, w, s.order, overflow, s.ends, tile_sizes or TILE_SIZES)
    return y.astype(x.dtype)


def sorted_dropless_moe(x: Array, experts: Array, weights: Array, w: dict,
                        gmm_impl: str | None = None) -> Array:
    """All M*k assignments sorted by expert through three ``pallas_kernels.gmm`` calls.

    x [M, D]; experts, weights [M, k] -> [M, D]. ``gmm_impl``: the kernel dispatcher's
    ``impl`` (None: by backend).
    """
    from pallas_kernels.grouped_matmul import gmm  # late: kernels are optional at import time

    m, k = experts.shape
    e = w["wi"].shape[0]
    dt = x.dtype
    flat_e = experts.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)                      # [M*k] assignments by expert
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(m * k, dtype=order.dtype))
    rows_per_expert = jnp.zeros((e,), jnp.int32).at[flat_e].add(1)
    rows = x[order // k]                                                 # [M*k, D] sorted rows
    a = gmm(rows, w["wi"].astype(dt), rows_per_expert, impl=gmm_impl)
    g = gmm(rows, w["wg"].astype(dt), rows_per_expert, impl=gmm_impl)
    out = gmm(jax.nn.silu(a) * g, w["wo"].astype(dt), rows_per_expert, impl=gmm_impl)  # [M*k, D]
    out = out[inverse].reshape(m, k, -1).astype(jnp.float32)
    return jnp.einsum("mjd,mj->md", out, weights.astype(jnp.float32)).astype(dt)


# ----------------------------------------------------------------------------- GShard one-hot

def onehot_masks(experts: Array, weights: Array, n_experts: int, capacity: int,
                 priority: str = "position",
                 valid: Array | None = None) -> tuple[Array, Array, Array]:
    """GShard dispatch [T, E, Cap] (0/1), combine [T, E, Cap] (fp32) and kept [T, k] of one
    sequence."""
    t, k = experts.shape
    perm = priority_order(weights, priority)
    oh = jax.nn.one_hot(experts.reshape(-1), n_experts, dtype=jnp.int32)  # [T*k, E]
    if valid is not None:
        oh = oh * valid.reshape(-1, 1)
    oh_p = oh[perm]                                                      # priority order
    pos_p = jnp.sum((jnp.cumsum(oh_p, axis=0) - 1) * oh_p, axis=-1)      # [T*k] rank within expert
    pos = jnp.zeros_like(pos_p).at[perm].set(pos_p)                      # back to assignment order
    keep = (pos < capacity) & (oh.sum(-1) > 0)
    disp = (oh[:, :, None] * jax.nn.one_hot(pos, capacity, dtype=jnp.int32)[:, None, :]
            * keep[:, None, None])                                       # [T*k, E, Cap]
    disp = disp.reshape(t, k, n_experts, capacity).astype(jnp.float32)
    combine = jnp.einsum("tjep,tj->tep", disp, weights.astype(jnp.float32))
    return disp.sum(1), combine, keep.reshape(t, k)


def onehot_moe(x: Array, experts: Array, weights: Array, w: dict, capacity: int,
               priority: str = "position", valid: Array | None = None) -> tuple[Array, Array]:
    """GShard one-hot einsum dispatch. x [B, T, D]; experts, weights [B, T, k].

    Returns y [B, T, D] and kept [B, T, k] (assignments within capacity).
    """
    e = w["wi"].shape[0]
    disp, comb, kept = jax.vmap(lambda ex, wt, v: onehot_masks(ex, wt, e, capacity, priority, v))(
        experts, weights, valid if valid is not None else jnp.ones(experts.shape, bool))
    b, _, d = x.shape
    buf = jnp.einsum("btep,btd->ebpd", disp.astype(x.dtype), x)          # [E, B, Cap, D]
    out = expert_swiglu(buf.reshape(e, b * capacity, d), w).reshape(buf.shape)
    y = jnp.einsum("btep,ebpd->btd", comb, out.astype(jnp.float32)).astype(x.dtype)
    return y, kept
