"""MoE routers, balancing losses and routing diagnostics, as pure functions.

Routers map router scores to a selection; the MoE layer (layers/moe/layer.py) owns the
parameters and calls these. Shapes follow the legend of layers/typing.py: ``M`` token
rows (``B*T``, or the ``T`` tokens of one sequence), ``E`` experts, ``Cap`` expert
capacity, and ``k`` the experts each token selects (``top_k``).

* Token choice (:func:`topk_route`): each token takes its top-k experts (Shazeer et
  al. 2017; Switch = top-1, Fedus et al. 2021; Mixtral renormalizes the selected
  weights, Qwen2-MoE does not). Options: a selection-only bias (DeepSeek-V3's
  aux-loss-free balancing, Wang et al. 2024), pool-limited routing (DeepSeek-V2/V3's
  "group-limited" routing: the experts are split into ``n_expert_pools`` contiguous
  pools; keep each token's ``topk_pools`` best pools, then top-k inside them) and a
  routed scaling factor.
* Noisy gating (:func:`noisy_logits`): Shazeer et al. 2017 learned Gaussian noise
  ``logits + Normal(0, 1) * softplus(x W_noise)``, or Gumbel noise; training only.
* Expert choice (:func:`expert_choice_route`, Zhou et al. 2022): each expert takes its
  top-Cap tokens of the sequence. It looks at the whole sequence, so in a causal decoder
  it leaks the future (whether token t is chosen depends on later tokens' scores).
  :func:`threshold_route` is the causal-safe variant used here: an expert takes every
  token whose score passes its threshold, a running estimate (from past batches) of
  its top-Cap cutoff; capacity then caps it first-come-first-served.

Balancing losses (each scaled by a config coefficient in the layer). ``probs`` are
per-token routing distributions (softmax, or sigmoid scores normalized to sum 1);
``selected`` [M, E] is the 0/1 selection before capacity dropping:

* :func:`switch_balance_loss` ``E * sum_i f_i P_i`` (Switch eq. 4; ``f_i`` = fraction of
  the M*k assignments routed to i, so the value is 1 at perfect balance for any k).
* :func:`sequence_balance_loss` DeepSeek-V3 eq. 17-20, per sequence then averaged.
* :func:`z_loss` ST-MoE (Zoph et al. 2022): ``mean(logsumexp(logits)^2)``.
* :func:`entropy_loss` mean per-token routing entropy (sharpens routing) and
  :func:`kl_uniform_loss` ``KL(mean_t p_t || uniform)`` (balances the marginal); their
  sum is ``log E - I(token; expert)``, the mutual-information balance objective.
* :func:`load_deviation_loss` ``E * sum_i (L_i - 1/E)^2`` with the differentiable soft
  load ``L_i`` = routed probability mass on expert i (normalized to sum 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.typing import Array


# ----------------------------------------------------------------------------- scores

def router_scores(logits: Array, score: str) -> Array:
    """logits [..., E] -> scores [..., E] fp32: ``softmax`` or elementwise ``sigmoid``."""
    logits = logits.astype(jnp.float32)
    if score == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if score == "sigmoid":
        return jax.nn.sigmoid(logits)
    raise ValueError(f"score={score!r} is not allowed; choose 'softmax' or 'sigmoid'")


def normalized(scores: Array) -> Array:
    """Scores [..., E] rescaled to a distribution over experts (identity for softmax)."""
    return scores / (jnp.sum(scores, axis=-1, keepdims=True) + 1e-20)


def noisy_logits(logits: Array, rng: Array, kind: str, noise_std: Array | None = None,
                 scale: float = 1.0) -> Array:
    """Training-time router noise. logits [..., E] fp32.

    ``kind="gaussian"``: ``logits + Normal(0, 1) * noise_std * scale`` with ``noise_std``
    (same shape) = ``softplus(x W_noise)`` (Shazeer et al. 2017 eq. 4).
    ``kind="gumbel"``: ``logits + scale * Gumbel(0, 1)`` (sampling-style exploration).
    """
    if kind == "gaussian":
        return logits + jax.random.normal(rng, logits.shape, jnp.float32) * noise_std * scale
    if kind == "gumbel":
        return logits + scale * jax.random.gumbel(rng, logits.shape, jnp.float32)
    raise ValueError(f"noise={kind!r} is not allowed; choose 'gaussian' or 'gumbel'")


# ----------------------------------------------------------------------------- routers

def pool_limited_mask(choice: Array, n_expert_pools: int, topk_pools: int) -> Array:
    """Mask [M, E] of the experts in each token's ``topk_pools`` best pools (DeepSeek-V3).

    The E experts are split into ``n_expert_pools`` contiguous pools of ``E / n_expert_pools``;
    a pool's score is the sum of its top-2 expert scores (top-1 when pools have one expert).
    """
    m, e = choice.shape
    per_pool = e // n_expert_pools
    pooled = choice.reshape(m, n_expert_pools, per_pool)              # [M, pools, E/pools]
    pool_score = jax.lax.top_k(pooled, min(2, per_pool))[0].sum(-1)   # [M, pools]
    _, keep = jax.lax.top_k(pool_score, topk_pools)                   # [M, topk_pools]
    pool_mask = jax.nn.one_hot(keep, n_expert_pools, dtype=jnp.bool_).any(-2)  # [M, pools]
    return jnp.repeat(pool_mask, per_pool, axis=-1)


def topk_route(scores: Array, k: int, *, bias: Array | None = None, n_expert_pools: int = 1,
               topk_pools: int = 1, renormalize: bool = True,
               scaling: float = 1.0) -> tuple[Array, Array]:
    """Token-choice top-k routing.

    Args:
      scores: [M, E] fp32 router scores (softmax probabilities or sigmoid affinities).
      k: experts per token.
      bias: [E] added to the scores for *selection only* (aux-loss-free balancing);
        the combine weights use the unbiased scores.
      n_expert_pools, topk_pools: pool-limited routing (:func:`pool_limited_mask`;
        ``n_expert_pools=1`` is off).
      renormalize: divide the k selected weights by their sum.
      scaling: routed scaling factor applied to the weights.

    Returns:
      weights [M, k] fp32 and experts [M, k] int32 (sorted by selection score).
    """
    choice = scores if bias is None else scores + bias.astype(scores.dtype)
    if n_expert_pools > 1:
        choice = jnp.where(pool_limited_mask(choice, n_expert_pools, topk_pools), choice, -jnp.inf)
    _, experts = jax.lax.top_k(choice, k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if renormalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * scaling, experts.astype(jnp.int32)


def expert_choice_route(scores: Array, capacity: int) -> tuple[Array, Array]:
    """Expert choice (Zhou et al. 2022) over one sequence: each expert takes its top-Cap tokens.

    NOT causal: whether token t is taken depends on the scores of later tokens.

    Args:
      scores: [T, E] fp32 (softmax over experts per token).
      capacity: Cap tokens per expert (<= T).

    Returns:
      gates [E, Cap] fp32 and tokens [E, Cap] int32.
    """
    gates, tokens = jax.lax.top_k(scores.T, capacity)  # [E, Cap]
    return gates, tokens.astype(jnp.int32)


def threshold_route(scores: Array, threshold: Array) -> tuple[Array, Array, Array]:
    """Causal expert choice: expert e takes token t iff ``scores[t, e] >= threshold[e]``.

    ``threshold`` [E] comes from past batches (:func:`threshold_update`), so a token's
    selection depends only on itself. Returned in the token-choice layout with ``k = E``.

    Returns:
      weights [T, E] fp32 (the scores), experts [T, E] int32 (``arange(E)``) and
      valid [T, E] bool (the selection).
    """
    t, e = scores.shape
    experts = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (t, e))
    return scores, experts, scores >= threshold.astype(scores.dtype)


# ----------------------------------------------------------------------------- state updates

def aux_free_bias_update(bias: Array, load: Array, rate: float) -> Array:
    """DeepSeek-V3 aux-loss-free update: ``bias + rate * sign(mean(load) - load)``.

    ``load`` [E]: this step's selection counts. Computed under ``stop_gradient``.
    """
    load = jax.lax.stop_gradient(load.astype(jnp.float32))
    return jax.lax.stop_gradient(bias + rate * jnp.sign(jnp.mean(load) - load))


def capacity_cutoff(scores: Array, capacity: int) -> Array:
    """The Cap-th largest score of each expert in one sequence. scores [T, E] -> [E]."""
    return jax.lax.top_k(scores.T, capacity)[0][:, -1]


def threshold_update(threshold: Array, scores: Array, capacity: int, ema: float) -> Array:
    """EMA of the per-sequence top-Cap cutoffs. threshold [E], scores [B, T, E] -> [E]."""
    cut = jnp.mean(jax.vmap(lambda s: capacity_cutoff(s, capacity))(scores), axis=0)
    return jax.lax.stop_gradient(ema * threshold + (1.0 - ema) * cut)


# ----------------------------------------------------------------------------- losses

def switch_balance_loss(probs: Array, selected: Array) -> Array:
    """``E * sum_i f_i * P_i``; probs [M, E], selected [M, E] (0/1). 1.0 when balanced."""
    e = probs.shape[-1]
    sel = jax.lax.stop_gradient(selected.astype(jnp.float32))
    f = sel.sum(0) / jnp.maximum(sel.sum(), 1.0)
    return e * jnp.sum(f * probs.mean(0))


def sequence_balance_loss(probs: Array, selected: Array, k: int) -> Array:
    """DeepSeek-V3 sequence-wise balance loss; probs, selected: [B, T, E].

    Per sequence: ``f_i = E / (k T) * count_i``, ``P_i = mean_t p_{t,i}``, loss
    ``sum_i f_i P_i`` (1.0 when balanced); averaged over the batch.
    """
    _, t, e = probs.shape
    sel = jax.lax.stop_gradient(selected.astype(jnp.float32))
    f = sel.sum(1) * (e / (k * t))          # [B, E]
    return jnp.mean(jnp.sum(f * probs.mean(1), axis=-1))


def z_loss(logits: Array) -> Array:
    """``mean(logsumexp(logits, -1)^2)``; logits [M, E] (ST-MoE router z-loss)."""
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


def entropy(probs: Array) -> Array:
    """Entropy (nats) of each distribution along the last axis."""
    return -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-20)), axis=-1)


def entropy_loss(probs: Array) -> Array:
    """Mean per-token routing entropy; probs [M, E]."""
    return jnp.mean(entropy(probs))


def kl_uniform_loss(probs: Array) -> Array:
    """``KL(mean_t p_t || uniform) = log E - H(mean_t p_t)``; probs [M, E]."""
    return jnp.log(probs.shape[-1]) - entropy(probs.mean(0))


def load_deviation_loss(probs: Array, selected: Array) -> Array:
    """``E * sum_i (L_i - 1/E)^2``, ``L_i`` = routed probability mass share of expert i."""
    e = probs.shape[-1]
    mass = jnp.sum(probs * jax.lax.stop_gradient(selected.astype(jnp.float32)), axis=0)  # [E]
    load = mass / (jnp.sum(mass) + 1e-20)
    return e * jnp.sum((load - 1.0 / e) ** 2)


# ----------------------------------------------------------------------------- diagnostics

def load_fraction(selected: Array) -> Array:
    """Share of the selections each expert received: [..., E] -> [E], sums to 1."""
    counts = selected.astype(jnp.float32).reshape(-1, selected.shape[-1]).sum(0)
    return counts / jnp.maximum(counts.sum(), 1.0)


def coefficient_of_variation(load: Array) -> Array:
    """``std(load) / mean(load)`` over experts (0 when perfectly balanced)."""
    return jnp.std(load) / (jnp.mean(load) + 1e-20)
