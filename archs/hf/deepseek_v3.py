"""HF ``deepseek_v3``: MLA attention (layers/attention/mla.py) with DeepSeekMoE FFNs after
``first_k_dense_replace`` dense layers (archs/deepseek.py; see archs/hf/common.py for the
mapping contract).

Layouts: ``q_b_proj [H*(Dn+Dr), Rq]`` -> ``q_b [Rq, H, Dn+Dr]``, ``kv_b_proj [H*(Dn+Dv), R]``
-> ``kv_b [R, H, Dn+Dv]``, ``o_proj [D, H*Dv]`` -> ``o [H, Dv, D]``; the interleaved RoPE
layout is handled by the module (``rope_interleave``), so the rotary rows are copied as
they are. ``mlp.gate.e_score_correction_bias`` (selection-only bias) goes to the
``state`` collection (``router_bias``) through :func:`state_map`. YaRN's
``mscale``/``mscale_all_dim`` become RoPE's ``attention_factor`` ``m(mscale) /
m(mscale_all_dim)`` and MLA's softmax ``mscale_all_dim``. The multi-token-prediction
layers (``num_nextn_predict_layers``) are not part of the HF forward and are not loaded.
"""

from __future__ import annotations

import dataclasses

from archs.config import ModelConfig
from archs.deepseek import deepseek_pattern
from archs.hf import common, llama, moe
from archs.hf.common import ConfigReader, copy, heads_in, heads_out, layer_path, linear
from layers.attention.mla import MLAConfig, yarn_mscale
from layers.ffn import FFNConfig
from layers.moe import MoEConfig

MODEL_TYPES = ("deepseek_v3",)


def _rope(r: ConfigReader):
    """RoPE config and ``mscale_all_dim`` (DeepSeek's YaRN fields taken out first)."""
    key = "rope_parameters" if r.hf.get("rope_parameters") is not None else "rope_scaling"
    rp = dict(r.hf.get(key) or {})
    mscale, mscale_all = rp.pop("mscale", None), rp.pop("mscale_all_dim", None)
    sub = ConfigReader({**r.hf, key: rp}, r.model_type)
    rope = common.rope_from_hf(sub)
    r.used |= sub.used | {key}
    if rope.scaling not in ("none", "yarn"):
        raise ValueError(f"deepseek_v3 rope_type for scaling {rope.scaling!r} is not supported; "
                         "allowed: ['default', 'yarn']")
    if rope.scaling == "yarn" and rope.attention_factor is None and mscale and mscale_all:
        factor = yarn_mscale(rope.factor, mscale) / yarn_mscale(rope.factor, mscale_all)
        rope = dataclasses.replace(rope, attention_factor=factor)
    return rope, float(mscale_all or 0.0) if rope.scaling == "yarn" else 0.0


def _mla(r: ConfigReader) -> MLAConfig:
    h = r.get("num_attention_heads")
    if r.get("num_key_value_heads", h) not in (h, None):
        raise ValueError(f"deepseek_v3 config field 'num_key_value_heads'="
                         f"{r.get('num_key_value_heads')!r} is not supported; allowed: [{h}]")
    r.require("attention_bias", (False,), False)
    dn, dr = r.get("qk_nope_head_dim"), r.get("qk_rope_head_dim")
    r.require("qk_head_dim", (dn + dr,), dn + dr)
    r.get("head_dim")                       # HF derives it (= qk_rope_head_dim)
    rope, mscale_all = _rope(r)
    return MLAConfig(n_heads=h, q_lora_rank=r.get("q_lora_rank"), kv_lora_rank=r.get("kv_lora_rank"),
                     qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=r.get("v_head_dim"),
                     rope=rope, rope_interleave=bool(r.get("rope_interleave", True)),
                     mscale_all_dim=mscale_all)


def _moe(r: ConfigReader) -> MoEConfig:
    r.require("scoring_func", ("sigmoid",), "sigmoid")
    r.require("topk_method", ("noaux_tc",), "noaux_tc")
    r.require("moe_layer_freq", (1,), 1)
    # parallelism and training-only fields (the V3 report's balance loss factor is 1e-4)
    r.get("ep_size"), r.get("seq_aux"), r.get("aux_loss_alpha")
    return MoEConfig(n_experts=r.get("n_routed_experts"), top_k=r.get("num_experts_per_tok"),
                     hidden=r.get("moe_intermediate_size"), n_shared=r.get("n_shared_experts") or 0,
                     score="sigmoid", renormalize=bool(r.get("norm_topk_prob", True)),
                     routed_scaling=float(r.get("routed_scaling_factor", 1.0)),
                     n_expert_pools=r.get("n_group") or 1, topk_pools=r.get("topk_group") or 1,
                     aux_free_bias=True, bias_rate=1e-3, seq_balance_coef=1e-4,
                     dispatch="dropless")


