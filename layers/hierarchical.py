"""Two-level hierarchical attention: fine attention inside groups + coarse attention to
group summaries (in the spirit of H-Transformer-1D, Zhu & Soricut 2021, reduced to two
levels), made causal, on the block-sparse core.

The sequence is cut into groups of ``group`` tokens; a group's summary key/value is
the mean of its keys/values. Query ``t`` attends, with one softmax, to

* the tokens of its own group (causally: ``s <= t``);
* the summaries of the groups that *ended before* its group started (a summary is
  visible only to queries after its group ends, so no future token leaks through it).

Bidirectional use (``causal=False``) sees the whole own group and every other group's
summary. Keys are laid out as ``[summaries (padded to a block multiple); tokens]`` so one
core call covers both levels; work is ``O(T * group + T^2 / group)`` and memory
``O(T)`` — no ``T x T`` array. With packed sequences a summary averages only the
tokens of the segment of its group's last token and is visible only within that
segment. Decoding is dense over the KV cache (summaries recomputed from it).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from layers.block_sparse import block_sparse_attention
from layers.mixer import positive
from layers.routed_attention import block_means
from layers.sparse_attention import SparseAttentionConfig, band_lists, masked_attention
from layers.typing import Array


@dataclasses.dataclass(frozen=True)
class HierRule:
    """Visibility on the concatenated key index (``kp < n_sum``: summary of group kp;
    summaries ``n_groups <= kp < n_sum`` are padding)."""
    group: int
    n_groups: int
    n_sum: int
    causal: bool

    def __call__(self, qp, kp):
        gq = qp // self.group
        summary = (kp < gq) if self.causal else (kp != gq) & (kp < self.n_groups)
        j = kp - self.n_sum
        fine = (j // self.group == gq) & ((j <= qp) if self.causal else True)
        return jnp.where(kp < self.n_sum, summary, fine)


def summaries(x: Array, group: int, segment_ids: Array | None):
    """Group means of x [B, T, K, Dh] -> [B, Ng, K, Dh] and their segment ids [B, Ng]."""
    b, t = x.shape[:2]
    ng = -(-t // group)
    pad = ng * group - t
    if segment_ids is None:
        w = jnp.pad(jnp.ones((b, t), jnp.float32), ((0, 0), (0, pad)))
        seg_sum = None
    else:
        last = jnp.minimum(jnp.arange(ng) * group + group - 1, t - 1)
        seg_sum = segment_ids[:, last]                                  # segment of the group's last token
        sp = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
        w = (sp.reshape(b, ng, group) == seg_sum[:, :, None]).astype(jnp.float32).reshape(b, -1)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    num = (xp * w[:, :, None, None]).reshape((b, ng, group) + x.shape[2:]).sum(2)
    den = w.reshape(b, ng, group).sum(2)[:, :, None, None]
    return (num / jnp.maximum(den, 1.0)).astype(x.dtype), seg_sum


def hierarchical_attention(q: Array, k: Array, v: Array, *, group: int, causal: bool = True,
                           segment_ids: Array | None = None, block_q: int = 64, block_k: int = 64,
                           chunk: int | None = None, unroll=1) -> Array:
    """q: [B, T, H, Dh]; k, v: [B, T, K, Dh] -> [B, T, H, Dh] (see module docstring)."""
    b, t = q.shape[:2]
    bq, bk = min(block_q, t), min(block_k, t)
    ksum, seg_sum = summaries(k, group, segment_ids)
    vsum, _ = summaries(v, group, segment_ids)
    ng = ksum.shape[1]
    nsb = -(-ng // bk)
    ns = nsb * bk
    padk = lambda x: jnp.pad(x, ((0, 0), (0, ns - ng), (0, 0), (0, 0)))
    keys = jnp.concatenate([padk(ksum), k], axis=1)                    # [B, ns + T, K, Dh]
    vals = jnp.concatenate([padk(vsum), v], axis=1)
    nq, nkf = -(-t // bq), -(-t // bk)
    fidx, fval = band_lists(nq, nkf, bq, bk, causal, group)
    sidx = jnp.broadcast_to(jnp.arange(nsb), (nq, nsb))
    sval = jnp.ones((nq, nsb), bool)
    if causal:  # summary block holds a group that ended before the block's last query's group
        sval = sidx * bk < ((jnp.arange(nq) * bq + bq - 1) // group)[:, None]
    idx = jnp.concatenate([sidx, fidx + nsb], 1)
    valid = jnp.concatenate([sval, fval], 1)
    seg = None
    if segment_ids is not None:
        seg_k = jnp.concatenate([jnp.pad(seg_sum, ((0, 0), (0, ns - ng)), constant_values=-1),
                                 segment_ids], 1)
        seg = (segment_ids, seg_k)
    return block_sparse_attention(q, keys, vals, idx, valid, rule=HierRule(group, ng, ns, causal),
                                  segment_ids=seg, block_q=bq, block_k=bk, chunk=chunk, unroll=unroll)


@dataclasses.dataclass(frozen=True)
class HierarchicalConfig(SparseAttentionConfig):
    """Fine (in-group) + coarse (group-summary) attention with groups of ``group`` tokens."""
    kind: ClassVar[str] = "hierarchical"
    group: int = 32
    positions_allowed: ClassVar[tuple[str, ...]] = ("rope", "xpos", "none")

    def validate(self, d_model, path="mixer"):
        super().validate(d_model, path)
        positive(f"{path}.group", self.group)

    def attend(self, q, k, v, segment_ids, slopes, *, unroll=1):
        return hierarchical_attention(q, k, v, group=self.group, causal=self.causal,
                                      segment_ids=segment_ids, block_q=self.block_q,
                                      block_k=self.block_k, chunk=self.chunk, unroll=unroll)

    def visible(self, q_pos, k_pos):
        """Fine-level mask (token keys) of the causal pattern."""
        g = self.group
        return (k_pos[None] // g == q_pos[:, None] // g) & (k_pos[None] <= q_pos[:, None])

    def decode_attend(self, q, ck, cv, q_pos, kv_len, slopes):
        g = self.group
        ksum, vsum = block_means(ck, g).astype(ck.dtype), block_means(cv, g).astype(cv.dtype)
        k_pos = jnp.arange(ck.shape[1])
        s_vis = jnp.arange(ksum.shape[1])[None, :] < (q_pos // g)[:, None]   # groups ended before
        mask = jnp.concatenate([s_vis, self.visible(q_pos, k_pos) & (k_pos < kv_len)], axis=1)
        return masked_attention(q, jnp.concatenate([ksum, ck], 1), jnp.concatenate([vsum, cv], 1), mask)
