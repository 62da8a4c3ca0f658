"""Content-routed sparse attention: top-k key-block selection per query token
(MoBA, Lu et al. 2025; the selection branch of NSA, Yuan et al. 2025), causal.

Keys are cut into blocks of ``block_k``; each block is summarized by its mean key
``kbar_j``. Query token ``t`` of kv head ``k`` scores the blocks that ended before its
own block, ``r[t, j] = sum_g q[t, k, g] . kbar_j[k]`` (the G query heads of a kv head
share one selection, as in NSA, so a kv head's blocks are gathered once),
and attends, with one softmax, to

* its own block, causally (always included: ``s <= t``, ``s // block_k == t // block_k``);
* the ``top_k`` highest-scoring earlier blocks (future blocks are never candidates).

Selection is discrete (no gradient through ``r``); gradients flow through the
attention over the selected blocks. The attention runs on the block-sparse engine
with one query per "block" (``block_q = 1``, lists ``[B, K, T, 1 + top_k]``), so
attention work is ``O(T * (top_k + 1) * block_k)``; the scoring is ``O(T^2 / block_k)``
(as in MoBA/NSA), a small term at practical lengths. With packed sequences only
blocks lying wholly inside the query's segment are candidates, so routing never
reads another segment. Decoding is dense over the KV cache: the same scores are
computed from the cached keys and the selected blocks become the mask.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from layers.attention.block_sparse import Band, block_sparse_attention
from layers.attention.block_sparse_reference import masked_attention
from layers.attention.sparse import SparseAttentionConfig
from layers.contracts import positive
from layers.typing import Array


def block_means(k: Array, bk: int) -> Array:
    """k [B, S, K, Dh] -> mean key per block [B, ceil(S / bk), K, Dh] (fp32)."""
    b, s, kh, dh = k.shape
    nk = -(-s // bk)
    kp = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, nk * bk - s), (0, 0), (0, 0)))
    return kp.reshape(b, nk, bk, kh, dh).mean(2)


def route(q: Array, kbar: Array, q_pos: Array, top_k: int, bk: int, seg_ok: Array | None = None):
    """Top-k earlier key blocks per query token and kv head.

    q: [B, T, H, Dh]; kbar: [B, nk, K, Dh]; q_pos: [T] flat positions.
    seg_ok: optional bool [B, T, nk] (block j lies in t's segment).
    Returns (idx, valid): int32 / bool [B, K, T, top_k].
    """
    b, t, h, dh = q.shape
    nk, kh = kbar.shape[1], kbar.shape[2]
    qg = jax.lax.stop_gradient(q).astype(jnp.float32).reshape(b, t, kh, h // kh, dh).sum(3)
    r = jnp.einsum("btkd,bjkd->bktj", qg, jax.lax.stop_gradient(kbar))
    cand = jnp.arange(nk)[None, :] < (q_pos // bk)[:, None]          # [T, nk] wholly earlier blocks
    cand = cand[None, None] if seg_ok is None else cand[None, None] & seg_ok[:, None]
    r = jnp.where(cand, r, -jnp.inf)
    kk = min(top_k, nk)
    _, idx = jax.lax.top_k(r, kk)
    valid = jnp.take_along_axis(jnp.broadcast_to(cand, r.shape), idx, axis=-1)
    if kk < top_k:
        pad = ((0, 0), (0, 0), (0, 0), (0, top_k - kk))
        idx, valid = jnp.pad(idx, pad), jnp.pad(valid, pad)
    return idx.astype(jnp.int32), valid


def routed_attention(q: Array, k: Array, v: Array, *, top_k: int, block_k: int,
                     segment_ids: Array | None = None, alibi_slopes: Array | None = None,
                     query_chunk: int | None = 128, unroll=1) -> Array:
    """Causal routed attention (training / prefill). q: [B, T, H, Dh]; k, v: [B, T, K, Dh]."""
    b, t = q.shape[:2]
    bk = block_k
    kbar = block_means(k, bk)
    nk = kbar.shape[1]
    pos = jnp.arange(t)
    seg_ok = None
    if segment_ids is not None:  # block j usable by t iff its first and last token share t's segment
        sp = jnp.pad(segment_ids, ((0, 0), (0, nk * bk - t)), constant_values=-1)
        first, last = sp[:, ::bk], sp[:, bk - 1::bk]
        seg_ok = (first[:, None, :] == segment_ids[:, :, None]) & (last[:, None, :] == segment_ids[:, :, None])
    idx, valid = route(q, kbar, pos, top_k, bk, seg_ok)
    own = jnp.broadcast_to((pos // bk)[None, None, :, None], (b, k.shape[2], t, 1))
    lists = jnp.concatenate([own, idx], -1)
    valid = jnp.concatenate([jnp.ones_like(own, bool), valid], -1)
    full = jnp.concatenate([jnp.zeros_like(own, bool), valid[..., 1:]], -1)
    return block_sparse_attention(q, k, v, lists, valid, kv_full=full, rule=Band(True, None),
                                  segment_ids=segment_ids, alibi_slopes=alibi_slopes,
                                  block_q=1, block_k=bk, query_chunk=query_chunk, unroll=unroll)


@dataclasses.dataclass(frozen=True)
class RoutedAttentionConfig(SparseAttentionConfig):
    """Causal top-k block-routed attention; ``block_k`` is the routing block size and
    ``query_chunk`` the number of query tokens the engine processes together."""
    kind: ClassVar[str] = "routed"
    top_k: int = 4
    block_k: int = 32
    query_chunk: int | None = 128

    def validate(self, d_model, path="mixer"):
        super().validate(d_model, path)
        positive(f"{path}.top_k", self.top_k)
        if not self.causal:
            raise ValueError(f"{path}.causal=False: routed attention is defined causally (own block "
                             "causal, earlier blocks routed); use longformer/bigbird for encoders")

    def attend(self, q, k, v, segment_ids, slopes, *, unroll=1):
        return routed_attention(q, k, v, top_k=self.top_k, block_k=self.block_k,
                                segment_ids=segment_ids, alibi_slopes=slopes,
                                query_chunk=self.query_chunk, unroll=unroll)

    def decode_attend(self, q, ck, cv, q_offset, kv_len, slopes):
        bk = self.block_k
        q_pos = q_offset + jnp.arange(q.shape[1])
        idx, valid = route(q, block_means(ck, bk), q_pos, self.top_k, bk)   # [B, K, T, top_k]
        k_pos = jnp.arange(ck.shape[1])
        kb = k_pos // bk
        sel = jnp.any((idx[..., None] == kb) & valid[..., None], axis=3)     # [B, K, T, S]
        own = (kb[None, :] == (q_pos // bk)[:, None]) & (k_pos[None, :] <= q_pos[:, None])
        mask = (sel | own[None, None]) & (k_pos < kv_len)
        return masked_attention(q, ck, cv, mask, slopes, q_pos, k_pos)
