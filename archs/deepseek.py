"""DeepSeek-V3 (DeepSeek-AI 2024): multi-head latent attention (layers/attention/mla.py)
with a DeepSeekMoE FFN (layers/moe/layer.py) in every layer after the first
``first_k_dense`` dense SwiGLU layers.

The MoE is V3's: sigmoid affinities, the aux-loss-free selection bias (state
collection), pool-limited routing (V3's "group-limited": each token routes into its
``topk_pools`` best of ``n_expert_pools`` pools, a pool scored by its top-2 experts),
the selected weights renormalized to sum 1 then scaled by ``routed_scaling`` (2.5),
one always-on shared expert of the routed width, the sequence-wise balance loss (1e-4)
and dropless dispatch. Norms are RMSNorm with eps 1e-6 (MLA's inner latent norms too);
the head is untied.

First-k dense layers: the stack's ``pattern`` must repeat (archs/config.py), and a
non-repeating prefix of dense layers is not a repeat of anything, so the pattern is the
whole stack (``first_k_dense`` dense blocks then the MoE blocks; ``n_repeats = 1``).
This is exactly V3's layer sequence; the cost is that ``nn.scan`` no longer shortens
compilation (it grows with depth). With ``first_k_dense = 0`` the pattern is one block.

Sizes (:class:`DeepSeekSize`): ``tiny`` (tests, < 1M parameters), ``small`` (CPU
experiments) and ``671b``, the published shape (D 7168, 61 layers of which 3 dense
with FFN width 18432, 128 heads, q_lora 1536, kv_lora 512, qk_nope 128, qk_rope 64,
v 128, 256 routed experts of width 2048, top-8, 1 shared expert, 8 pools top-4,
routed scaling 2.5, V 129280, YaRN factor 40 over 4096 positions with
``mscale = mscale_all_dim = 1``): build it abstractly with ``jax.eval_shape``.
"""

from __future__ import annotations

import dataclasses

from archs.config import BlockSpec, ModelConfig
from layers.attention import MLAConfig
from layers.ffn import FFNConfig
from layers.moe import MoEConfig
from layers.positions import RopeConfig


@dataclasses.dataclass(frozen=True)
class DeepSeekSize:
    d_model: int
    n_layers: int
    first_k_dense: int            # leading dense-FFN layers
    dense_hidden: int             # their SwiGLU width
    n_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_experts: int                # routed experts
    expert_hidden: int            # width of one routed (and the shared) expert
    top_k: int
    n_shared: int
    n_expert_pools: int
    topk_pools: int
    vocab_size: int
    max_len: int
    rope: RopeConfig = RopeConfig()
    mscale_all_dim: float = 0.0
    dtype: str = "float32"


SIZES = {
    "tiny": DeepSeekSize(d_model=64, n_layers=2, first_k_dense=1, dense_hidden=128, n_heads=4,
                         q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                         qk_rope_head_dim=8, v_head_dim=16, n_experts=8, expert_hidden=32,
                         top_k=2, n_shared=1, n_expert_pools=4, topk_pools=2, vocab_size=256,
                         max_len=1024),
    "small": DeepSeekSize(d_model=128, n_layers=4, first_k_dense=1, dense_hidden=256, n_heads=4,
                          q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                          qk_rope_head_dim=16, v_head_dim=32, n_experts=16, expert_hidden=32,
                          top_k=4, n_shared=1, n_expert_pools=4, topk_pools=2, vocab_size=512,
                          max_len=4096),
    "671b": DeepSeekSize(d_model=7168, n_layers=61, first_k_dense=3, dense_hidden=18432,
                         n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                         qk_rope_head_dim=64, v_head_dim=128, n_experts=256, expert_hidden=2048,
                         top_k=8, n_shared=1, n_expert_pools=8, topk_pools=4,
                         vocab_size=129280, max_len=163840,
                         rope=RopeConfig(base=10000.0, scaling="yarn", factor=40.0,
                                         original_max_len=4096, beta_fast=32.0, beta_slow=1.0,
                                         attention_factor=1.0),
                         mscale_all_dim=1.0, dtype="bfloat16"),
}


def deepseek_pattern(first_k_dense: int, n_layers: int, mixer, dense_ffn, moe_ffn
                     ) -> tuple[BlockSpec, ...]:
    """The stack's blocks: ``first_k_dense`` dense blocks then MoE blocks (the whole stack
    as the pattern; one MoE block when there is no dense prefix)."""
    if first_k_dense == 0:
        return (BlockSpec(mixer=mixer, ffn=moe_ffn),)
    return tuple(BlockSpec(mixer=mixer, ffn=dense_ffn if i < first_k_dense else moe_ffn)
                 for i in range(n_layers))


def deepseek_v3(size: str = "small") -> ModelConfig:
    s = SIZES[size]
    mla = MLAConfig(n_heads=s.n_heads, q_lora_rank=s.q_lora_rank, kv_lora_rank=s.kv_lora_rank,
                    qk_nope_head_dim=s.qk_nope_head_dim, qk_rope_head_dim=s.qk_rope_head_dim,
                    v_head_dim=s.v_head_dim, rope=s.rope, mscale_all_dim=s.mscale_all_dim)
    dense_ffn = FFNConfig(activation="swiglu", hidden=s.dense_hidden)
    moe = MoEConfig(n_experts=s.n_experts, top_k=s.top_k, hidden=s.expert_hidden,
                    n_shared=s.n_shared, score="sigmoid", renormalize=True, routed_scaling=2.5,
                    n_expert_pools=s.n_expert_pools, topk_pools=s.topk_pools,
                    aux_free_bias=True, bias_rate=1e-3, seq_balance_coef=1e-4,
                    dispatch="dropless")
    return ModelConfig(name="deepseek_v3", vocab_size=s.vocab_size, d_model=s.d_model,
                       n_layers=s.n_layers,
                       pattern=deepseek_pattern(s.first_k_dense, s.n_layers, mla, dense_ffn, moe),
                       norm="rmsnorm", norm_eps=1e-6, tie_embeddings=False,
                       max_len=s.max_len, dtype=s.dtype)


PRESETS = {"deepseek_v3": (deepseek_v3, tuple(SIZES))}
