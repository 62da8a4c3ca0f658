"""Strided / fixed factorized attention of the Sparse Transformer (Child et al. 2019,
"Generating Long Sequences with Sparse Transformers", section 4.2), on the block-sparse
engine.

Two factorized patterns of stride ``l``, each made of a local part A and a far part B:

* ``strided``: A = the last ``l`` keys (``0 <= t - s < l``); B = every ``l``-th key
  (``t - s = n * l``). Child et al. take ``l ~ sqrt(T)`` (``O(T sqrt T)``); here ``l``
  is fixed and ``n_strided`` bounds B to ``n < n_strided`` (a dilated window, O(T)
  work); ``n_strided=None`` gives the original unbounded B (``O(T^2 / l)``).
  B is computed by regrouping positions by residue ``t mod l``: within a residue
  class B is a (windowed) causal band, so it runs on the engine with dense blocks.
* ``fixed``: A = keys in the same length-``l`` block; B = the last ``summary``
  positions of every block (the paper's ``c``: ``s mod l >= l - c``), gathered into a
  compressed key set (``O(T^2 c / l)`` work, as in the paper).

``layout``: ``"heads"`` splits the heads (and kv heads) in halves, first half A,
second half B (the paper's multi-head variant); ``"a"`` / ``"b"`` use one part in
every head, so a stack alternating ``a`` and ``b`` layers gives the interleaved
variant. Bidirectional use (``causal=False``) mirrors each part around ``t``.
Decoding is dense over the KV cache under the explicit mask (``visible``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from layers.attention.block_sparse import Band, block_sparse_attention
from layers.attention.blockwise import band_lists, blockwise_attention
from layers.attention.sparse import SparseAttentionConfig
from layers.contracts import one_of, positive
from layers.typing import Array

PATTERNS = ("strided", "fixed")
LAYOUTS = ("heads", "a", "b")


@dataclasses.dataclass(frozen=True)
class SameBlock:
    """Fixed pattern, part A: same length-``stride`` block (and causal)."""
    stride: int
    causal: bool

    def __call__(self, qp, kp):
        ok = (qp // self.stride) == (kp // self.stride)
        return ok & (qp >= kp) if self.causal else ok


@dataclasses.dataclass(frozen=True)
class SummaryColumns:
    """Fixed pattern, part B, on compressed key index ``m`` (``c`` summaries per block)."""
    stride: int
    summary: int
    length: int
    causal: bool

    def __call__(self, qp, m):
        pos = (m // self.summary) * self.stride + self.stride - self.summary + m % self.summary
        ok = pos < self.length
        return ok & (pos <= qp) if self.causal else ok


def _regroup(x: Array, stride: int) -> Array:
    """[B, Tp, ...] -> [B * l, Tp / l, ...]: residue classes of t mod l become rows."""
    b, tp = x.shape[:2]
    x = x.reshape((b, tp // stride, stride) + x.shape[2:])
    return jnp.moveaxis(x, 2, 1).reshape((b * stride, tp // stride) + x.shape[3:])


def _ungroup(x: Array, b: int, stride: int) -> Array:
    x = x.reshape((b, stride, x.shape[1]) + x.shape[2:])
    return jnp.moveaxis(x, 1, 2).reshape((b, stride * x.shape[2]) + x.shape[3:])


def strided_far(q, k, v, *, stride, n_strided, causal, segment_ids, slopes, block_q, block_k,
                query_chunk, unroll=1):
    """Part B of the strided pattern: keys with ``t - s = n * stride``, ``|n| < n_strided``."""
    b, t = q.shape[:2]
    tp = -(-t // stride) * stride
    pad = lambda x, c=0: jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2), constant_values=c)
    if n_strided is not None:  # blocks of about the (regrouped) window keep the work O(T * n_strided)
        block_q = block_k = min(block_q, max(8, n_strided))
    seg = segment_ids
    if seg is not None:
        seg = pad(seg, jnp.min(seg) - 1)
    elif tp > t and not causal:
        seg = jnp.broadcast_to((jnp.arange(tp) < t).astype(jnp.int32), (b, tp))
    out = blockwise_attention(_regroup(pad(q), stride), _regroup(pad(k), stride),
                              _regroup(pad(v), stride), causal=causal, window=n_strided,
                              segment_ids=None if seg is None else _regroup(seg, stride),
                              alibi_slopes=None if slopes is None else slopes * stride,
                              block_q=block_q, block_k=block_k, query_chunk=query_chunk,
                              unroll=unroll)
    return _ungroup(out, b, stride)[:, :t]


def fixed_summary(q, k, v, *, stride, summary, causal, segment_ids, block_q, block_k,
                  query_chunk, unroll=1):
    """Part B of the fixed pattern: the last ``summary`` positions of every block."""
    b, t = q.shape[:2]
    tp = -(-t // stride) * stride
    nb = tp // stride

    def gather(x):
        x = jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape((b, nb, stride) + x.shape[2:])[:, :, stride - summary:].reshape(
            (b, nb * summary) + x.shape[2:])
    kc, vc = gather(k), gather(v)
    seg = None if segment_ids is None else (segment_ids, gather(segment_ids))
    sc = nb * summary
    bq, bk = min(block_q, t), min(block_k, sc)
    nq, nk = -(-t // bq), -(-sc // bk)
    idx = jnp.broadcast_to(jnp.arange(nk), (nq, nk))
    valid = jnp.ones((nq, nk), bool)
    if causal:  # compressed index of the last summary at or before each query block's end
        qend = jnp.arange(nq) * bq + bq - 1
        n_vis = (qend + 1) // stride * summary + jnp.clip((qend + 1) % stride - (stride - summary), 0)
        valid = idx * bk < n_vis[:, None]
    return block_sparse_attention(q, kc, vc, idx, valid,
                                  rule=SummaryColumns(stride, summary, t, causal),
                                  segment_ids=seg, block_q=bq, block_k=bk, query_chunk=query_chunk,
                                  unroll=unroll)


@dataclasses.dataclass(frozen=True)
class SparseTransformerConfig(SparseAttentionConfig):
    """Child et al. (2019) factorized attention; see the module docstring."""
    kind: ClassVar[str] = "sparse_transformer"
    pattern: str = "strided"            # one of PATTERNS
    stride: int = 32                    # l
    n_strided: int | None = 16          # strided part B: keys t - n*l for n < n_strided (None: all)
    summary: int = 4                    # fixed part B: c summary positions per block
    layout: str = "heads"               # one of LAYOUTS

    def validate(self, d_model, path="mixer"):
        super().validate(d_model, path)
        one_of(f"{path}.pattern", self.pattern, PATTERNS)
        one_of(f"{path}.layout", self.layout, LAYOUTS)
        positive(f"{path}.stride", self.stride)
        positive(f"{path}.n_strided", self.n_strided, allow_none=True)
        positive(f"{path}.summary", self.summary)
        if self.summary > self.stride:
            raise ValueError(f"{path}.summary={self.summary} must be <= {path}.stride={self.stride}")
        if self.layout == "heads" and (self.n_heads % 2 or self.kv_heads % 2):
            raise ValueError(f"{path}.layout='heads' splits heads in halves: {path}.n_heads="
                             f"{self.n_heads} and kv heads={self.kv_heads} must be even")
        if self.pattern == "fixed" and self.position == "alibi" and self.layout != "a":
            raise ValueError(f"{path}.position='alibi' is not supported by the fixed pattern's "
                             "summary part (compressed keys); use 'rope', 'xpos' or 'none'")

    def _part(self, which, q, k, v, segment_ids, slopes, unroll):
        kw = dict(segment_ids=segment_ids, block_q=self.block_q, block_k=self.block_k,
                  query_chunk=self.query_chunk, unroll=unroll)
        if which == "a" and self.pattern == "strided":
            return blockwise_attention(q, k, v, causal=self.causal, window=self.stride,
                                       alibi_slopes=slopes, **kw)
        if which == "a":
            t = q.shape[1]
            bq, bk = min(self.block_q, t), min(self.block_k, t)
            idx, valid = band_lists(-(-t // bq), -(-t // bk), bq, bk, self.causal, self.stride)
            kw.update(block_q=bq, block_k=bk)
            return block_sparse_attention(q, k, v, idx, valid, rule=SameBlock(self.stride, self.causal),
                                          alibi_slopes=slopes, **kw)
        if self.pattern == "strided":
            return strided_far(q, k, v, stride=self.stride, n_strided=self.n_strided,
                               causal=self.causal, slopes=slopes, **kw)
        return fixed_summary(q, k, v, stride=self.stride, summary=self.summary, causal=self.causal, **kw)

    def attend(self, q, k, v, segment_ids, slopes, *, unroll=1):
        if self.layout != "heads":
            return self._part(self.layout, q, k, v, segment_ids, slopes, unroll)
        h, kh = q.shape[2], k.shape[2]
        half = lambda x, i, n: x[:, :, i * n // 2:(i + 1) * n // 2]
        outs = [self._part(p, half(q, i, h), half(k, i, kh), half(v, i, kh), segment_ids,
                           None if slopes is None else slopes[i * h // 2:(i + 1) * h // 2], unroll)
                for i, p in enumerate(("a", "b"))]
        return jnp.concatenate(outs, axis=2)

    def part_mask(self, which: str, q_pos: Array, k_pos: Array) -> Array:
        """Explicit [T, S] mask of part ``which`` (causal use)."""
        qp, kp = q_pos[:, None], k_pos[None, :]
        d = qp - kp
        if which == "a":
            ok = Band(True, self.stride)(qp, kp) if self.pattern == "strided" else \
                SameBlock(self.stride, True)(qp, kp)
        elif self.pattern == "strided":
            ok = (d >= 0) & (d % self.stride == 0)
            if self.n_strided is not None:
                ok &= d // self.stride < self.n_strided
        else:
            ok = (d >= 0) & (kp % self.stride >= self.stride - self.summary)
        return ok

    def visible(self, q_pos, k_pos):
        if self.layout != "heads":
            return self.part_mask(self.layout, q_pos, k_pos)
        a, b = self.part_mask("a", q_pos, k_pos), self.part_mask("b", q_pos, k_pos)
        kh = self.kv_heads
        return jnp.concatenate([jnp.broadcast_to(a, (kh // 2,) + a.shape),
                                jnp.broadcast_to(b, (kh // 2,) + b.shape)])[None]
