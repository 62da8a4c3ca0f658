"""The base of the block-sparse pattern mixers (Longformer, BigBird, Sparse Transformer,
hierarchical, routed, TransNormer's local part).

Each is multi-head (GQA-capable) softmax attention whose training / prefill path calls
``layers.attention.block_sparse.block_sparse_attention`` with its pattern's list of key
blocks per query block, so FLOPs and memory are ``O(T * keys per query)`` and no
``T x T`` score matrix or mask is formed. The module is ``layers.attention.softmax.Attention``
(same q/k/v/o parameters as plain attention); a pattern supplies ``attend`` and either
``visible`` (its explicit causal mask on flat positions) or its own ``decode_attend``.

Decoding (a call with ``cache=``, causal only) is dense over the full KV cache under the
pattern's explicit mask, O(context) per token (``masked_attention``). Positions for
RoPE/xPos come from ``positions``; the pattern itself (windows, blocks) lives on flat
indices.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from layers.attention.block_sparse_reference import masked_attention
from layers.attention.softmax import AttentionBase
from layers.typing import Array


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig(AttentionBase):
    """Shared fields of the block-sparse mixers (an abstract base: no ``kind``)."""
    block_q: int = 64
    block_k: int = 64
    query_chunk: int | None = 512

    def visible(self, q_pos: Array, k_pos: Array) -> Array:
        """Explicit causal-pattern mask [T, S] (or [K, T, S]) for flat positions (decode)."""
        raise NotImplementedError

    def decode_attend(self, q, ck, cv, q_offset, kv_len, slopes):
        q_pos = q_offset + jnp.arange(q.shape[1])
        k_pos = jnp.arange(ck.shape[1])
        mask = self.visible(q_pos, k_pos) & (k_pos < kv_len)
        return masked_attention(q, ck, cv, mask, slopes, q_pos, k_pos)
