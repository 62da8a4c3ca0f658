"""Mixture-of-Experts decoders: Llama-3 attention blocks whose FFN is a MoE (layers/moe.py).

* ``mixtral`` (Jiang et al. 2024): 8 experts, top-2 softmax renormalized over the
  selected two; dropless dispatch (Mixtral is served and trained dropless).
* ``switch`` (Fedus et al. 2021): top-1 with capacity factor 1.25, priority dropping,
  Switch load-balancing loss (0.01). SwiGLU experts (the paper used ReLU MLPs).
* ``deepseek_moe`` (DeepSeekMoE, Dai et al. 2024; DeepSeek-V3 routing, 2024): 4-way
  fine-grained experts plus one always-on shared expert; sigmoid affinities with the
  aux-loss-free selection bias (state collection, updated by the train loop), group-
  limited routing (top-2 of 4 expert groups), selected weights normalized then scaled
  by 2.5, and V3's tiny sequence-wise balance loss (1e-4).
* ``qwen_moe`` (Qwen1.5-MoE / Qwen2-MoE): 2-way fine-grained experts, softmax top-k
  WITHOUT renormalization, a shared expert (4 fine experts wide) behind a sigmoid gate,
  load-balancing loss 1e-3.
* ``jamba`` (Lieber et al. 2024): groups of 8 layers, Mamba mixers with one attention
  layer (a:m = 1:7, attention at index 4 of the group, no positional encoding); the FFN
  is a MoE (16 experts, top-2, dropless, aux loss 1e-3) every other layer (e = 2) and a
  dense SwiGLU otherwise. Scaled down: 8 experts of width F / 2, and one 8-layer group
  in both sizes (so ``tiny`` has 8 layers).

Sizes follow archs/llama.py: ``tiny`` (tests, < 1M params) and ``small`` (CPU
experiments, about 2M params, vocab 512). Within one size the four attention presets
have the same total routed expert width (8 coarse experts of width F, split 1-, 2- or
4-way), so they differ in routing and granularity (plus the shared experts).
"""

from __future__ import annotations

from archs.config import BlockSpec, ModelConfig
from layers.attention import AttentionConfig
from layers.ffn import FFNConfig
from layers.mamba import MambaConfig
from layers.moe import MoEConfig
from layers.positions import RopeConfig

SIZES = {
    #        d_model, layers, heads, kv_heads, expert width, vocab, max_len
    "tiny": (64, 2, 4, 2, 96, 256, 1024),
    "small": (128, 4, 4, 2, 128, 512, 4096),
}


def _model(name: str, size: str, moe: MoEConfig) -> ModelConfig:
    d, n_layers, h, kh, _, vocab, max_len = SIZES[size]
    attn = AttentionConfig(n_heads=h, n_kv_heads=kh, rope=RopeConfig(base=500000.0))
    return ModelConfig(name=name, vocab_size=vocab, d_model=d, n_layers=n_layers,
                       pattern=(BlockSpec(mixer=attn, ffn=moe),), norm="rmsnorm", norm_eps=1e-5,
                       tie_embeddings=True, max_len=max_len)


def _width(size: str) -> int:
    return SIZES[size][4]


def mixtral(size: str = "small", **_) -> ModelConfig:
    moe = MoEConfig(n_experts=8, top_k=2, hidden=_width(size), renormalize=True,
                    dispatch="dropless", load_balance_coef=0.01)
    return _model("mixtral", size, moe)


def switch(size: str = "small", **_) -> ModelConfig:
    moe = MoEConfig(n_experts=8, top_k=1, hidden=_width(size), dispatch="capacity",
                    capacity_factor=1.25, priority="position", load_balance_coef=0.01)
    return _model("switch", size, moe)


def deepseek_moe(size: str = "small", **_) -> ModelConfig:
    moe = MoEConfig(n_experts=8, top_k=2, granularity=4, hidden=_width(size), n_shared=1,
                    score="sigmoid", renormalize=True, routed_scaling=2.5, n_groups=4,
                    topk_groups=2, aux_free_bias=True, bias_rate=1e-3, seq_balance_coef=1e-4,
                    dispatch="dropless")
    return _model("deepseek_moe", size, moe)


def qwen_moe(size: str = "small", **_) -> ModelConfig:
    w = _width(size)
    moe = MoEConfig(n_experts=8, top_k=2, granularity=2, hidden=w, shared_hidden=2 * w,
                    shared_gate=True, score="softmax", renormalize=False, dispatch="dropless",
                    load_balance_coef=1e-3)
    return _model("qwen_moe", size, moe)


def jamba(size: str = "small", **_) -> ModelConfig:
    d, _, h, kh, w, vocab, max_len = SIZES[size]
    attn = AttentionConfig(n_heads=h, n_kv_heads=kh, position="none")
    moe = MoEConfig(n_experts=8, top_k=2, hidden=w // 2, dispatch="dropless",
                    load_balance_coef=1e-3)
    ffn = FFNConfig(activation="swiglu", multiple_of=16)
    pattern = tuple(BlockSpec(mixer=attn if i == 4 else MambaConfig(),
                              ffn=moe if i % 2 else ffn) for i in range(8))
    return ModelConfig(name="jamba", vocab_size=vocab, d_model=d, n_layers=8, pattern=pattern,
                       norm="rmsnorm", norm_eps=1e-6, tie_embeddings=True, max_len=max_len)


PRESETS = {
    "mixtral": (mixtral, ("tiny", "small")),
    "switch": (switch, ("tiny", "small")),
    "deepseek_moe": (deepseek_moe, ("tiny", "small")),
    "qwen_moe": (qwen_moe, ("tiny", "small")),
    "jamba": (jamba, ("tiny", "small")),
}
