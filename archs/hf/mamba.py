"""HF ``mamba`` and ``mamba2``: ``backbone.*`` stacks of Mamba / Mamba-2 mixers with
RMSNorm and a (tied) head; see archs/hf/common.py for the mapping contract."""

from __future__ import annotations

import math

from archs.config import BlockSpec, ModelConfig
from archs.hf.common import ConfigReader, Entry, copy, layer_path, linear
from layers.recurrent.mamba import MambaConfig
from layers.recurrent.mamba2 import Mamba2Config

MODEL_TYPES = ("mamba", "mamba2")
# Keys that only affect initialization or which kernel computes the same function.
_INIT_ONLY = ("time_step_floor", "time_step_max", "time_step_min", "time_step_init_scheme",
              "time_step_scale", "rescale_prenorm_residual", "residual_in_fp32",
              "use_associative_scan", "use_mambapy", "use_mamba_kernels")


def conv_entries(cfg: ModelConfig, layer: int, hf: str, where: str = "mixer") -> list:
    """torch depthwise conv1d ``[C, 1, K]`` (+ bias) <-> ``conv_kernel [K, C]``, ``conv_bias``."""
    path, idx = layer_path(cfg, layer, where, "conv_kernel")
    return [Entry(f"{hf}conv1d.weight", path, idx, lambda w: w[:, 0, :].T, lambda w: w.T[:, None, :]),
            copy(f"{hf}conv1d.bias", *layer_path(cfg, layer, where, "conv_bias"))]


def mamba_entries(cfg: ModelConfig, layer: int, m: MambaConfig, hf: str) -> list:
    at = lambda *name: layer_path(cfg, layer, "mixer", *name)
    out = conv_entries(cfg, layer, hf)
    for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
        out.append(linear(f"{hf}{name}.weight", *at(name, "kernel")))
    out += [copy(f"{hf}dt_proj.bias", *at("dt_proj", "bias")),
            copy(f"{hf}A_log", *at("A_log")), copy(f"{hf}D", *at("D"))]
    if m.proj_bias:
        out += [copy(f"{hf}in_proj.bias", *at("in_proj", "bias")),
                copy(f"{hf}out_proj.bias", *at("out_proj", "bias"))]
    if m.dt_bc_norm:
        out += [copy(f"{hf}{h}_layernorm.weight", *at(f"{a}_norm", "scale"))
                for h, a in (("dt", "dt"), ("b", "b"), ("c", "c"))]
    return out


def _mamba2_entries(cfg: ModelConfig, layer: int, hf: str) -> list:
    at = lambda *name: layer_path(cfg, layer, "mixer", *name)
    return conv_entries(cfg, layer, hf) + [
        linear(f"{hf}in_proj.weight", *at("in_proj", "kernel")),
        linear(f"{hf}out_proj.weight", *at("out_proj", "kernel")),
        copy(f"{hf}A_log", *at("A_log")), copy(f"{hf}D", *at("D")),
        copy(f"{hf}dt_bias", *at("dt_bias")), copy(f"{hf}norm.weight", *at("norm_scale"))]


def _mixer_from_hf(r: ConfigReader, d: int):
    expand = r.get("expand")
    if r.model_type == "mamba":
        r.require("intermediate_size", (expand * d,), expand * d)
        return MambaConfig(d_state=r.get("state_size"), d_conv=r.get("conv_kernel"), expand=expand,
                           dt_rank=r.get("time_step_rank"), proj_bias=bool(r.get("use_bias", False)))
    r.require("use_bias", (False,), False)
    limit = tuple(r.get("time_step_limit", (0.0, math.inf)))
    if limit != (0.0, math.inf):
        raise ValueError(f"mamba2 config field 'time_step_limit'={list(limit)} is not supported; "
                         "allowed: [0.0, Infinity] (no clamp)")
    heads, head_dim = r.get("num_heads"), r.get("head_dim")
    if heads * head_dim != expand * d:
        raise ValueError(f"mamba2 config fields 'num_heads'={heads} x 'head_dim'={head_dim} must "
                         f"equal expand x hidden_size = {expand * d}")
    r.get("time_step_rank"), r.get("intermediate_size")
    return Mamba2Config(d_state=r.get("state_size"), d_conv=r.get("conv_kernel"), expand=expand,
                        head_dim=head_dim, n_bc_heads=r.get("n_groups", 1),
                        norm_eps=r.get("layer_norm_epsilon"), chunk=r.get("chunk_size", 64))


def config_from_hf(hf: dict) -> ModelConfig:
    r = ConfigReader(hf, hf["model_type"])
    r.require("hidden_act", ("silu",), "silu")
    r.require("use_conv_bias", (True,), True)
    for key in _INIT_ONLY:
        r.get(key)
    d = r.get("hidden_size")
    cfg = ModelConfig(name=f"hf_{r.model_type}", vocab_size=r.get("vocab_size"), d_model=d,
                      n_layers=r.get("num_hidden_layers"),
                      pattern=(BlockSpec(mixer=_mixer_from_hf(r, d), ffn=None),), norm="rmsnorm",
                      norm_eps=r.get("layer_norm_epsilon"),
                      tie_embeddings=r.get("tie_word_embeddings", True),
                      max_len=int(r.get("max_position_embeddings", 1 << 20)))
    r.finish()
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict:
    m, d = cfg.pattern[0].mixer, cfg.d_model
    out = {"model_type": cfg.name.removeprefix("hf_"), "hidden_size": d, "vocab_size": cfg.vocab_size,
           "num_hidden_layers": cfg.n_layers, "layer_norm_epsilon": cfg.norm_eps,
           "tie_word_embeddings": cfg.tie_embeddings, "state_size": m.d_state,
           "conv_kernel": m.d_conv, "expand": m.expand, "intermediate_size": m.expand * d,
           "hidden_act": "silu", "use_conv_bias": True, "max_position_embeddings": cfg.max_len}
    if isinstance(m, MambaConfig):
        out.update(time_step_rank=m.rank(d), use_bias=m.proj_bias)
    else:
        out.update(num_heads=m.heads(d), head_dim=m.head_dim, n_groups=m.n_bc_heads,
                   chunk_size=m.chunk, use_bias=False, time_step_limit=[0.0, math.inf])
    return out


def tensor_map(cfg: ModelConfig) -> list:
    out = [copy("backbone.embeddings.weight", ("embed", "table")),
           copy("backbone.norm_f.weight", ("final_norm", "scale"))]
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", ("head", "kernel")))
    for l in range(cfg.n_layers):
        p, m = f"backbone.layers.{l}.", cfg.pattern[l % len(cfg.pattern)].mixer
        out.append(copy(p + "norm.weight", *layer_path(cfg, l, "mixer_norm", "scale")))
        out += (mamba_entries(cfg, l, m, p + "mixer.") if isinstance(m, MambaConfig)
                else _mamba2_entries(cfg, l, p + "mixer."))
    return out
