"""Multi-head softmax attention: MHA / GQA / MQA (Vaswani et al. 2017; Ainslie et al.
2023), with RoPE/ALiBi/NoPE positions, causal and sliding-window masks, segment ids
for packed sequences, and decoding from an explicit KV cache.

Implementations (``AttentionConfig.impl``), all with the same semantics:

* ``"dense"``: XLA einsums with a structured mask (``pallas_kernels.reference_attention``);
  materializes [B, H, T, S] scores — the reference.
* ``"blockwise"``: pure-JAX online-softmax over key blocks with a custom VJP
  (``layers.blockwise_attention``): O(T * block) memory in forward and backward.
* ``"pallas"``: ``pallas_kernels.flash_attention(impl="pallas")``: the Triton-lowered
  Pallas kernel on GPU, interpret mode on CPU (slow, for tests); refused on TPU (its
  blocks do not meet Mosaic TPU tiling yet). ALiBi is not supported by the kernel.

Decoding (a call with ``cache=``) always uses the dense path over the cache: T new
queries against ``max_len`` keys with ``q_offset = cache.index`` and ``kv_len =
index + T``. The KV cache is full-length even with a window (decode memory grows
with context, which is what ``state_size`` reports). K/V are kept with K kv heads;
queries are grouped ``[B, T, K, G, Dh]`` so K/V are never repeated per query head.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.blockwise_attention import blockwise_attention
from layers.mixer import MixerConfig, nbytes, one_of, positive
from layers.positions import RopeConfig, alibi_slopes, apply_rope, apply_xpos
from layers.typing import Array, DType
from pallas_kernels.attention.reference import reference_attention

ATTENTION_IMPLS = ("dense", "blockwise", "pallas")
POSITION_SCHEMES = ("rope", "alibi", "none", "xpos")


class KVCache(NamedTuple):
    """k, v: [B, S, K, Dh] (S = max_len); index: int32 [] tokens already written."""
    k: Array
    v: Array
    index: Array


@dataclasses.dataclass(frozen=True)
class AttentionConfig(MixerConfig):
    """Softmax attention. ``n_kv_heads=None`` means MHA; 1 means MQA."""
    kind: ClassVar[str] = "attention"
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None          # None: d_model // n_heads
    impl: str = "dense"                  # one of ATTENTION_IMPLS
    window: int | None = None            # sliding window W (keys with pos_q - pos_k < W)
    position: str = "rope"               # one of POSITION_SCHEMES
    rope: RopeConfig = RopeConfig()
    block_q: int = 128                   # blockwise / pallas block sizes
    block_k: int = 128
    qkv_bias: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def dh(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // self.n_heads

    def validate(self, d_model: int, path: str = "attention") -> None:
        positive(f"{path}.n_heads", self.n_heads)
        positive(f"{path}.n_kv_heads", self.n_kv_heads, allow_none=True)
        positive(f"{path}.head_dim", self.head_dim, allow_none=True)
        positive(f"{path}.window", self.window, allow_none=True)
        positive(f"{path}.block_q", self.block_q)
        positive(f"{path}.block_k", self.block_k)
        one_of(f"{path}.impl", self.impl, ATTENTION_IMPLS)
        one_of(f"{path}.position", self.position, POSITION_SCHEMES)
        if self.n_heads % self.kv_heads:
            raise ValueError(f"{path}.n_heads={self.n_heads} must be divisible by "
                             f"{path}.n_kv_heads={self.kv_heads} (each kv head serves a group of query heads)")
        if self.head_dim is None and d_model % self.n_heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by {path}.n_heads="
                             f"{self.n_heads} (or set {path}.head_dim explicitly)")
        if self.position in ("rope", "xpos"):
            if self.dh(d_model) % 2:
                raise ValueError(f"{path}: head dim {self.dh(d_model)} is odd; RoPE rotates channel "
                                 "pairs and needs an even head dim")
            self.rope.validate(f"{path}.rope")

    def make(self, d_model, dtype, param_dtype, name=None):
        return Attention(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        shape = (batch, max_len, self.kv_heads, self.dh(d_model))
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def state_size(self, d_model, seq_len, dtype=jnp.float32):
        return 2 * seq_len * self.kv_heads * self.dh(d_model) * nbytes(dtype)


def attend(cfg: AttentionConfig, q: Array, k: Array, v: Array, segment_ids=None,
           slopes: Array | None = None) -> Array:
    """Training/prefill attention through the configured implementation (q_offset 0)."""
    if cfg.impl == "blockwise":
        return blockwise_attention(q, k, v, causal=cfg.causal, window=cfg.window,
                                   segment_ids=segment_ids, alibi_slopes=slopes,
                                   block_q=cfg.block_q, block_k=cfg.block_k)
    if cfg.impl == "pallas":
        if slopes is not None:
            raise ValueError("attention.impl='pallas' does not support position='alibi'; "
                             "use impl='blockwise' or 'dense'")
        from pallas_kernels import flash_attention  # late: kernels are optional at import
        return flash_attention(q, k, v, causal=cfg.causal, window=cfg.window,
                               segment_ids=segment_ids, impl="pallas")
    return reference_attention(q, k, v, causal=cfg.causal, window=cfg.window,
                               segment_ids=segment_ids, alibi_slopes=slopes)


class Attention(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new_cache or None)."""
    cfg: AttentionConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache: KVCache | None = None, train: bool = False) -> tuple[Array, KVCache | None]:
        cfg = self.cfg
        h, kh, dh = cfg.n_heads, cfg.kv_heads, cfg.dh(self.d_model)

        def proj(n, axes, name):  # [B, T, D] -> [B, T, n, Dh]
            init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                    in_axis=0, out_axis=(1, 2))
            w = self.param(name, nn.with_logical_partitioning(init, ("embed",) + axes),
                           (self.d_model, n, dh), self.param_dtype)
            y = jnp.einsum("btd,dnh->btnh", x.astype(self.dtype), w.astype(self.dtype))
            if cfg.qkv_bias:
                y = y + self.param(f"{name}_bias", nn.with_logical_partitioning(
                    nn.initializers.zeros, axes), (n, dh), self.param_dtype).astype(self.dtype)
            return y

        q = proj(h, ("heads", "head_dim"), "q")      # [B, T, H, Dh]
        k = proj(kh, ("kv_heads", "head_dim"), "k")  # [B, T, K, Dh]
        v = proj(kh, ("kv_heads", "head_dim"), "v")
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        if cfg.position == "rope":
            q = apply_rope(q, positions, cfg.rope)
            k = apply_rope(k, positions, cfg.rope)
        elif cfg.position == "xpos":
            q = apply_xpos(q, positions, cfg.rope, key=False)
            k = apply_xpos(k, positions, cfg.rope, key=True)
        slopes = alibi_slopes(h) if cfg.position == "alibi" else None

        if cache is None:
            out = attend(cfg, q, k, v, segment_ids, slopes)
            new_cache = None
        else:
            t = x.shape[1]
            idx = cache.index
            ck = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), idx, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), idx, axis=1)
            out = reference_attention(q, ck, cv, causal=True, window=cfg.window, q_offset=idx,
                                      kv_len=idx + t, alibi_slopes=slopes)
            new_cache = KVCache(ck, cv, idx + t)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=(0, 1), out_axis=2)
        wo = self.param("o", nn.with_logical_partitioning(init, ("heads", "head_dim", "embed")),
                        (h, dh, self.d_model), self.param_dtype)
        y = jnp.einsum("bthd,hdm->btm", out.astype(self.dtype), wo.astype(self.dtype))
        return y, new_cache
