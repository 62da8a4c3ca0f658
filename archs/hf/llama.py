"""HF ``llama``, ``mistral`` and ``qwen2``: pre-norm GQA decoders with RoPE and SwiGLU
(archs/llama.py's block; see archs/hf/common.py for the mapping contract)."""

from __future__ import annotations

from archs.config import BlockSpec, ModelConfig
from archs.hf import common
from archs.hf.common import ConfigReader, heads_bias, heads_in, heads_out, layer_path, linear
from layers.attention import AttentionConfig
from layers.ffn import FFNConfig

MODEL_TYPES = ("llama", "mistral", "qwen2")


def attention_from_hf(r: ConfigReader) -> tuple[AttentionConfig, int]:
    """The attention of a Llama-like config (and its max_len)."""
    mt = r.model_type
    h, d = r.get("num_attention_heads"), r.get("hidden_size")
    bias = r.get("attention_bias", False) if mt == "llama" else (mt in ("qwen2", "qwen2_moe"))
    if mt == "qwen2_moe":
        bias = r.get("qkv_bias", True)
    window = None
    if mt == "mistral" or mt == "mixtral":
        window = r.get("sliding_window")
    elif mt in ("qwen2", "qwen2_moe"):
        r.get("sliding_window"), r.get("max_window_layers")
        r.require("use_sliding_window", (False,), False)
        types = r.get("layer_types") or []
        if any(t != "full_attention" for t in types):
            raise ValueError(f"{mt} config field 'layer_types'={types!r} is not supported; "
                             "allowed: all 'full_attention'")
    rope = common.rope_from_hf(r)
    head_dim = r.get("head_dim") or d // h
    attn = AttentionConfig(n_heads=h, n_kv_heads=r.get("num_key_value_heads") or h,
                           head_dim=head_dim, rope=rope, qkv_bias=bool(bias),
                           o_bias=bool(bias) and mt == "llama", window=window or None)
    mpe = r.get("max_position_embeddings")
    max_len = int(mpe * rope.factor) if rope.scaling == "dynamic" else mpe
    return attn, max_len


def check_common(r: ConfigReader) -> None:
    r.require("hidden_act", ("silu",), "silu")
    r.require("mlp_bias", (False,), False)
    r.require("router_jitter_noise", (0.0, 0), 0.0)


def config_from_hf(hf: dict) -> ModelConfig:
    r = ConfigReader(hf, hf["model_type"])
    check_common(r)
    attn, max_len = attention_from_hf(r)
    ffn = FFNConfig(activation="swiglu", hidden=r.get("intermediate_size"))
    cfg = ModelConfig(name=f"hf_{r.model_type}", vocab_size=r.get("vocab_size"),
                      d_model=r.get("hidden_size"), n_layers=r.get("num_hidden_layers"),
                      pattern=(BlockSpec(mixer=attn, ffn=ffn),), norm="rmsnorm",
                      norm_eps=r.get("rms_norm_eps"),
                      tie_embeddings=r.get("tie_word_embeddings", False), max_len=max_len)
    r.finish()
    return cfg


def attention_to_hf(cfg: ModelConfig, attn: AttentionConfig, model_type: str) -> dict:
    rope = attn.rope
    mpe = rope.original_max_len if rope.scaling == "dynamic" else cfg.max_len
    out = {"model_type": model_type, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": attn.n_heads, "num_key_value_heads": attn.kv_heads,
           "head_dim": attn.head_dim_for(cfg.d_model), "max_position_embeddings": mpe,
           "rms_norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size,
           "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
           "rope_parameters": common.rope_to_hf(rope)}
    if model_type == "llama":
        out.update(attention_bias=attn.qkv_bias, mlp_bias=False)
    if model_type in ("mistral", "mixtral"):
        out["sliding_window"] = attn.window
    return out


def config_to_hf(cfg: ModelConfig) -> dict:
    spec = cfg.pattern[0]
    out = attention_to_hf(cfg, spec.mixer, cfg.name.removeprefix("hf_"))
    out["intermediate_size"] = spec.ffn.hidden_dim(cfg.d_model)
    return out


def embed_entries(cfg: ModelConfig, prefix: str = "model.", final: str = "norm") -> list:
    out = [common.copy(f"{prefix}embed_tokens.weight", ("embed", "table")),
           common.copy(f"{prefix}{final}.weight", ("final_norm", "scale"))]
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", ("head", "kernel")))
    return out


def attention_entries(cfg: ModelConfig, layer: int, attn: AttentionConfig, hf: str) -> list:
    """q/k/v/o of layer ``layer`` (HF prefix ``hf``, e.g. ``model.layers.0.self_attn.``)."""
    dh = attn.head_dim_for(cfg.d_model)
    at = lambda name: layer_path(cfg, layer, "mixer", name)
    out = []
    for name, n in (("q", attn.n_heads), ("k", attn.kv_heads), ("v", attn.kv_heads)):
        out.append(heads_in(f"{hf}{name}_proj.weight", *at(name), n, dh))
        if attn.qkv_bias:
            out.append(heads_bias(f"{hf}{name}_proj.bias", *at(f"{name}_bias"), n, dh))
    out.append(heads_out(f"{hf}o_proj.weight", *at("o"), attn.n_heads, dh))
    if attn.o_bias:
        out.append(common.copy(f"{hf}o_proj.bias", *at("o_bias")))
    return out


def swiglu_entries(cfg: ModelConfig, layer: int, hf: str, where=("ffn",)) -> list:
    at = lambda name: layer_path(cfg, layer, *where, name, "kernel")
    return [linear(f"{hf}gate_proj.weight", *at("wi")), linear(f"{hf}up_proj.weight", *at("wg")),
            linear(f"{hf}down_proj.weight", *at("wo"))]


def norm_entry(cfg: ModelConfig, layer: int, hf: str, name: str) -> common.Entry:
    return common.copy(hf, *layer_path(cfg, layer, name, "scale"))


def tensor_map(cfg: ModelConfig) -> list:
    out = embed_entries(cfg)
    for l in range(cfg.n_layers):
        p = f"model.layers.{l}."
        out += attention_entries(cfg, l, cfg.pattern[l % len(cfg.pattern)].mixer, p + "self_attn.")
        out += swiglu_entries(cfg, l, p + "mlp.")
        out += [norm_entry(cfg, l, p + "input_layernorm.weight", "mixer_norm"),
                norm_entry(cfg, l, p + "post_attention_layernorm.weight", "ffn_norm")]
    return out
