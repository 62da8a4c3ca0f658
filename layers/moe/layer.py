"""Mixture-of-Experts FFN (Shazeer et al. 2017; GShard; Switch; Mixtral; DeepSeekMoE /
DeepSeek-V3; Qwen2-MoE), a drop-in for the dense FFN under the FFN contract of
layers/contracts.py: ``MoEConfig.make(...)`` returns a module
``(x [B, T, D], *, positions, segment_ids=None, cache=None, train=False) -> (y, None, aux)``
(stateless for decoding: ``init_cache`` is None).

Phases of :meth:`MoE.__call__`: scores (router ``[D, E]`` in fp32, optional noise) ->
route (layers/moe/routers.py; token choice, causal expert threshold or expert choice)
-> dispatch of the routed experts (layers/moe/dispatch.py; expert parallelism in
layers/moe/expert_parallel.py) -> optional always-on shared experts (DeepSeekMoE) with
an optional sigmoid gate on their output (Qwen2-MoE) -> aux (losses and metrics).

* Fine-grained experts (DeepSeekMoE): ``granularity = m`` splits each of ``n_experts``
  experts of width ``hidden`` into m experts of width ``hidden / m`` and routes to
  ``m * top_k`` of them: same parameters and active FLOPs, more combinations.
* Per-sequence routing: capacity, expert choice and their drops are computed per
  sequence (one batch row), so a sequence's output never depends on the other rows.
* Causality: token-choice routing with ``priority="position"`` (or dropless/dense
  dispatch) and ``router="expert_threshold"`` are causal. ``router="expert_choice"``
  (top-Cap tokens per expert over the sequence) and capacity priorities ``"choice"`` /
  ``"score"`` with k > 1 (``"score"`` for any k) let later tokens change which earlier
  tokens are processed, i.e. they leak the future in a decoder. ``validate`` refuses
  them unless ``allow_noncausal_routing=True`` (encoder settings); ``causal`` tells.
* Packed rows: ``segment_ids`` are accepted and not used. The segments of one row
  share the row's capacity, so under capacity dropping they compete for it; dropless
  and dense dispatch are per token and unaffected.
* Decoding (T = 1 per call): capacity is ``ceil(cf * k / E) >= 1`` per expert and a token
  picks distinct experts, so a decode step never drops; prefill + decode equals the
  full forward whenever the forward drops nothing.

Non-gradient state (collection ``"state"`` = ``archs.model.STATE_COLLECTION``,
scanned with the layers): ``router_bias`` [E] (DeepSeek-V3 aux-loss-free balancing)
and ``ec_threshold`` [E] (``expert_threshold`` router). Protocol: the train step
applies the model with ``mutable=["state"]`` and ``train=True``; this layer then writes
the UPDATED value, computed from this step's selection counts under stop_gradient
(``bias + bias_rate * sign(mean_load - load)``; the threshold: an EMA of the per-
sequence top-Cap score cutoffs). The train loop keeps the returned state and uses it
from the next step on, i.e. the update is applied after the optimizer step. The bias
only shifts which experts are selected; the combine weights and gradients never see
it. Without a mutable ``state`` (eval, decoding) the stored value is read; if the
collection is absent altogether the initial value is used.

``aux["losses"]`` (already multiplied by their coefficients; only nonzero ones):
``moe_load_balance``, ``moe_seq_balance``, ``moe_z_loss``, ``moe_entropy``,
``moe_kl_uniform``, ``moe_load_deviation``. ``aux["metrics"]``: ``moe_load`` [E]
(share of selections per expert, before drops), ``moe_dropped`` (fraction of selected
assignments not processed; expert choice: fraction of tokens no expert took),
``moe_router_entropy`` (mean per-token routing entropy, nats), ``moe_load_cv``.
Noisy gating draws from ``self.make_rng("noise")`` only when ``train=True``.

Shapes follow layers/typing.py (E experts, Cap capacity, F expert width) plus ``k``,
the experts each token selects (``k_active``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import initializers as init
from layers.contracts import FeedForwardConfig, in_range, one_of, positive
from layers.ffn import FFNConfig, llama_hidden
from layers.heads import dense
from layers.moe import routers as R
from layers.moe.dispatch import (PRIORITIES, Plan, capacity_plan, combine_from_assignments,
                                 combine_from_plan, dense_moe, dropless_moe, expert_capacity,
                                 expert_choice_plan, onehot_moe, run_plan)
from layers.moe.expert_parallel import batch_sharded_dropless, expert_mesh, expert_parallel_run
from layers.sharding import batch_mesh
from layers.typing import Array, DType

STATE_COLLECTION = "state"  # == archs.model.STATE_COLLECTION (layers cannot import archs)
ROUTERS = ("topk", "expert_choice", "expert_threshold")
SCORES = ("softmax", "sigmoid")
NOISES = ("none", "gaussian", "gumbel")
DISPATCHES = ("capacity", "dropless", "onehot", "dense")
LOSSES = ("load_balance", "seq_balance", "z_loss", "entropy", "kl_uniform", "load_deviation")


def gmm_impls() -> tuple:
    """The values ``gmm_impl`` may take: None (by backend) and the grouped-matmul
    dispatcher's implementations (imported late: kernels are optional at import time)."""
    from pallas_kernels.grouped_matmul.ops import IMPLS
    return (None,) + tuple(IMPLS)


