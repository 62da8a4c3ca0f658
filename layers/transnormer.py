"""TransNormer-style "local exact + global linear" attention (Qin et al. 2022,
"The Devil in Linear Transformer": DiagAttention + NormAttention; the intra/inter
block split of Lightning Attention, Qin et al. 2024), causal.

The sequence is cut into blocks of ``block`` tokens. Query ``t`` in block ``c`` gets

    y_t = softmax-attention(q_t; keys of block c with s <= t)                (local, exact)
        + RMSNorm( phi(q_t)^T S_c ),   S_c = sum_{s < c * block} phi(k_s) v_s^T   (global, linear)

with ``phi = elu + 1`` on the un-rotated q/k and a per-head RMSNorm in place of the
linear-attention denominator (NormAttention). The local part runs on the block-sparse
core (O(T * block)); the global part is a first-order linear recurrence over block
states ``S_{c+1} = a_c S_c + KV_c`` (``lax.associative_scan``), O(T/block * Dh^2) state.
With packed sequences a block state only sums keys of the segment that is still open
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

from layers.block_sparse import block_sparse_attention
from layers.mixer import nbytes, positive
from layers.positions import alibi_slopes
from layers.sparse_attention import (SparseAttentionConfig, apply_position, band_lists, heads_proj,
                                     masked_attention, out_proj)
from layers.sparse_transformer import SameBlock
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


def phi(x: Array) -> Array:
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def block_states(fk: Array, v: Array, block: int, segment_ids: Array | None) -> tuple[Array, Array | None]:
    """States visible to each block. fk, v: [B, T, K, Dh] -> S [B, nC, K, Dh, Dh] with
    ``S_c`` = sum of phi(k) v^T before block c (within the open segment), and the
    segment of each block's predecessor's last token ([B, nC] or None)."""
    b, t, kh, dh = v.shape
    nc = -(-t // block)
    pad = lambda x, c=0: jnp.pad(x, ((0, 0), (0, nc * block - t)) + ((0, 0),) * (x.ndim - 2),
                                 constant_values=c)
    fkc = pad(fk).reshape(b, nc, block, kh, dh)
    vc = pad(v.astype(jnp.float32)).reshape(b, nc, block, kh, dh)
    if segment_ids is None:
        kv = jnp.einsum("bcskd,bcske->bckde", fkc, vc)
        s = jnp.cumsum(kv, axis=1)
        s = jnp.concatenate([jnp.zeros_like(s[:, :1]), s[:, :-1]], axis=1)   # exclusive prefix sum
        return s, None
    segc = pad(segment_ids, -1).reshape(b, nc, block)
    last = segment_ids[:, jnp.minimum(jnp.arange(nc) * block + block - 1, t - 1)]   # [B, nC]
    w = (segc == last[:, :, None]).astype(jnp.float32)
    kv = jnp.einsum("bcskd,bcske,bcs->bckde", fkc, vc, w)
    prev = jnp.concatenate([jnp.full_like(last[:, :1], -2), last[:, :-1]], axis=1)
    a = (last == prev).astype(jnp.float32)[:, :, None, None, None]    # segment continues
    # S_{c+1} = a_c S_c + kv_c, S_0 = 0: scan (a, b) pairs, then shift by one block.
    comb = lambda x, y: (x[0] * y[0], y[0] * x[1] + y[1])
    _, incl = jax.lax.associative_scan(comb, (jnp.broadcast_to(a, kv.shape), kv), axis=1)
    s = jnp.concatenate([jnp.zeros_like(incl[:, :1]), incl[:, :-1]], axis=1)
    return s, prev


def rms_heads(x: Array, scale: Array, eps: float = 1e-6) -> Array:
    """RMSNorm over Dh per head. x: [..., H, Dh] fp32; scale: [H, Dh]."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


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
        kh, dh = self.kv_heads, self.dh(d_model)
        kv = jnp.zeros((batch, self.block, kh, dh), dtype)
        st = jnp.zeros((batch, kh, dh, dh), jnp.float32)
        return TransNormerCache(kv, kv, st, st, jnp.zeros((), jnp.int32))

    def state_size(self, d_model, seq_len, dtype=jnp.float32):
        kh, dh = self.kv_heads, self.dh(d_model)
        return 2 * self.block * kh * dh * nbytes(dtype) + 2 * kh * dh * dh * 4

    def local(self, q, k, v, segment_ids, slopes, unroll=1):
        """Exact causal softmax inside blocks (on the core)."""
        t = q.shape[1]
        bq, bk = min(self.block_q, t), min(self.block_k, t)
        idx, valid = band_lists(-(-t // bq), -(-t // bk), bq, bk, True, self.block)
        return block_sparse_attention(q, k, v, idx, valid, rule=SameBlock(self.block, True),
                                      segment_ids=segment_ids, alibi_slopes=slopes, block_q=bq,
                                      block_k=bk, chunk=self.chunk, unroll=unroll)

    def global_linear(self, fq, fk, v, segment_ids):
        """phi(q)^T S_c per query (un-normalized): fq [B, T, H, Dh] -> [B, T, H, Dh] fp32."""
        b, t, h, dh = fq.shape
        kh, blk = v.shape[2], self.block
        s, prev = block_states(fk, v, blk, segment_ids)
        nc = s.shape[1]
        fqc = jnp.pad(fq, ((0, 0), (0, nc * blk - t), (0, 0), (0, 0))).reshape(b, nc, blk, kh, h // kh, dh)
        out = jnp.einsum("bcskgd,bckde->bcskge", fqc, s).reshape(b, nc * blk, h, dh)[:, :t]
        if prev is not None:  # queries whose segment is not the one open at the block start
            use = segment_ids == jnp.repeat(prev, blk, axis=1)[:, :t]
            out = out * use[:, :, None, None]
        return out


class TransNormer(nn.Module):
    cfg: TransNormerConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, train=False):
        cfg = self.cfg
        h, kh, dh = cfg.n_heads, cfg.kv_heads, cfg.dh(self.d_model)
        q = heads_proj(self, x, h, dh, ("heads", "head_dim"), "q")
        k = heads_proj(self, x, kh, dh, ("kv_heads", "head_dim"), "k")
        v = heads_proj(self, x, kh, dh, ("kv_heads", "head_dim"), "v")
        fq, fk = phi(q), phi(k)
        qr, kr = apply_position(q, k, positions, cfg.position, cfg.rope)
        slopes = alibi_slopes(h) if cfg.position == "alibi" else None
        scale = self.param("norm_scale", nn.with_logical_partitioning(nn.initializers.ones,
                           ("heads", "head_dim")), (h, dh), self.param_dtype).astype(jnp.float32)
        if cache is None:
            loc = cfg.local(qr, kr, v, segment_ids, slopes)
            glob = cfg.global_linear(fq, fk, v, segment_ids)
            new_cache = None
        else:
            loc, glob, new_cache = self._decode(qr, kr, v, fq, fk, cache, slopes)
        out = loc.astype(jnp.float32) + rms_heads(glob, scale)
        out = nn.with_logical_constraint(out.astype(self.dtype), ("batch", "length", "heads", "head_dim"))
        return out_proj(self, out, self.d_model), new_cache

    def _decode(self, qr, kr, v, fq, fk, cache, slopes):
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
            glob = jnp.einsum("bkgd,bkde->bkge", fq1.reshape(b, -1, g, dh), state).reshape(b, 1, h, dh)
            pend = pend + jnp.einsum("bkd,bke->bkde", fk1[:, 0], v1[:, 0].astype(jnp.float32))
            return TransNormerCache(ck, cv, state, pend, p + 1), (loc, glob)

        xs = tuple(jnp.moveaxis(a, 1, 0)[:, :, None] for a in (qr, kr, v, fq, fk))
        new_cache, (loc, glob) = jax.lax.scan(step, cache, xs)
        fix = lambda a: jnp.moveaxis(a[:, :, 0], 0, 1)
        return fix(loc), fix(glob), new_cache
