"""HF ``mixtral`` and ``qwen2_moe``: Llama-like attention with a top-k MoE FFN (dropless
dispatch, as the reference computes every routed token); see archs/hf/common.py."""

from __future__ import annotations

from archs.config import BlockSpec, ModelConfig
from archs.hf import llama
from archs.hf.common import ConfigReader, Entry, layer_path, linear
from layers.moe import MoEConfig

MODEL_TYPES = ("mixtral", "qwen2_moe")


def moe_from_hf(r: ConfigReader) -> MoEConfig:
    if r.model_type == "mixtral":
        return MoEConfig(n_experts=r.get("num_local_experts"), top_k=r.get("num_experts_per_tok"),
                         hidden=r.get("intermediate_size"), score="softmax", renormalize=True,
                         dispatch="dropless")
    if r.model_type == "qwen2_moe":
        r.require("decoder_sparse_step", (1,), 1)
        r.require("mlp_only_layers", ([],), [])
        r.get("intermediate_size")     # width of dense layers, which decoder_sparse_step=1 rules out
        return MoEConfig(n_experts=r.get("num_experts"), top_k=r.get("num_experts_per_tok"),
                         hidden=r.get("moe_intermediate_size"), score="softmax",
                         renormalize=bool(r.get("norm_topk_prob", False)), dispatch="dropless",
                         shared_hidden=r.get("shared_expert_intermediate_size"), shared_gate=True)
    # jamba
    return MoEConfig(n_experts=r.get("num_experts"), top_k=r.get("num_experts_per_tok"),
                     hidden=r.get("intermediate_size"), score="softmax", renormalize=False,
                     dispatch="dropless")


def moe_to_hf(cfg: ModelConfig, moe: MoEConfig, model_type: str) -> dict:
    f = moe.expert_hidden(cfg.d_model)
    if model_type == "mixtral":
        return {"num_local_experts": moe.n_experts, "num_experts_per_tok": moe.top_k,
                "intermediate_size": f}
    out = {"num_experts": moe.n_experts, "num_experts_per_tok": moe.top_k}
    if model_type == "qwen2_moe":
        out.update(moe_intermediate_size=f, intermediate_size=f, norm_topk_prob=moe.renormalize,
                   shared_expert_intermediate_size=moe.shared_width(cfg.d_model),
                   decoder_sparse_step=1, mlp_only_layers=[])
    return out


def config_from_hf(hf: dict) -> ModelConfig:
    r = ConfigReader(hf, hf["model_type"])
    llama.check_common(r)
    attn, max_len = llama.attention_from_hf(r)
    cfg = ModelConfig(name=f"hf_{r.model_type}", vocab_size=r.get("vocab_size"),
                      d_model=r.get("hidden_size"), n_layers=r.get("num_hidden_layers"),
                      pattern=(BlockSpec(mixer=attn, ffn=moe_from_hf(r)),), norm="rmsnorm",
                      norm_eps=r.get("rms_norm_eps"),
                      tie_embeddings=r.get("tie_word_embeddings", False), max_len=max_len)
    r.finish()
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict:
    spec, mt = cfg.pattern[0], cfg.name.removeprefix("hf_")
    out = llama.attention_to_hf(cfg, spec.mixer, mt)
    out.update(moe_to_hf(cfg, spec.ffn, mt))
    if mt == "qwen2_moe":
        out["qkv_bias"] = spec.mixer.qkv_bias
    return out


def expert_entries(cfg: ModelConfig, layer: int, moe: MoEConfig, hf: str, names) -> list:
    """Router and per-expert SwiGLU of layer ``layer``; ``names`` = HF (router, gate, up, down)."""
    router, gate, up, down = names
    path, idx = layer_path(cfg, layer, "ffn", "router")
    out = [linear(f"{hf}{router}.weight", path, idx)]
    for e in range(moe.n_experts):
        for hf_name, lab in ((gate, "wi"), (up, "wg"), (down, "wo")):
            path, idx = layer_path(cfg, layer, "ffn", lab)
            out.append(Entry(f"{hf}experts.{e}.{hf_name}.weight", path, idx + (e,),
                             lambda w: w.T, lambda w: w.T))
    return out


def ffn_entries(cfg: ModelConfig, layer: int, moe: MoEConfig, mt: str, hf: str) -> list:
    if mt == "mixtral":
        return expert_entries(cfg, layer, moe, hf, ("gate", "w1", "w3", "w2"))
    router = "router" if mt == "jamba" else "gate"
    out = expert_entries(cfg, layer, moe, hf, (router, "gate_proj", "up_proj", "down_proj"))
    if mt == "qwen2_moe":
        out += llama.swiglu_entries(cfg, layer, hf + "shared_expert.", ("ffn", "shared"))
        out.append(linear(f"{hf}shared_expert_gate.weight",
                          *layer_path(cfg, layer, "ffn", "shared_gate", "kernel")))
    return out


def tensor_map(cfg: ModelConfig) -> list:
    mt = cfg.name.removeprefix("hf_")
    out = llama.embed_entries(cfg)
    ffn_prefix = "block_sparse_moe." if mt == "mixtral" else "mlp."
    for l in range(cfg.n_layers):
        p, spec = f"model.layers.{l}.", cfg.pattern[l % len(cfg.pattern)]
        out += llama.attention_entries(cfg, l, spec.mixer, p + "self_attn.")
        out += ffn_entries(cfg, l, spec.ffn, mt, p + ffn_prefix)
        out += [llama.norm_entry(cfg, l, p + "input_layernorm.weight", "mixer_norm"),
                llama.norm_entry(cfg, l, p + "post_attention_layernorm.weight", "ffn_norm")]
    return out