@dataclasses.dataclass(frozen=True)
class MoEConfig(FeedForwardConfig):
    """MoE FFN. Defaults: 8 experts, top-2 softmax renormalized, capacity dispatch."""
    kind: ClassVar[str] = "moe"
    n_experts: int = 8
    top_k: int = 2
    hidden: int | None = None           # width of a (coarse) expert; None: Llama SwiGLU width
    multiple_of: int = 16
    granularity: int = 1                # DeepSeekMoE m-way split of every expert
    n_shared: int = 0                   # always-on experts of width hidden / granularity
    shared_hidden: int | None = None    # total shared width override
    shared_gate: bool = False           # Qwen2-MoE: y_shared * sigmoid(x w)
    router: str = "topk"                # one of ROUTERS
    score: str = "softmax"              # one of SCORES
    renormalize: bool = True            # divide the selected weights by their sum
    routed_scaling: float = 1.0
    n_expert_pools: int = 1             # pool-limited routing (DeepSeek-V3 "groups")
    topk_pools: int = 1                 # pools each token may route into
    noise: str = "none"                 # one of NOISES (training only)
    noise_scale: float = 1.0
    aux_free_bias: bool = False         # DeepSeek-V3 selection bias in the "state" collection
    bias_rate: float = 1e-3
    threshold_ema: float = 0.9          # expert_threshold: EMA of the top-Cap cutoffs
    dispatch: str = "capacity"          # one of DISPATCHES
    capacity_factor: float = 1.25
    priority: str = "position"          # one of dispatch.PRIORITIES
    load_balance_coef: float = 0.0
    seq_balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    entropy_coef: float = 0.0
    kl_uniform_coef: float = 0.0
    load_deviation_coef: float = 0.0
    expert_parallel: bool = True        # all-to-all when the mesh has an "expert" axis > 1
    gmm_impl: str | None = None         # grouped-matmul implementation of dropless dispatch
    allow_noncausal_routing: bool = False

    @property
    def n_routed(self) -> int:
        return self.n_experts * self.granularity

    @property
    def k_active(self) -> int:
        return self.top_k * self.granularity

    def full_hidden(self, d_model: int) -> int:
        """Width of a coarse expert (before the fine-grained split)."""
        return self.hidden if self.hidden is not None else llama_hidden(d_model, self.multiple_of)

    def expert_hidden(self, d_model: int) -> int:
        """F, the width of one routed expert."""
        return self.full_hidden(d_model) // self.granularity

    def shared_width(self, d_model: int) -> int:
        if self.shared_hidden is not None:
            return self.shared_hidden
        return self.n_shared * self.expert_hidden(d_model)

    @property
    def causal(self) -> bool:
        """Whether token t's output depends only on tokens <= t of its sequence."""
        if self.router == "expert_choice":
            return False
        if self.router == "topk" and self.dispatch in ("capacity", "onehot"):
            return self.priority == "position" or (self.priority == "choice" and self.k_active == 1)
        return True

    def validate(self, d_model: int, path: str = "moe") -> None:
        self._validate_values(path)
        self._validate_sizes(d_model, path)
        self._validate_routing(path)
        self._validate_causality(path)

    def _validate_values(self, path: str) -> None:
        for name in ("n_experts", "top_k", "granularity", "n_expert_pools", "topk_pools",
                     "multiple_of"):
            positive(f"{path}.{name}", getattr(self, name))
        positive(f"{path}.hidden", self.hidden, allow_none=True)
        positive(f"{path}.shared_hidden", self.shared_hidden, allow_none=True)
        n_shared = self.n_shared
        if not isinstance(n_shared, int) or isinstance(n_shared, bool) or n_shared < 0:
            raise ValueError(f"{path}.n_shared={self.n_shared!r} must be an integer >= 0")
        one_of(f"{path}.router", self.router, ROUTERS)
        one_of(f"{path}.score", self.score, SCORES)
        one_of(f"{path}.noise", self.noise, NOISES)
        one_of(f"{path}.dispatch", self.dispatch, DISPATCHES)
        one_of(f"{path}.priority", self.priority, PRIORITIES)
        if self.gmm_impl is not None:
            one_of(f"{path}.gmm_impl", self.gmm_impl, gmm_impls())
        in_range(f"{path}.capacity_factor", self.capacity_factor, 0.0, lo_open=True)
        for name in [f"{n}_coef" for n in LOSSES] + ["bias_rate", "noise_scale", "routed_scaling"]:
            in_range(f"{path}.{name}", getattr(self, name), 0.0)
        in_range(f"{path}.threshold_ema", self.threshold_ema, 0.0, 1.0, hi_open=True)

    def _validate_sizes(self, d_model: int, path: str) -> None:
        full = self.full_hidden(d_model)
        if full % self.granularity:
            raise ValueError(f"{path}.granularity={self.granularity} must divide the expert width "
                             f"{full} ({path}.hidden)")
        if self.k_active > self.n_routed:
            raise ValueError(f"{path}.top_k={self.top_k} selects {self.k_active} of only "
                             f"{self.n_routed} experts; need top_k <= n_experts")
        pools, per_pool = self.n_expert_pools, self.n_routed // self.n_expert_pools
        if self.n_routed % pools or self.topk_pools > pools:
            raise ValueError(f"{path}.n_expert_pools={pools} must divide the {self.n_routed} "
                             f"routed experts and {path}.topk_pools={self.topk_pools} must be "
                             "<= n_expert_pools")
        if pools > 1 and self.k_active > self.topk_pools * per_pool:
            raise ValueError(f"{path}.topk_pools={self.topk_pools} pools of {per_pool} experts "
                             f"hold fewer than the {self.k_active} experts to select")

    def _validate_routing(self, path: str) -> None:
        if self.router != "topk" and (self.aux_free_bias or self.n_expert_pools > 1):
            raise ValueError(f"{path}.router={self.router!r}: aux_free_bias and n_expert_pools > 1 "
                             "apply to router='topk' only")
        if self.router != "topk" and self.dispatch not in ("capacity", "dense"):
            raise ValueError(f"{path}.dispatch={self.dispatch!r} is not allowed with "
                             f"router={self.router!r}; choose 'capacity' or 'dense'")
        if self.router == "expert_threshold" and self.priority != "position":
            raise ValueError(f"{path}.priority={self.priority!r}: router='expert_threshold' takes "
                             "tokens first-come-first-served; use priority='position'")

    def _validate_causality(self, path: str) -> None:
        if self.causal or self.allow_noncausal_routing:
            return
        what = ("router='expert_choice' lets each expert pick its top-Cap tokens of the whole "
                "sequence" if self.router == "expert_choice" else
                f"capacity priority={self.priority!r} lets later tokens displace earlier ones")
        raise ValueError(f"{path}: {what}, so a token's output depends on future tokens (a leak "
                         "in a causal decoder). Use router='expert_threshold' (causal expert "
                         "choice) or priority='position', or set "
                         f"{path}.allow_noncausal_routing=True in an encoder setting")

    def make(self, d_model: int, dtype: DType, param_dtype: DType, name: str | None = None):
        return MoE(self, d_model, dtype, param_dtype, name=name)


