"""Mixture-of-Experts FFN (Shazeer et al. 2017; GShard; Switch; Mixtral; DeepSeekMoE /
DeepSeek-V3; Qwen2-MoE), a drop-in for the dense FFN (layers/ffn.py contract):
``MoEConfig.make(...)`` returns a module ``(x [B, T, D], train=bool) -> (y, aux)``.

Structure: router ``[D, E]`` (fp32) -> scores -> routing (layers/routers.py) ->
dispatch of the routed experts (layers/moe_dispatch.py; expert parallelism in
layers/expert_parallel.py) + optional always-on shared experts (DeepSeekMoE), with an
optional sigmoid gate on the shared output (Qwen2-MoE).

* Fine-grained experts (DeepSeekMoE): ``granularity = m`` splits each of ``n_experts``
  experts of width ``hidden`` into m experts of width ``hidden / m`` and routes to
  ``m * top_k`` of them: same parameters and active FLOPs, more combinations.
* Routing groups: capacity, expert choice and their drops are computed per sequence
  (one batch row), so a sequence's output never depends on the other rows.
* Causality: token-choice routing with ``priority="position"`` (or dropless/dense
  dispatch) and ``router="expert_threshold"`` are causal. ``router="expert_choice"``
  (top-C tokens per expert over the sequence) and capacity priorities ``"choice"`` /
  ``"score"`` with k > 1 (``"score"`` for any k) let later tokens change which earlier
  tokens are processed, i.e. they leak the future in a decoder. ``validate`` refuses
  them unless ``allow_noncausal_routing=True`` (encoder settings); ``causal`` tells.
* Packed rows (segment ids) form one routing group: under capacity dropping their
  segments compete for capacity (the FFN contract carries no segment ids). Dropless
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
sequence top-C score cutoffs). The train loop keeps the returned state and uses it
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
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import routers as R
from layers.expert_parallel import expert_mesh, expert_parallel_run
from layers.ffn import FFNConfig, dense, llama_hidden
from layers.mixer import one_of, positive
from layers.moe_dispatch import (PRIORITIES, capacity_plan, combine_from_assignments,
                                 combine_from_plan, dense_moe, dropless_moe, expert_capacity,
                                 expert_choice_plan, onehot_moe, run_plan)
from layers.typing import Array, DType

STATE_COLLECTION = "state"  # == archs.model.STATE_COLLECTION (layers cannot import archs)
ROUTERS = ("topk", "expert_choice", "expert_threshold")
SCORES = ("softmax", "sigmoid")
NOISES = ("none", "gaussian", "gumbel")
DISPATCHES = ("capacity", "dropless", "onehot", "dense")
LOSSES = ("load_balance", "seq_balance", "z_loss", "entropy", "kl_uniform", "load_deviation")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
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
    n_groups: int = 1                   # group-limited routing (DeepSeek-V3)
    topk_groups: int = 1
    noise: str = "none"                 # one of NOISES (training only)
    noise_scale: float = 1.0
    aux_free_bias: bool = False         # DeepSeek-V3 selection bias in the "state" collection
    bias_rate: float = 1e-3
    threshold_ema: float = 0.9          # expert_threshold: EMA of the top-C cutoffs
    dispatch: str = "capacity"          # one of DISPATCHES
    capacity_factor: float = 1.25
    priority: str = "position"          # one of moe_dispatch.PRIORITIES
    load_balance_coef: float = 0.0
    seq_balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    entropy_coef: float = 0.0
    kl_uniform_coef: float = 0.0
    load_deviation_coef: float = 0.0
    expert_parallel: bool = True        # all-to-all when the mesh has an "expert" axis > 1
    gmm_impl: str | None = None         # pallas_kernels.grouped_matmul impl for dropless
    allow_noncausal_routing: bool = False

    @property
    def n_routed(self) -> int:
        return self.n_experts * self.granularity

    @property
    def k_active(self) -> int:
        return self.top_k * self.granularity

    def expert_hidden(self, d_model: int) -> int:
        full = self.hidden if self.hidden is not None else llama_hidden(d_model, self.multiple_of)
        return full // self.granularity

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
        for name in ("n_experts", "top_k", "granularity", "n_groups", "topk_groups", "multiple_of"):
            positive(f"{path}.{name}", getattr(self, name))
        positive(f"{path}.hidden", self.hidden, allow_none=True)
        positive(f"{path}.shared_hidden", self.shared_hidden, allow_none=True)
        if not isinstance(self.n_shared, int) or self.n_shared < 0:
            raise ValueError(f"{path}.n_shared={self.n_shared!r} must be an integer >= 0")
        one_of(f"{path}.router", self.router, ROUTERS)
        one_of(f"{path}.score", self.score, SCORES)
        one_of(f"{path}.noise", self.noise, NOISES)
        one_of(f"{path}.dispatch", self.dispatch, DISPATCHES)
        one_of(f"{path}.priority", self.priority, PRIORITIES)
        full = self.hidden if self.hidden is not None else llama_hidden(d_model, self.multiple_of)
        if full % self.granularity:
            raise ValueError(f"{path}.granularity={self.granularity} must divide the expert width "
                             f"{full} ({path}.hidden)")
        if self.k_active > self.n_routed:
            raise ValueError(f"{path}.top_k={self.top_k} selects {self.k_active} of only "
                             f"{self.n_routed} experts; need top_k <= n_experts")
        if self.n_routed % self.n_groups or self.topk_groups > self.n_groups:
            raise ValueError(f"{path}.n_groups={self.n_groups} must divide the {self.n_routed} routed "
                             f"experts and {path}.topk_groups={self.topk_groups} must be <= n_groups")
        if self.n_groups > 1 and self.k_active > self.topk_groups * (self.n_routed // self.n_groups):
            raise ValueError(f"{path}.topk_groups={self.topk_groups} groups of "
                             f"{self.n_routed // self.n_groups} experts hold fewer than the "
                             f"{self.k_active} experts to select")
        if not self.capacity_factor > 0:
            raise ValueError(f"{path}.capacity_factor={self.capacity_factor} must be > 0")
        for name in [f"{n}_coef" for n in LOSSES] + ["bias_rate", "noise_scale", "routed_scaling"]:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{path}.{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.threshold_ema < 1:
            raise ValueError(f"{path}.threshold_ema={self.threshold_ema} must be in [0, 1)")
        if self.router != "topk" and (self.aux_free_bias or self.n_groups > 1):
            raise ValueError(f"{path}.router={self.router!r}: aux_free_bias and n_groups > 1 apply "
                             "to router='topk' only")
        if self.router != "topk" and self.dispatch not in ("capacity", "dense"):
            raise ValueError(f"{path}.dispatch={self.dispatch!r} is not allowed with "
                             f"router={self.router!r}; choose 'capacity' or 'dense'")
        if self.router == "expert_threshold" and self.priority != "position":
            raise ValueError(f"{path}.priority={self.priority!r}: router='expert_threshold' takes "
                             "tokens first-come-first-served; use priority='position'")
        if not self.causal and not self.allow_noncausal_routing:
            what = ("router='expert_choice' lets each expert pick its top-C tokens of the whole "
                    "sequence" if self.router == "expert_choice" else
                    f"capacity priority={self.priority!r} lets later tokens displace earlier ones")
            raise ValueError(f"{path}: {what}, so a token's output depends on future tokens (a leak "
                             "in a causal decoder). Use router='expert_threshold' (causal expert "
                             "choice) or priority='position', or set "
                             f"{path}.allow_noncausal_routing=True in an encoder setting")

    def make(self, d_model: int, dtype: DType, param_dtype: DType, name: str | None = None):
        return MoE(self, d_model, dtype, param_dtype, name=name)


class MoE(nn.Module):
    """x [B, T, D] -> (y [B, T, D], aux). See the module docstring."""
    cfg: MoEConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def _state_entry(self, name: str, init: Array):
        """(value, variable or None if read-only) of a non-gradient state entry."""
        if self.is_mutable_collection(STATE_COLLECTION) or self.has_variable(STATE_COLLECTION, name):
            var = self.variable(STATE_COLLECTION, name, lambda: init)
            return var.value, (var if self.is_mutable_collection(STATE_COLLECTION) else None)
        return init, None

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, dict]:
        cfg = self.cfg
        b, t, d = x.shape
        e, k, f = cfg.n_routed, cfg.k_active, cfg.expert_hidden(self.d_model)
        x = x.astype(self.dtype)
        xf = x.astype(jnp.float32)
        r_init = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
        w_router = self.param("router", nn.with_logical_partitioning(r_init, ("embed", None)),
                              (d, e), self.param_dtype)
        logits = jnp.einsum("btd,de->bte", xf, w_router.astype(jnp.float32))  # [B, T, E] fp32
        noisy = logits
        if cfg.noise == "gaussian":
            w_noise = self.param("noise", nn.with_logical_partitioning(nn.initializers.zeros,
                                 ("embed", None)), (d, e), self.param_dtype)
            if train:
                std = jax.nn.softplus(jnp.einsum("btd,de->bte", xf, w_noise.astype(jnp.float32)))
                noisy = R.noisy_logits(logits, self.make_rng("noise"), "gaussian", std, cfg.noise_scale)
        elif cfg.noise == "gumbel" and train:
            noisy = R.noisy_logits(logits, self.make_rng("noise"), "gumbel", scale=cfg.noise_scale)
        scores = R.router_scores(noisy, cfg.score)                          # [B, T, E]
        probs = R.normalized(scores)

        w_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                  in_axis=1, out_axis=2, batch_axis=(0,))
        w = {name: self.param(name, nn.with_logical_partitioning(w_init, axes), shape,
                              self.param_dtype)
             for name, axes, shape in [("wi", ("expert", "embed", "mlp"), (e, d, f)),
                                       ("wg", ("expert", "embed", "mlp"), (e, d, f)),
                                       ("wo", ("expert", "mlp", "embed"), (e, f, d))]}

        cap = expert_capacity(t, e, k, cfg.capacity_factor)
        valid, updates = None, []
        if cfg.router == "topk":
            bias = None
            if cfg.aux_free_bias:
                bias, bias_var = self._state_entry("router_bias", jnp.zeros((e,), jnp.float32))
                updates.append((bias_var, lambda sel, bias=bias: R.aux_free_bias_update(
                    bias, sel.sum((0, 1)), cfg.bias_rate)))
            weights, experts = R.topk_route(scores.reshape(b * t, e), k, bias=bias,
                                            n_groups=cfg.n_groups, topk_groups=cfg.topk_groups,
                                            renormalize=cfg.renormalize, scaling=cfg.routed_scaling)
            weights, experts = weights.reshape(b, t, k), experts.reshape(b, t, k)
            selected = jax.nn.one_hot(experts, e, dtype=jnp.float32).sum(-2)  # [B, T, E]
        elif cfg.router == "expert_threshold":
            init = jnp.full((e,), 1.0 / e if cfg.score == "softmax" else 0.5, jnp.float32)
            thr, thr_var = self._state_entry("ec_threshold", init)
            updates.append((thr_var, lambda sel, thr=thr: R.threshold_update(
                thr, scores, cap, cfg.threshold_ema)))
            weights, experts, valid = jax.vmap(R.threshold_route, in_axes=(0, None))(scores, thr)
            weights = weights * cfg.routed_scaling
            selected = valid.astype(jnp.float32)
        else:  # expert_choice
            gates, tokens = jax.vmap(R.expert_choice_route, in_axes=(0, None))(scores, cap)
            plan = jax.vmap(expert_choice_plan, in_axes=(0, 0, None))(
                gates * cfg.routed_scaling, tokens, t)
            selected = plan.kept.astype(jnp.float32)

        mesh = None
        if cfg.expert_parallel and cfg.dispatch in ("capacity", "dropless"):
            mesh = expert_mesh(b, e)
        if cfg.router != "expert_choice" and (cfg.dispatch == "capacity" or mesh is not None):
            # dropless under expert parallelism: capacity buffers with C = T (never drops)
            plan = jax.vmap(capacity_plan, in_axes=(0, 0, None, None, None, 0))(
                experts, weights, e, cap if cfg.dispatch == "capacity" else t, cfg.priority,
                valid if valid is not None else jnp.ones(experts.shape, bool))
        if cfg.dispatch == "dense":
            if cfg.router == "expert_choice":
                combine = jax.vmap(combine_from_plan, in_axes=(0, None, None))(plan, t, e)
            else:
                combine = combine_from_assignments(experts, weights, e, valid)
            y = dense_moe(x.reshape(b * t, d), combine.reshape(b * t, e), w).reshape(b, t, d)
            kept = selected
        elif cfg.dispatch == "onehot":
            y, kept = onehot_moe(x, experts, weights, w, cap, cfg.priority, valid)
        elif cfg.dispatch == "dropless" and mesh is None:
            y = dropless_moe(x.reshape(b * t, d), experts.reshape(b * t, k),
                             weights.reshape(b * t, k), w, cfg.gmm_impl).reshape(b, t, d)
            kept = selected
        elif mesh is not None:
            y = expert_parallel_run(x, plan.slot_token, plan.slot_weight, w, e, mesh)
            kept = plan.kept
        else:
            y = run_plan(x, plan.slot_token, plan.slot_weight, w, e)
            kept = plan.kept

        if cfg.n_shared or cfg.shared_hidden:
            shared = FFNConfig(activation="swiglu", hidden=cfg.shared_width(self.d_model))
            ys, _ = shared.make(d, self.dtype, self.param_dtype, name="shared")(x)
            if cfg.shared_gate:
                gate = dense(1, ("embed", None), jnp.float32, self.param_dtype, "shared_gate")(xf)
                ys = ys * jax.nn.sigmoid(gate).astype(ys.dtype)
            y = y + ys
        y = nn.with_logical_constraint(y, ("batch", "length", "act_embed"))

        if train and updates:
            for var, update in updates:
                if var is not None:
                    var.value = update(selected)
        return y, self._aux(logits, probs, selected, kept)

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
