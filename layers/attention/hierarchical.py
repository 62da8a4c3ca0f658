"""Two-level hierarchical attention: fine attention inside summary blocks + coarse
attention to block summaries (in the spirit of H-Transformer-1D, Zhu & Soricut 2021,
reduced to two levels), made causal, on the block-sparse engine.

The sequence is cut into summary blocks of ``summary_block`` tokens; a block's summary
key/value is the mean of its keys/values. Query ``t`` attends, with one softmax, to

* the tokens of its own summary block (causally: ``s <= t``);
* the summaries of the blocks that *ended before* its block started (a summary is
  visible only to queries after its block ends, so no future token leaks through it).

Bidirectional use (``causal=False``) sees the whole own block and every other block's
summary. Keys are laid out as ``[summaries (padded to a Bk multiple); tokens]`` so one
engine call covers both levels; work is ``O(T * summary_block + T^2 / summary_block)``
and memory ``O(T)`` -- no ``T x T`` array. With packed sequences a summary averages
only the tokens of the segment of its block's last token and is visible only within
that segment. Decoding is dense over the KV cache (summaries recomputed from it).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from layers.attention.block_sparse import block_sparse_attention
from layers.attention.block_sparse_reference import masked_attention
from layers.attention.blockwise import band_lists
from layers.attention.sparse import SparseAttentionConfig
from layers.contracts import positive
from layers.typing import Array


@dataclasses.dataclass(frozen=True)
class HierRule:
    """Visibility on the concatenated key index (``kp < n_slots``: summary of block kp;
    summaries ``n_summaries <= kp < n_slots`` are padding)."""
    summary_block: int
    n_summaries: int
    n_slots: int
    causal: bool

    def __call__(self, qp, kp):
        own = qp // self.summary_block
        summary = (kp < own) if self.causal else (kp != own) & (kp < self.n_summaries)
        j = kp - self.n_slots
        fine = (j // self.summary_block == own) & ((j <= qp) if self.causal else True)
        return jnp.where(kp < self.n_slots, summary, fine)


def summaries(x: Array, summary_block: int, segment_ids: Array | None):
    """Block means of x [B, T, K, Dh] -> [B, Ns, K, Dh] (Ns = ceil(T / summary_block))
    and their segment ids [B, Ns] (None without segments): with segments a summary
    averages the tokens of the segment of its block's last token."""
    sb = summary_block
    b, t = x.shape[:2]
    ns = -(-t // sb)
    pad = ns * sb - t
    if segment_ids is None:
        w = jnp.pad(jnp.ones((b, t), jnp.float32), ((0, 0), (0, pad)))
        seg_sum = None
    else:
        last = jnp.minimum(jnp.arange(ns) * sb + sb - 1, t - 1)
        seg_sum = segment_ids[:, last]                                  # segment of the block's last token
        sp = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
        w = (sp.reshape(b, ns, sb) == seg_sum[:, :, None]).astype(jnp.float32).reshape(b, -1)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    num = (xp * w[:, :, None, None]).reshape((b, ns, sb) + x.shape[2:]).sum(2)
    den = w.reshape(b, ns, sb).sum(2)[:, :, None, None]
    return (num / jnp.maximum(den, 1.0)).astype(x.dtype), seg_sum


def hierarchical_attention(q: Array, k: Array, v: Array, *, summary_block: int,
                           causal: bool = True, segment_ids: Array | None = None,
                           block_q: int = 64, block_k: int = 64, query_chunk: int | None = None,
                           unroll=1) -> Array:
    """q: [B, T, H, Dh]; k, v: [B, T, K, Dh] -> [B, T, H, Dh] (see module docstring)."""
    sb = summary_block
    t = q.shape[1]
    bq, bk = min(block_q, t), min(block_k, t)
    ksum, seg_sum = summaries(k, sb, segment_ids)
    vsum, _ = summaries(v, sb, segment_ids)
    ns = ksum.shape[1]
    n_slot_blocks = -(-ns // bk)
    n_slots = n_slot_blocks * bk
    padk = lambda x: jnp.pad(x, ((0, 0), (0, n_slots - ns), (0, 0), (0, 0)))
    keys = jnp.concatenate([padk(ksum), k], axis=1)                    # [B, n_slots + T, K, Dh]
    vals = jnp.concatenate([padk(vsum), v], axis=1)
    nq, nkf = -(-t // bq), -(-t // bk)
    fidx, fval = band_lists(nq, nkf, bq, bk, causal, sb)
    sidx = jnp.broadcast_to(jnp.arange(n_slot_blocks), (nq, n_slot_blocks))
    sval = jnp.ones((nq, n_slot_blocks), bool)
    if causal:  # key block holds a summary that ended before the query block's last query's block
        sval = sidx * bk < ((jnp.arange(nq) * bq + bq - 1) // sb)[:, None]
    idx = jnp.concatenate([sidx, fidx + n_slot_blocks], 1)
    valid = jnp.concatenate([sval, fval], 1)
    seg = None
    if segment_ids is not None:
        seg_k = jnp.concatenate([jnp.pad(seg_sum, ((0, 0), (0, n_slots - ns)), constant_values=-1),
                                 segment_ids], 1)
        seg = (segment_ids, seg_k)
    return block_sparse_attention(q, keys, vals, idx, valid, rule=HierRule(sb, ns, n_slots, causal),
                                  segment_ids=seg, block_q=bq, block_k=bk, query_chunk=query_chunk,
                                  unroll=unroll)


@dataclasses.dataclass(frozen=True)
class HierarchicalConfig(SparseAttentionConfig):
    """Fine (in-block) + coarse (block-summary) attention over summary blocks of
    ``summary_block`` tokens."""
    kind: ClassVar[str] = "hierarchical"
    summary_block: int = 32
    positions_allowed: ClassVar[tuple[str, ...]] = ("rope", "xpos", "none")

    def validate(self, d_model, path="mixer"):
        super().validate(d_model, path)
        positive(f"{path}.summary_block", self.summary_block)

    def attend(self, q, k, v, segment_ids, slopes, *, unroll=1):
        return hierarchical_attention(q, k, v, summary_block=self.summary_block, causal=self.causal,
                                      segment_ids=segment_ids, block_q=self.block_q,
                                      block_k=self.block_k, query_chunk=self.query_chunk,
                                      unroll=unroll)

    def visible(self, q_pos, k_pos):
        """Fine-level mask (token keys) of the causal pattern."""
        sb = self.summary_block
        return (k_pos[None] // sb == q_pos[:, None] // sb) & (k_pos[None] <= q_pos[:, None])

    def decode_attend(self, q, ck, cv, q_offset, kv_len, slopes):
        sb = self.summary_block
        q_pos = q_offset + jnp.arange(q.shape[1])
        # a summary is visible only once its block is complete, so the cache's zero
        # padding never enters a visible mean
        ksum, vsum = summaries(ck, sb, None)[0], summaries(cv, sb, None)[0]
        k_pos = jnp.arange(ck.shape[1])
        s_vis = jnp.arange(ksum.shape[1])[None, :] < (q_pos // sb)[:, None]   # blocks ended before
        mask = jnp.concatenate([s_vis, self.visible(q_pos, k_pos) & (k_pos < kv_len)], axis=1)
        return masked_attention(q, jnp.concatenate([ksum, ck], 1), jnp.concatenate([vsum, cv], 1), mask)
