"""HF ``jamba``: Mamba layers with Jamba's Delta/B/C RMS norms, attention (no positional
encoding) every ``attn_layer_period`` layers, MoE every ``expert_layer_period`` layers;
see archs/hf/common.py for the mapping contract."""

from __future__ import annotations

import math

from archs.config import BlockSpec, ModelConfig
from archs.hf import llama, mamba, moe
from archs.hf.common import ConfigReader, copy, layer_path
from layers.attention import AttentionConfig
from layers.ffn import FFNConfig
from layers.moe import MoEConfig
from layers.recurrent.mamba import MambaConfig

MODEL_TYPES = ("jamba",)
_IGNORED = ("use_mamba_kernels", "use_associative_scan", "use_mambapy", "num_logits_to_keep")


def _kinds(r: ConfigReader, n_layers: int) -> list[tuple[bool, bool]]:
    """(is_attention, is_moe) per layer."""
    ap, ao = r.get("attn_layer_period", 8), r.get("attn_layer_offset", 4)
    ep, eo = r.get("expert_layer_period", 2), r.get("expert_layer_offset", 1)
    return [(l % ap == ao, l % ep == eo) for l in range(n_layers)]


def config_from_hf(hf: dict) -> ModelConfig:
    r = ConfigReader(hf, "jamba")
    r.require("hidden_act", ("silu",), "silu")
    r.require("mamba_conv_bias", (True,), True)
    r.require("sliding_window", (None,), None)
    for key in _IGNORED:
        r.get(key)
    d, n_layers, eps = r.get("hidden_size"), r.get("num_hidden_layers"), r.get("rms_norm_eps")
    h = r.get("num_attention_heads")
    attn = AttentionConfig(n_heads=h, n_kv_heads=r.get("num_key_value_heads") or h,
                           position="none")
    mam = MambaConfig(d_state=r.get("mamba_d_state"), d_conv=r.get("mamba_d_conv"),
                      expand=r.get("mamba_expand"), dt_rank=r.get("mamba_dt_rank"),
                      proj_bias=bool(r.get("mamba_proj_bias", False)), dt_bc_norm=True,
                      dt_bc_norm_eps=eps)
    mixture = moe.moe_from_hf(r)
    dense = FFNConfig(activation="swiglu", hidden=mixture.hidden)
    kinds = _kinds(r, n_layers)
    period = math.lcm(r.get("attn_layer_period", 8), r.get("expert_layer_period", 2))
    unit = kinds[:period] if n_layers % period == 0 else kinds
    pattern = tuple(BlockSpec(mixer=attn if a else mam, ffn=mixture if e else dense)
                    for a, e in unit)
    cfg = ModelConfig(name="hf_jamba", vocab_size=r.get("vocab_size"), d_model=d,
                      n_layers=n_layers, pattern=pattern, norm="rmsnorm", norm_eps=eps,
                      tie_embeddings=r.get("tie_word_embeddings", False),
                      max_len=r.get("max_position_embeddings"))
    r.finish()
    return cfg


def _layout(cfg: ModelConfig) -> dict:
    """attn/expert period and offset reproducing the pattern (the first of each kind)."""
    unit = cfg.pattern
    attn = [i for i, s in enumerate(unit) if not isinstance(s.mixer, MambaConfig)]
    experts = [i for i, s in enumerate(unit) if isinstance(s.ffn, MoEConfig)]
    a_period = attn[1] - attn[0] if len(attn) > 1 else len(unit)
    e_period = experts[1] - experts[0] if len(experts) > 1 else len(unit)
    return {"attn_layer_period": a_period, "attn_layer_offset": attn[0] if attn else len(unit),
            "expert_layer_period": e_period,
            "expert_layer_offset": experts[0] if experts else len(unit)}


def config_to_hf(cfg: ModelConfig) -> dict:
    attn = next(s.mixer for s in cfg.pattern if not isinstance(s.mixer, MambaConfig))
    mam = next(s.mixer for s in cfg.pattern if isinstance(s.mixer, MambaConfig))
    mixture = next(s.ffn for s in cfg.pattern if isinstance(s.ffn, MoEConfig))
    d = cfg.d_model
    out = {"model_type": "jamba", "hidden_size": d, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": attn.n_heads, "num_key_value_heads": attn.kv_heads,
           "rms_norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size, "hidden_act": "silu",
           "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_len,
           "mamba_d_state": mam.d_state, "mamba_d_conv": mam.d_conv, "mamba_expand": mam.expand,
           "mamba_dt_rank": mam.rank(d), "mamba_proj_bias": mam.proj_bias, "mamba_conv_bias": True,
           "intermediate_size": mixture.expert_hidden(d)}
    out.update(moe.moe_to_hf(cfg, mixture, "jamba"))
    out.update(_layout(cfg))
    return out


def tensor_map(cfg: ModelConfig) -> list:
    out = llama.embed_entries(cfg, final="final_layernorm")
    for l in range(cfg.n_layers):
        p, spec = f"model.layers.{l}.", cfg.pattern[l % len(cfg.pattern)]
        if isinstance(spec.mixer, MambaConfig):
            out += mamba.mamba_entries(cfg, l, spec.mixer, p + "mamba.")
        else:
            out += llama.attention_entries(cfg, l, spec.mixer, p + "self_attn.")
        if isinstance(spec.ffn, MoEConfig):
            out += moe.ffn_entries(cfg, l, spec.ffn, "jamba", p + "feed_forward.")
        else:
            out += llama.swiglu_entries(cfg, l, p + "feed_forward.")
        out += [copy(p + "input_layernorm.weight", *layer_path(cfg, l, "mixer_norm", "scale")),
                copy(p + "pre_ff_layernorm.weight", *layer_path(cfg, l, "ffn_norm", "scale"))]
    return out
