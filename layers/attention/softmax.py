"""Multi-head softmax attention: MHA / GQA / MQA (Vaswani et al. 2017; Ainslie et al.
2023), with RoPE/xPos/ALiBi/NoPE positions, causal and sliding-window masks, segment
ids for packed sequences, and decoding from an explicit KV cache.

:class:`Attention` is the one module of every softmax mixer of the family: it projects
q/k/v with ``layers.heads``, applies the position scheme, then calls its config's
``attend`` (training / prefill) or ``decode`` (with a cache). :class:`AttentionBase`
holds what those configs share; :class:`AttentionConfig` is plain softmax attention,
the pattern mixers (``layers.attention.sparse``) and the sliding window
(``layers.attention.local``) subclass the base.

Implementations of :class:`AttentionConfig` (``attn_impl``), all with the same semantics:

* ``"dense"``: masked softmax over materialized [B, H, T, S] scores, fused for XLA
  (``layers.attention.dense``; fastest for short sequences and decode). The oracle every
  path is tested against is ``pallas_kernels.reference_attention``.
* ``"blockwise"``: pure-JAX online softmax over key blocks with a custom VJP
  (``layers.attention.blockwise``): O(T * block) memory in forward and backward.
* the kernel names of ``pallas_kernels.flash_attention(impl=...)`` (:data:`KERNEL_IMPLS`):
  the call goes to that dispatcher, which says where each kernel runs (``"pallas"``:
  Triton-lowered on GPU, interpret mode on CPU). ALiBi is not supported by the kernels.

Calls with ``cache=`` (prefill, chunked prefill, decode): T new queries against the
``max_len``-slot cache with ``q_offset = cache.index`` and ``kv_len = index + T``;
``"dense"`` runs the fused dense path over the cache, every other impl
``layers.attention.blockwise.cached_attention`` (blockwise over the filled key blocks up
to the diagonal; the kernels have no cache offsets). The KV cache is full-length even
with a window (decode memory grows with context, which is what ``state_size`` reports;
the ``sliding_window`` mixer keeps a ring of W slots instead). K/V are kept with K kv heads; queries are grouped
``[B, T, K, G, Dh]`` so K/V are never repeated per query head.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.attention.blockwise import blockwise_attention, cached_attention
from layers.attention.dense import dense_attention
from layers.contracts import MixerConfig, nbytes, no_aux, one_of, positive
from layers.heads import HeadsConfig, project_heads, project_out
from layers.positions import RopeConfig, alibi_slopes, apply_rope, apply_xpos
from layers.sharding import batch_mesh, shard_attention
from layers.typing import Array, DType
from pallas_kernels.attention.ops import IMPLS as DISPATCH_IMPLS
from pallas_kernels.attention.ops import flash_attention

# The kernels of pallas_kernels.flash_attention(impl=...) (its "xla" path is "dense" here).
KERNEL_IMPLS = tuple(i for i in DISPATCH_IMPLS if i != "xla")
ATTN_IMPLS = ("dense", "blockwise") + KERNEL_IMPLS
POSITION_SCHEMES = ("rope", "alibi", "none", "xpos")


class KVCache(NamedTuple):
    """k, v: [B, S, K, Dh] (S = max_len); index: int32 [] tokens already written."""
    k: Array
    v: Array
    index: Array

    @classmethod
    def zeros(cls, batch: int, length: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        shape = (batch, length, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def write(self, k: Array, v: Array) -> "KVCache":
        """Writes T new tokens (k, v: [B, T, K, Dh]) at ``index``; index += T."""
        ck = jax.lax.dynamic_update_slice_in_dim(self.k, k.astype(self.k.dtype), self.index, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(self.v, v.astype(self.v.dtype), self.index, axis=1)
        return KVCache(ck, cv, self.index + k.shape[1])


def apply_position(q: Array, k: Array, positions: Array, position: str, rope: RopeConfig):
    """RoPE or xPos on q [B, T, H, Dh] and k [B, T, K, Dh]; other schemes leave them."""
    if position == "rope":
        return apply_rope(q, positions, rope), apply_rope(k, positions, rope)
    if position == "xpos":
        return apply_xpos(q, positions, rope, key=False), apply_xpos(k, positions, rope, key=True)
    return q, k


@dataclasses.dataclass(frozen=True)
class AttentionBase(MixerConfig, HeadsConfig):
    """What every mixer built on :class:`Attention` shares (an abstract base: no ``kind``).

    ``block_q``/``block_k``: block sizes of the blockwise / block-sparse paths (clipped
    to T); ``query_chunk``: query tokens those paths process together (rounded down to
    whole query blocks, at least one; None: the whole sequence at once).
    """
    position: str = "rope"               # one of positions_allowed
    rope: RopeConfig = RopeConfig()
    block_q: int = 128
    block_k: int = 128
    query_chunk: int | None = 1
    qkv_bias: bool = False
    o_bias: bool = False                 # bias on the output projection
    positions_allowed: ClassVar[tuple[str, ...]] = POSITION_SCHEMES

    def validate(self, d_model: int, path: str = "mixer") -> None:
        rotary = self.position in ("rope", "xpos")
        self.validate_heads(d_model, path, even_head_dim=self.position if rotary else None)
        positive(f"{path}.block_q", self.block_q)
        positive(f"{path}.block_k", self.block_k)
        positive(f"{path}.query_chunk", self.query_chunk, allow_none=True)
        one_of(f"{path}.position", self.position, self.positions_allowed)
        if rotary:
            self.rope.validate(f"{path}.rope")

    def make(self, d_model, dtype, param_dtype, name=None):
        return Attention(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        if not self.causal:
            raise ValueError(f"{self.kind}: a bidirectional (causal=False) mixer has no decode cache")
        return KVCache.zeros(batch, max_len, self.kv_heads, self.head_dim_for(d_model), dtype)

    def state_size(self, d_model, seq_len, dtype=jnp.float32):
        return 2 * seq_len * self.kv_heads * self.head_dim_for(d_model) * nbytes(dtype)

    # --- hooks of the Attention module ------------------------------------------------
    def attend(self, q: Array, k: Array, v: Array, segment_ids, slopes, *, unroll=1) -> Array:
        """Training/prefill: q [B, T, H, Dh], k/v [B, T, K, Dh] -> [B, T, H, Dh]."""
        raise NotImplementedError

    def decode_attend(self, q: Array, ck: Array, cv: Array, q_offset: Array, kv_len: Array,
                      slopes) -> Array:
        """New queries at positions ``q_offset + arange(T)`` against the first ``kv_len``
        cache entries ck, cv [B, S, K, Dh] -> [B, T, H, Dh]."""
        raise NotImplementedError

    def decode(self, q: Array, k: Array, v: Array, cache, slopes):
        """Appends k, v to the cache and attends to it: (out [B, T, H, Dh], new cache)."""
        new = cache.write(k, v)
        return self.decode_attend(q, new.k, new.v, cache.index, new.index, slopes), new


@dataclasses.dataclass(frozen=True)
class AttentionConfig(AttentionBase):
    """Softmax attention. ``n_kv_heads=None`` means MHA; 1 means MQA."""
    kind: ClassVar[str] = "attention"
    attn_impl: str = "dense"             # one of ATTN_IMPLS
    window: int | None = None            # sliding window W (keys with pos_q - pos_k < W)

    def validate(self, d_model: int, path: str = "attention") -> None:
        super().validate(d_model, path)
        positive(f"{path}.window", self.window, allow_none=True)
        one_of(f"{path}.attn_impl", self.attn_impl, ATTN_IMPLS)

    def attend(self, q, k, v, segment_ids, slopes, *, unroll=1):
        """Training/prefill attention through ``attn_impl`` (queries from position 0)."""
        if self.attn_impl == "blockwise":
            return blockwise_attention(q, k, v, causal=self.causal, window=self.window,
                                       segment_ids=segment_ids, alibi_slopes=slopes,
                                       block_q=self.block_q, block_k=self.block_k,
                                       query_chunk=self.query_chunk, unroll=unroll)
        if self.attn_impl in KERNEL_IMPLS:
            if slopes is not None:
                raise ValueError(f"attention.attn_impl={self.attn_impl!r} does not support "
                                 "position='alibi'; use attn_impl='blockwise' or 'dense'")
            kernel = lambda q, k, v, seg: flash_attention(
                q, k, v, causal=self.causal, window=self.window, segment_ids=seg, impl=self.attn_impl)
            mesh = batch_mesh(q.shape[0])   # kernels cannot be partitioned by GSPMD
            if mesh is not None:
                return shard_attention(kernel, q, k, v, segment_ids, mesh)
            return kernel(q, k, v, segment_ids)
        return dense_attention(q, k, v, causal=self.causal, window=self.window,
                               segment_ids=segment_ids, alibi_slopes=slopes)

    def decode_attend(self, q, ck, cv, q_offset, kv_len, slopes):
        """Prefill / decode into the cache: ``"dense"`` computes the fused dense path over
        the cache; every other impl the blockwise cache path, which visits only the filled
        blocks up to the diagonal (the kernels take no cache offsets)."""
        if self.attn_impl == "dense":
            return dense_attention(q, ck, cv, causal=True, window=self.window, q_offset=q_offset,
                                   kv_len=kv_len, alibi_slopes=slopes)
        return cached_attention(q, ck, cv, q_offset, kv_len, window=self.window,
                                alibi_slopes=slopes, block_q=self.block_q, block_k=self.block_k,
                                query_chunk=self.query_chunk)


class Attention(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new_cache or None, aux {}) for any :class:`AttentionBase`."""
    cfg: AttentionBase
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache=None, train: bool = False):
        cfg = self.cfg
        h, kh, dh = cfg.n_heads, cfg.kv_heads, cfg.head_dim_for(self.d_model)
        q = project_heads(self, x, h, dh, "q", bias=cfg.qkv_bias)            # [B, T, H, Dh]
        k = project_heads(self, x, kh, dh, "k", kv=True, bias=cfg.qkv_bias)  # [B, T, K, Dh]
        v = project_heads(self, x, kh, dh, "v", kv=True, bias=cfg.qkv_bias)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        q, k = apply_position(q, k, positions, cfg.position, cfg.rope)
        slopes = alibi_slopes(h) if cfg.position == "alibi" else None
        if cache is None:
            out, new_cache = cfg.attend(q, k, v, segment_ids, slopes), None
        else:
            out, new_cache = cfg.decode(q, k, v, cache, slopes)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        return project_out(self, out, self.d_model, bias=cfg.o_bias), new_cache, no_aux()