def config_from_hf(hf: dict) -> ModelConfig:
    r = ConfigReader(hf, hf["model_type"])
    llama.check_common(r)
    r.get("num_nextn_predict_layers")        # MTP modules: not part of the LM forward
    mla, moe_cfg = _mla(r), _moe(r)
    n_layers = r.get("num_hidden_layers")
    dense = FFNConfig(activation="swiglu", hidden=r.get("intermediate_size"))
    first_k = min(r.get("first_k_dense_replace", 0), n_layers)
    cfg = ModelConfig(name="hf_deepseek_v3", vocab_size=r.get("vocab_size"),
                      d_model=r.get("hidden_size"), n_layers=n_layers,
                      pattern=deepseek_pattern(first_k, n_layers, mla, dense, moe_cfg),
                      norm="rmsnorm", norm_eps=r.get("rms_norm_eps"),
                      tie_embeddings=r.get("tie_word_embeddings", False),
                      max_len=r.get("max_position_embeddings"))
    r.finish()
    return cfg


def _first_k_dense(cfg: ModelConfig) -> int:
    return sum(1 for s in cfg.pattern if not isinstance(s.ffn, MoEConfig)) if len(cfg.pattern) > 1 else 0


def config_to_hf(cfg: ModelConfig) -> dict:
    mla: MLAConfig = cfg.pattern[0].mixer
    moe_cfg: MoEConfig = cfg.pattern[-1].ffn
    first_k = _first_k_dense(cfg)
    rope = common.rope_to_hf(mla.rope)
    if mla.rope.scaling == "yarn" and mla.mscale_all_dim:
        rope["mscale_all_dim"] = mla.mscale_all_dim
    return {"model_type": "deepseek_v3", "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": cfg.max_len, "hidden_act": "silu",
            "num_attention_heads": mla.n_heads, "num_key_value_heads": mla.n_heads,
            "q_lora_rank": mla.q_lora_rank, "kv_lora_rank": mla.kv_lora_rank,
            "qk_nope_head_dim": mla.qk_nope_head_dim, "qk_rope_head_dim": mla.qk_rope_head_dim,
            "v_head_dim": mla.v_head_dim, "rope_interleave": mla.rope_interleave,
            "rope_parameters": rope, "attention_bias": False,
            "first_k_dense_replace": first_k,
            "intermediate_size": (cfg.pattern[0].ffn.hidden_dim(cfg.d_model) if first_k
                                  else moe_cfg.expert_hidden(cfg.d_model)),
            "n_routed_experts": moe_cfg.n_routed, "num_experts_per_tok": moe_cfg.k_active,
            "moe_intermediate_size": moe_cfg.expert_hidden(cfg.d_model),
            "n_shared_experts": moe_cfg.n_shared, "norm_topk_prob": moe_cfg.renormalize,
            "routed_scaling_factor": moe_cfg.routed_scaling, "n_group": moe_cfg.n_expert_pools,
            "topk_group": moe_cfg.topk_pools}


def _mla_entries(cfg: ModelConfig, layer: int, mla: MLAConfig, hf: str) -> list:
    at = lambda *name: layer_path(cfg, layer, "mixer", *name)
    h, dqk = mla.n_heads, mla.qk_head_dim
    if mla.q_lora_rank is None:
        out = [heads_in(f"{hf}q_proj.weight", *at("q"), h, dqk)]
    else:
        out = [linear(f"{hf}q_a_proj.weight", *at("q_a", "kernel")),
               copy(f"{hf}q_a_layernorm.weight", *at("q_norm", "scale")),
               heads_in(f"{hf}q_b_proj.weight", *at("q_b"), h, dqk)]
    return out + [linear(f"{hf}kv_a_proj_with_mqa.weight", *at("kv_a", "kernel")),
                  copy(f"{hf}kv_a_layernorm.weight", *at("kv_norm", "scale")),
                  heads_in(f"{hf}kv_b_proj.weight", *at("kv_b"), h,
                           mla.qk_nope_head_dim + mla.v_head_dim),
                  heads_out(f"{hf}o_proj.weight", *at("o"), h, mla.v_head_dim)]


def tensor_map(cfg: ModelConfig) -> list:
    out = llama.embed_entries(cfg)
    for l in range(cfg.n_layers):
        p, spec = f"model.layers.{l}.", cfg.pattern[l % len(cfg.pattern)]
        out += _mla_entries(cfg, l, spec.mixer, p + "self_attn.")
        if isinstance(spec.ffn, MoEConfig):
            out += moe.expert_entries(cfg, l, spec.ffn, p + "mlp.",
                                      ("gate", "gate_proj", "up_proj", "down_proj"))
            if spec.ffn.n_shared:
                out += llama.swiglu_entries(cfg, l, p + "mlp.shared_experts.", ("ffn", "shared"))
        else:
            out += llama.swiglu_entries(cfg, l, p + "mlp.")
        out += [llama.norm_entry(cfg, l, p + "input_layernorm.weight", "mixer_norm"),
                llama.norm_entry(cfg, l, p + "post_attention_layernorm.weight", "ffn_norm")]
    return out


def state_map(cfg: ModelConfig) -> list:
    """Entries of the ``state`` collection: each MoE layer's selection bias."""
    return [copy(f"model.layers.{l}.mlp.gate.e_score_correction_bias",
                 *layer_path(cfg, l, "ffn", "router_bias"))
            for l in range(cfg.n_layers)
            if isinstance(cfg.pattern[l % len(cfg.pattern)].ffn, MoEConfig)]
