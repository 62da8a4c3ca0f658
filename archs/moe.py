"""Mixture-of-Experts decoders: Llama-3 attention blocks whose FFN is a MoE
(layers/moe/layer.py).

* ``mixtral`` (Jiang et al. 2024): 8 experts, top-2 softmax renormalized over the
  selected two; dropless dispatch (Mixtral is served and trained dropless).
* ``switch`` (Fedus et al. 2021): top-1 with capacity factor 1.25, priority dropping,
  Switch load-balancing loss (0.01). SwiGLU experts (the paper used ReLU MLPs).
* ``deepseek_moe`` (DeepSeekMoE, Dai et al. 2024; DeepSeek-V3 routing, 2024): 4-way
  fine-grained experts plus one always-on shared expert; sigmoid affinities with the
  aux-loss-free selection bias (state collection, updated by the train loop), pool-
  limited routing (V3's "group-limited" routing: each token routes into its top-2 of 4
  expert pools), selected weights normalized then scaled by 2.5, and V3's tiny
  sequence-wise balance loss (1e-4).
* ``qwen_moe`` (Qwen1.5-MoE / Qwen2-MoE): 2-way fine-grained experts, softmax top-k
  WITHOUT renormalization, a shared expert (4 fine experts wide) behind a sigmoid gate,
  load-balancing loss 1e-3.
* ``jamba`` (Lieber et al. 2024): Jamba blocks of 8 layers, Mamba mixers
  (layers/recurrent/mamba.py, with Jamba's RMS norms on Delta/B/C after ``x_proj``) with
  one attention layer (a:m = 1:7, attention at index 4 of the block, no positional
  encoding); the FFN is a MoE (16 experts, top-2 softmax NOT renormalized, dropless,
  aux loss 1e-3) every other layer (e = 2) and a dense SwiGLU otherwise. Scaled down:
  8 experts of width ``expert_hidden / 2``, and one 8-layer Jamba block in both sizes
  (so ``tiny`` has 8 layers).

Sizes (:class:`MoESize`) follow archs/llama.py: ``tiny`` (tests, < 1M params) and
``small`` (CPU experiments, about 2M params, vocab 512). Within one size the four
attention presets have the same total routed expert width (8 coarse experts of width
``expert_hidden``, split 1-, 2- or 4-way), so they differ in routing and granularity
(plus the shared experts).
"""

from __future__ import annotations

import dataclasses

from archs.config import BlockSpec, ModelConfig
from layers.attention import AttentionConfig
from layers.ffn import FFNConfig
from layers.moe import MoEConfig
from layers.positions import RopeConfig
from layers.recurrent.mamba import MambaConfig


@dataclasses.dataclass(frozen=True)
class MoESize:
    d_model: int
    n_layers: int                 # attention presets (jamba: always one 8-layer Jamba block)
    n_heads: int
    n_kv_heads: int
    expert_hidden: int            # width of a coarse expert (jamba: twice its expert width)
    vocab_size: int
    max_len: int


SIZES = {
    "tiny": MoESize(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, expert_hidden=96,
                    vocab_size=256, max_len=1024),
    "small": MoESize(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, expert_hidden=128,
                     vocab_size=512, max_len=4096),
}


def _model(name: str, s: MoESize, moe: MoEConfig) -> ModelConfig:
    attn = AttentionConfig(n_heads=s.n_heads, n_kv_heads=s.n_kv_heads,
                           rope=RopeConfig(base=500000.0))
    return ModelConfig(name=name, vocab_size=s.vocab_size, d_model=s.d_model, n_layers=s.n_layers,
                       pattern=(BlockSpec(mixer=attn, ffn=moe),), norm="rmsnorm", norm_eps=1e-5,
                       tie_embeddings=True, max_len=s.max_len)


def mixtral(size: str = "small") -> ModelConfig:
    s = SIZES[size]
    moe = MoEConfig(n_experts=8, top_k=2, hidden=s.expert_hidden, renormalize=True,
                    dispatch="dropless", load_balance_coef=0.01)
    return _model("mixtral", s, moe)


def switch(size: str = "small") -> ModelConfig:
    s = SIZES[size]
    moe = MoEConfig(n_experts=8, top_k=1, hidden=s.expert_hidden, dispatch="capacity",
                    capacity_factor=1.25, priority="position", load_balance_coef=0.01)
    return _model("switch", s, moe)


def deepseek_moe(size: str = "small") -> ModelConfig:
    s = SIZES[size]
    moe = MoEConfig(n_experts=8, top_k=2, granularity=4, hidden=s.expert_hidden, n_shared=1,
                    score="sigmoid", renormalize=True, routed_scaling=2.5, n_expert_pools=4,
                    topk_pools=2, aux_free_bias=True, bias_rate=1e-3, seq_balance_coef=1e-4,
                    dispatch="dropless")
    return _model("deepseek_moe", s, moe)


def qwen_moe(size: str = "small") -> ModelConfig:
    s = SIZES[size]
    moe = MoEConfig(n_experts=8, top_k=2, granularity=2, hidden=s.expert_hidden,
                    shared_hidden=2 * s.expert_hidden, shared_gate=True, score="softmax",
                    renormalize=False, dispatch="dropless", load_balance_coef=1e-3)
    return _model("qwen_moe", s, moe)


def jamba(size: str = "small") -> ModelConfig:
    s = SIZES[size]
    attn = AttentionConfig(n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, position="none")
    moe = MoEConfig(n_experts=8, top_k=2, hidden=s.expert_hidden // 2, dispatch="dropless",
                    renormalize=False, load_balance_coef=1e-3)
    ffn = FFNConfig(activation="swiglu", multiple_of=16)
    mamba = MambaConfig(dt_bc_norm=True)
    pattern = tuple(BlockSpec(mixer=attn if i == 4 else mamba,
                              ffn=moe if i % 2 else ffn) for i in range(8))
    return ModelConfig(name="jamba", vocab_size=s.vocab_size, d_model=s.d_model, n_layers=8,
                       pattern=pattern, norm="rmsnorm", norm_eps=1e-6, tie_embeddings=True,
                       max_len=s.max_len)


PRESETS = {
    "mixtral": (mixtral, tuple(SIZES)),
    "switch": (switch, tuple(SIZES)),
    "deepseek_moe": (deepseek_moe, tuple(SIZES)),
    "qwen_moe": (qwen_moe, tuple(SIZES)),
    "jamba": (jamba, tuple(SIZES)),
}
