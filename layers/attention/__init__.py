"""The attention family: softmax attention and its implementations, the block-sparse
engine, local / sliding-window / Longformer / BigBird, strided (Child et al.),
hierarchical, routed, Linformer, Transformer-XL and TransNormer (docs/design.md).

=====================  ==========================================================
module                 what it holds
=====================  ==========================================================
softmax                ``AttentionConfig``, the ``Attention`` module, ``KVCache``,
                       the ``attn_impl`` switch (dense / blockwise / kernels)
blockwise              pure-JAX FlashAttention (band of key blocks on the engine)
block_sparse           the block-sparse engine (online softmax, custom VJP)
block_sparse_reference its dense reference; ``masked_attention`` (decode paths)
sparse                 ``SparseAttentionConfig``, the base of the pattern mixers
local                  sliding window (ring-buffer cache), Longformer, BigBird
strided                Sparse Transformer strided / fixed patterns
hierarchical           fine in-block + coarse block-summary attention
routed                 content-routed top-k block attention (MoBA / NSA selection)
linformer              length-projected keys/values (encoder only)
mla                    multi-head latent attention (DeepSeek-V2/V3), absorbed decode
transformer_xl         segment recurrence with relative positions
transnormer            block softmax + normed linear attention across blocks
=====================  ==========================================================
"""

from layers.attention.hierarchical import HierarchicalConfig
from layers.attention.linformer import LinformerConfig
from layers.attention.local import BigBirdConfig, LongformerConfig, SlidingWindowConfig
from layers.attention.mla import MLACache, MLAConfig
from layers.attention.routed import RoutedAttentionConfig
from layers.attention.softmax import ATTN_IMPLS, AttentionConfig, KVCache
from layers.attention.sparse import SparseAttentionConfig
from layers.attention.strided import SparseTransformerConfig
from layers.attention.transformer_xl import TransformerXLConfig
from layers.attention.transnormer import TransNormerConfig

CONFIGS = (AttentionConfig, SlidingWindowConfig, LongformerConfig, BigBirdConfig,
           SparseTransformerConfig, LinformerConfig, HierarchicalConfig, RoutedAttentionConfig,
           TransformerXLConfig, TransNormerConfig, MLAConfig)

__all__ = ["ATTN_IMPLS", "AttentionConfig", "BigBirdConfig", "CONFIGS", "HierarchicalConfig",
           "KVCache", "LinformerConfig", "LongformerConfig", "MLACache", "MLAConfig",
           "RoutedAttentionConfig",
           "SlidingWindowConfig", "SparseAttentionConfig", "SparseTransformerConfig",
           "TransNormerConfig", "TransformerXLConfig"]