class Routing(NamedTuple):
    """What the route phase decided, per sequence (leading [B, T] axes).

    Token choice and expert threshold fill ``weights``/``experts`` [B, T, k] (and
    ``valid`` [B, T, k] for the threshold router, whose k = E); expert choice fills
    ``plan`` (a batched :class:`layers.moe.dispatch.Plan`). ``selected`` [B, T, E] is
    the 0/1 selection before capacity drops (loads, balance losses, state updates).
    """
    selected: Array
    weights: Array | None = None
    experts: Array | None = None
    valid: Array | None = None
    plan: Plan | None = None


class MoE(nn.Module):
    """x [B, T, D] -> (y [B, T, D], None, aux). See the module docstring."""
    cfg: MoEConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array | None = None,
                 segment_ids: Array | None = None, cache=None, train: bool = False):
        cfg = self.cfg
        t = x.shape[1]
        x = x.astype(self.dtype)
        xf = x.astype(jnp.float32)
        logits, scores = self._scores(xf, train)                         # [B, T, E] fp32
        w = self._expert_weights()
        cap = expert_capacity(t, cfg.n_routed, cfg.k_active, cfg.capacity_factor)
        routing = self._route(scores, cap, train)
        y, kept = self._dispatch(x, routing, w, cap)
        if cfg.n_shared or cfg.shared_hidden:
            y = y + self._shared_experts(x, xf)
        y = nn.with_logical_constraint(y, ("batch", "length", "act_embed"))
        return y, None, self._aux(logits, R.normalized(scores), routing.selected, kept)

    # ------------------------------------------------------------------- scores, parameters, state

    def _scores(self, xf: Array, train: bool) -> tuple[Array, Array]:
        """Router logits and (possibly noisy) scores, both [B, T, E] fp32."""
        cfg = self.cfg
        shape = (self.d_model, cfg.n_routed)
        w_router = init.param(self, "router", init.fan_in(0.1), shape, ("embed", None))
        logits = jnp.einsum("btd,de->bte", xf, w_router.astype(jnp.float32))
        noisy = logits
        if cfg.noise == "gaussian":
            w_noise = init.param(self, "noise", init.zeros, shape, ("embed", None))
            if train:
                std = jax.nn.softplus(jnp.einsum("btd,de->bte", xf, w_noise.astype(jnp.float32)))
                noisy = R.noisy_logits(logits, self.make_rng("noise"), "gaussian", std,
                                       cfg.noise_scale)
        elif cfg.noise == "gumbel" and train:
            noisy = R.noisy_logits(logits, self.make_rng("noise"), "gumbel", scale=cfg.noise_scale)
        return logits, R.router_scores(noisy, cfg.score)

    def _expert_weights(self) -> dict:
        """``{"wi", "wg": [E, D, F], "wo": [E, F, D]}`` (fan-in init per expert)."""
        e, d, f = self.cfg.n_routed, self.d_model, self.cfg.expert_hidden(self.d_model)
        w_init = init.fan_in(1.0, in_axis=1, out_axis=2, batch_axis=(0,))
        return {name: init.param(self, name, w_init, shape, axes)
                for name, axes, shape in [("wi", ("expert", "embed", "mlp"), (e, d, f)),
                                          ("wg", ("expert", "embed", "mlp"), (e, d, f)),
                                          ("wo", ("expert", "mlp", "embed"), (e, f, d))]}

    def _state_entry(self, name: str, value: Array):
        """(value, variable or None if read-only) of a non-gradient state entry."""
        mutable = self.is_mutable_collection(STATE_COLLECTION)
        if mutable or self.has_variable(STATE_COLLECTION, name):
            var = self.variable(STATE_COLLECTION, name, lambda: value)
            return var.value, (var if mutable else None)
        return value, None

    @staticmethod
    def _write_state(var, new_value: Callable[[], Array], train: bool) -> None:
        """Stores the updated state (training with a mutable collection only)."""
        if train and var is not None:
            var.value = new_value()

    # ------------------------------------------------------------------- route

    def _route(self, scores: Array, cap: int, train: bool) -> Routing:
        if self.cfg.router == "topk":
            return self._route_topk(scores, train)
        if self.cfg.router == "expert_threshold":
            return self._route_threshold(scores, cap, train)
        return self._route_expert_choice(scores, cap)

    def _route_topk(self, scores: Array, train: bool) -> Routing:
        cfg = self.cfg
        b, t, e = scores.shape
        bias = None
        if cfg.aux_free_bias:
            bias, bias_var = self._state_entry("router_bias", jnp.zeros((e,), jnp.float32))
        weights, experts = R.topk_route(scores.reshape(b * t, e), cfg.k_active, bias=bias,
                                        n_expert_pools=cfg.n_expert_pools,
                                        topk_pools=cfg.topk_pools, renormalize=cfg.renormalize,
                                        scaling=cfg.routed_scaling)
        weights, experts = weights.reshape(b, t, -1), experts.reshape(b, t, -1)
        selected = jax.nn.one_hot(experts, e, dtype=jnp.float32).sum(-2)  # [B, T, E]
        if cfg.aux_free_bias:
            self._write_state(bias_var, lambda: R.aux_free_bias_update(
                bias, selected.sum((0, 1)), cfg.bias_rate), train)
        return Routing(selected, weights, experts)

    def _route_threshold(self, scores: Array, cap: int, train: bool) -> Routing:
        cfg = self.cfg
        e = scores.shape[-1]
        start = jnp.full((e,), 1.0 / e if cfg.score == "softmax" else 0.5, jnp.float32)
        thr, thr_var = self._state_entry("ec_threshold", start)
        weights, experts, valid = jax.vmap(R.threshold_route, in_axes=(0, None))(scores, thr)
        self._write_state(thr_var, lambda: R.threshold_update(thr, scores, cap, cfg.threshold_ema),
                          train)
        return Routing(valid.astype(jnp.float32), weights * cfg.routed_scaling, experts, valid)

    def _route_expert_choice(self, scores: Array, cap: int) -> Routing:
        t = scores.shape[1]
        gates, tokens = jax.vmap(R.expert_choice_route, in_axes=(0, None))(scores, cap)
        plan = jax.vmap(expert_choice_plan, in_axes=(0, 0, None))(
            gates * self.cfg.routed_scaling, tokens, t)
        return Routing(plan.kept.astype(jnp.float32), plan=plan)

    # ------------------------------------------------------------------- dispatch

    def _token_plan(self, r: Routing, capacity: int) -> Plan:
        """Capacity plan of token-choice / threshold routing, per sequence."""
        valid = r.valid if r.valid is not None else jnp.ones(r.experts.shape, bool)
        return jax.vmap(capacity_plan, in_axes=(0, 0, None, None, None, 0))(
            r.experts, r.weights, self.cfg.n_routed, capacity, self.cfg.priority, valid)

    def _dispatch(self, x: Array, r: Routing, w: dict, cap: int) -> tuple[Array, Array]:
        """Runs the experts: y [B, T, D] and ``kept`` (the assignments processed)."""
        cfg = self.cfg
        b, t, d = x.shape
        e = cfg.n_routed
        if cfg.dispatch == "dense":
            if r.plan is not None:
                combine = jax.vmap(combine_from_plan, in_axes=(0, None, None))(r.plan, t, e)
            else:
                combine = combine_from_assignments(r.experts, r.weights, e, r.valid)
            y = dense_moe(x.reshape(b * t, d), combine.reshape(b * t, e), w)
            return y.reshape(b, t, d), r.selected
        if cfg.dispatch == "onehot":
            return onehot_moe(x, r.experts, r.weights, w, cap, cfg.priority, r.valid)
        mesh = expert_mesh(b, e) if cfg.expert_parallel else None
        if cfg.dispatch == "dropless" and mesh is None:
            fn = functools.partial(dropless_moe, gmm_impl=cfg.gmm_impl)
            shards = batch_mesh(b)
            if shards is not None:   # grouped-matmul kernels cannot be partitioned by GSPMD
                return batch_sharded_dropless(fn, x, r.experts, r.weights, w, shards), r.selected
            y = fn(x.reshape(b * t, d), r.experts.reshape(b * t, -1), r.weights.reshape(b * t, -1), w)
            return y.reshape(b, t, d), r.selected
        # capacity buffers; dropless under expert parallelism uses Cap = T (never drops)
        plan = r.plan if r.plan is not None else self._token_plan(
            r, cap if cfg.dispatch == "capacity" else t)
        if mesh is not None:
            return expert_parallel_run(x, plan.slot_token, plan.slot_weight, w, e, mesh), plan.kept
        return run_plan(x, plan.slot_token, plan.slot_weight, w, e), plan.kept

    def _shared_experts(self, x: Array, xf: Array) -> Array:
        """Always-on shared experts (one SwiGLU of the total shared width), optionally gated."""
        cfg = self.cfg
        shared = FFNConfig(activation="swiglu", hidden=cfg.shared_width(self.d_model))
        ys, _, _ = shared.make(self.d_model, self.dtype, self.param_dtype, name="shared")(x)
        if cfg.shared_gate:
            gate = dense(1, ("embed", None), jnp.float32, self.param_dtype, "shared_gate")(xf)
            ys = ys * jax.nn.sigmoid(gate).astype(ys.dtype)
        return ys

    # ------------------------------------------------------------------- aux

    def _aux(self, logits: Array, probs: Array, selected: Array, kept: Array) -> dict:
        cfg = self.cfg
        e = probs.shape[-1]
        flat_p, flat_s = probs.reshape(-1, e), selected.reshape(-1, e)
        terms = {
            "load_balance": lambda: R.switch_balance_loss(flat_p, flat_s),
            "seq_balance": lambda: R.sequence_balance_loss(probs, selected, cfg.k_active),
            "z_loss": lambda: R.z_loss(logits.reshape(-1, e)),
            "entropy": lambda: R.entropy_loss(flat_p),
            "kl_uniform": lambda: R.kl_uniform_loss(flat_p),
            "load_deviation": lambda: R.load_deviation_loss(flat_p, flat_s),
        }
        losses = {f"moe_{n}": getattr(cfg, f"{n}_coef") * fn() for n, fn in terms.items()
                  if getattr(cfg, f"{n}_coef") > 0}
        load = R.load_fraction(selected)
        if cfg.router == "expert_choice":
            dropped = jnp.mean(~kept.any(-1))
        else:
            dropped = 1.0 - kept.astype(jnp.float32).sum() / jnp.maximum(selected.sum(), 1.0)
        metrics = {"moe_load": load, "moe_dropped": dropped.astype(jnp.float32),
                   "moe_router_entropy": R.entropy_loss(flat_p),
                   "moe_load_cv": R.coefficient_of_variation(load)}
        return {"losses": losses, "metrics": metrics}
