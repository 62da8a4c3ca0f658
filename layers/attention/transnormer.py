"""TransNormer-style "local exact + global linear" attention (Qin et al. 2022,
"The Devil in Linear Transformer": DiagAttention + NormAttention; the intra/inter
block split of Lightning Attention, Qin et al. 2024), causal.

The sequence is cut into blocks of ``block`` tokens. Query ``t`` in block ``c`` gets

    y_t = softmax-attention(q_t; keys of block c with s <= t)                (local, exact)
        + RMSNorm( phi(q_t)^T S_c ),   S_c = sum_{s < c * block} phi(k_s) v_s^T   (global, linear)

with ``phi = elu + 1`` (``layers.feature_maps.elu_feature_map``) on the un-rotated
q/k and a per-head RMSNorm (``layers.norms.HeadNorm``) in place of the linear-attention
denominator (NormAttention). The local part runs on the block-sparse engine
(O(T * block)); the global part is the first-order linear recurrence over block states
``S_{c+1} = a_c S_c + KV_c`` (``layers.recurrence.linear_scan``), O(T/block * Dh^2)
state. :func:`transnormer_reference` computes both parts densely (a masked softmax and
a masked ``phi(q) phi(k)^T`` product) for the tests. With packed sequences a block state only sums keys of the segment that is still open
at the block's end, and is used only by queries of that segment (``a_c = 0`` where a
segment starts), so nothing crosses segments.

Decoding keeps a fixed-size cache: the current block's keys/values (``block`` slots),
the state of completed blocks and the running sum of the current block; a call with
``cache=`` processes its tokens one at a time (a ``lax.scan``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.attention.block_sparse import block_sparse_attention
from layers.attention.block_sparse_reference import masked_attention
from layers.attention.blockwise import band_lists
from layers.attention.softmax import apply_position
from layers.attention.sparse import SparseAttentionConfig
from layers.attention.strided import SameBlock
from layers.contracts import nbytes, no_aux, positive
from layers.feature_maps import elu_feature_map
from layers.heads import group_queries, project_heads, project_out
from layers.norms import HeadNorm
from layers.positions import alibi_slopes
from layers.recurrence import linear_scan
from layers.typing import Array, DType


class TransNormerCache(NamedTuple):
    """k, v: [B, block, K, Dh] current block (position p in slot p % block);
    state, pending: fp32 [B, K, Dh, Dh] sums of phi(k) v^T over completed blocks / the
    current block; index: int32 []."""
    k: Array
    v: Array
    state: Array
    pending: Array
    index: Array


def block_states(fk: Array, v: Array, block: int, segment_ids: Array | None) -> tuple[Array, Array | None]:
    """States visible to each block. fk, v: [B, T, K, Dh] -> S [B, NC, K, Dh, Dh] with
    ``S_c`` = sum of phi(k) v^T before block c (within the open segment), and the
    segment of each block's predecessor's last token ([B, NC] or None)."""
    b, t, kh, dh = v.shape
    nc = -(-t // block)
    pad = lambda x, c=0: jnp.pad(x, ((0, 0), (0, nc * block - t)) + ((0, 0),) * (x.ndim - 2),
                                 constant_values=c)
    fkc = pad(fk).reshape(b, nc, block, kh, dh)
    vc = pad(v.astype(jnp.float32)).reshape(b, nc, block, kh, dh)
    prev = None
    if segment_ids is None:
        kv = jnp.einsum("bcskd,bcskv->bckdv", fkc, vc)
        a = jnp.ones((b, nc, 1, 1, 1), jnp.float32)
    else:
        segc = pad(segment_ids, -1).reshape(b, nc, block)
        last = segment_ids[:, jnp.minimum(jnp.arange(nc) * block + block - 1, t - 1)]   # [B, NC]
        w = (segc == last[:, :, None]).astype(jnp.float32)             # keys of the open segment
        kv = jnp.einsum("bcskd,bcskv,bcs->bckdv", fkc, vc, w)
        prev = jnp.concatenate([jnp.full_like(last[:, :1], -2), last[:, :-1]], axis=1)
        a = (last == prev).astype(jnp.float32)[:, :, None, None, None]  # segment continues
    incl, _ = linear_scan(a, kv)                                        # S_{c+1} = a_c S_c + kv_c
    return jnp.concatenate([jnp.zeros_like(incl[:, :1]), incl[:, :-1]], axis=1), prev


def local_attention(q, k, v, *, block, segment_ids, slopes, block_q, block_k, query_chunk,
                    unroll=1) -> Array:
    """Exact causal softmax inside blocks of ``block`` tokens (on the engine)."""
    t = q.shape[1]
    bq, bk = min(block_q, t), min(block_k, t)
    idx, valid = band_lists(-(-t // bq), -(-t // bk), bq, bk, True, block)
    return block_sparse_attention(q, k, v, idx, valid, rule=SameBlock(block, True),
                                  segment_ids=segment_ids, alibi_slopes=slopes, block_q=bq,
                                  block_k=bk, query_chunk=query_chunk, unroll=unroll)


def global_linear(fq: Array, fk: Array, v: Array, *, block: int, segment_ids) -> Array:
    """phi(q)^T S_c per query (un-normalized): fq [B, T, H, Dh] -> [B, T, H, Dh] fp32."""
    b, t, h, dh = fq.shape
    kh = v.shape[2]
    s, prev = block_states(fk, v, block, segment_ids)
    nc = s.shape[1]
    fqc = jnp.pad(fq, ((0, 0), (0, nc * block - t), (0, 0), (0, 0))).reshape(
        b, nc, block, kh, h // kh, dh)
    out = jnp.einsum("bcskgd,bckdv->bcskgv", fqc, s).reshape(b, nc * block, h, dh)[:, :t]
    if prev is not None:  # queries whose segment is not the one open at the block start
        use = segment_ids == jnp.repeat(prev, block, axis=1)[:, :t]
        out = out * use[:, :, None, None]
    return out


def transnormer_reference(q, k, v, fq, fk, *, block: int, segment_ids=None, slopes=None):
    """Dense reference of ``local + global`` (before the norm): q [B, T, H, Dh] (rotated),
    k, v [B, T, K, Dh]; fq, fk: phi of the un-rotated q, k. Returns (local, global) fp32."""
    t = q.shape[1]
    pos = jnp.arange(t)
    same = jnp.ones((1, t, t), bool) if segment_ids is None else \
        segment_ids[:, :, None] == segment_ids[:, None, :]                 # [B|1, T, S]
    local_mask = ((pos[:, None] // block == pos[None] // block) & (pos[None] <= pos[:, None]))[None] & same
    loc = masked_attention(q, k, v, local_mask[:, None], slopes, pos, pos).astype(jnp.float32)
    earlier = ((pos[None] < (pos[:, None] // block) * block)[None] & same).astype(jnp.float32)
    lin = jnp.einsum("btkgd,bskd,bts,bskv->btkgv", group_queries(fq, k.shape[2]), fk, earlier,
                     v.astype(jnp.float32))
    return loc, lin.reshape(fq.shape)


@dataclasses.dataclass(frozen=True)
class TransNormerConfig(SparseAttentionConfig):
    """Causal softmax inside blocks of ``block`` tokens + normed linear attention across."""
    kind: ClassVar[str] = "transnormer"
    block: int = 64
    positions_allowed: ClassVar[tuple[str, ...]] = ("rope", "xpos", "none", "alibi")

    def validate(self, d_model, path="mixer"):
        super().validate(d_model, path)
        positive(f"{path}.block", self.block)
        if not self.causal:
            raise ValueError(f"{path}.causal=False is not supported: the block-state recurrence "
                             "of transnormer is causal")

    def make(self, d_model, dtype, param_dtype, name=None):
        return TransNormer(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        kh, dh = self.kv_heads, self.head_dim_for(d_model)
        kv = jnp.zeros((batch, self.block, kh, dh), dtype)
        st = jnp.zeros((batch, kh, dh, dh), jnp.float32)
        return TransNormerCache(kv, kv, st, st, jnp.zeros((), jnp.int32))

    def state_size(self, d_model, seq_len, dtype=jnp.float32):
        kh, dh = self.kv_heads, self.head_dim_for(d_model)
        return 2 * self.block * kh * dh * nbytes(dtype) + 2 * kh * dh * dh * 4

    def local(self, q, k, v, segment_ids, slopes, unroll=1):
        """Exact causal softmax inside blocks (on the engine)."""
        return local_attention(q, k, v, block=self.block, segment_ids=segment_ids, slopes=slopes,
                               block_q=self.block_q, block_k=self.block_k,
                               query_chunk=self.query_chunk, unroll=unroll)

    def global_linear(self, fq, fk, v, segment_ids):
        """phi(q)^T S_c per query (un-normalized), fp32."""
        return global_linear(fq, fk, v, block=self.block, segment_ids=segment_ids)


class TransNormer(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new TransNormerCache or None, {})."""
    cfg: TransNormerConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, train=False):
        cfg = self.cfg
        h, kh, dh = cfg.n_heads, cfg.kv_heads, cfg.head_dim_for(self.d_model)
        q = project_heads(self, x, h, dh, "q")                         # [B, T, H, Dh]
        k = project_heads(self, x, kh, dh, "k", kv=True)               # [B, T, K, Dh]
        v = project_heads(self, x, kh, dh, "v", kv=True)
        fq, fk = elu_feature_map(q), elu_feature_map(k)
        qr, kr = apply_position(q, k, positions, cfg.position, cfg.rope)
        slopes = alibi_slopes(h) if cfg.position == "alibi" else None
        if cache is None:
            loc = cfg.local(qr, kr, v, segment_ids, slopes)
            glob = cfg.global_linear(fq, fk, v, segment_ids)
            new_cache = None
        else:
            loc, glob, new_cache = self._decode(qr, kr, v, fq, fk, cache, slopes)
        glob = HeadNorm(kind="rmsnorm", eps=1e-6, param_dtype=self.param_dtype, name="norm")(glob)
        out = loc.astype(jnp.float32) + glob
        out = nn.with_logical_constraint(out.astype(self.dtype), ("batch", "length", "heads", "head_dim"))
        return project_out(self, out, self.d_model), new_cache, no_aux()

    def _decode(self, qr, kr, v, fq, fk, cache, slopes):
        """Tokens one at a time (``lax.scan``): (local, global, new cache)."""
        blk, g = self.cfg.block, qr.shape[2] // kr.shape[2]

        def step(c, xs):
            q1, k1, v1, fq1, fk1 = xs                                     # [B, 1, ., Dh]
            p = c.index
            slot = p % blk
            start = slot == 0
            state = jnp.where(start, c.state + c.pending, c.state)
            pend = jnp.where(start, 0.0, c.pending)
            ck = jax.lax.dynamic_update_slice_in_dim(c.k, k1.astype(c.k.dtype), slot, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(c.v, v1.astype(c.v.dtype), slot, axis=1)
            k_pos = p - slot + jnp.arange(blk)
            mask = (jnp.arange(blk) <= slot)[None]
            loc = masked_attention(q1, ck, cv, mask, slopes, p[None], k_pos)
            b, _, h, dh = fq1.shape
            glob = jnp.einsum("bkgd,bkdv->bkgv", fq1.reshape(b, -1, g, dh), state).reshape(b, 1, h, dh)
            pend = pend + jnp.einsum("bkd,bkv->bkdv", fk1[:, 0], v1[:, 0].astype(jnp.float32))
            return TransNormerCache(ck, cv, state, pend, p + 1), (loc, glob)

        xs = tuple(jnp.moveaxis(a, 1, 0)[:, :, None] for a in (qr, kr, v, fq, fk))
        new_cache, (loc, glob) = jax.lax.scan(step, cache, xs)
        fix = lambda a: jnp.moveaxis(a[:, :, 0], 0, 1)
        return fix(loc), fix(glob), new_cache
