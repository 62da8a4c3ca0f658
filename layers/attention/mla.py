"""Multi-head latent attention (MLA; DeepSeek-V2, Liu et al. 2024, Sec. 2.1; DeepSeek-V3).

Queries and keys/values go through low-rank bottlenecks; keys carry a separate
*decoupled* RoPE part shared by all heads (H heads, R = ``kv_lora_rank``, Rq =
``q_lora_rank``, Dn / Dr / Dv = the no-position, rotary and value head dims)::

    q        = q_b(RMSNorm(q_a x))                 [B, T, H, Dn + Dr]  (or a plain q projection)
    [c | kr] = kv_a x ;  c = RMSNorm(c)            c: [B, T, R], kr: [B, T, Dr]
    [kn | v] = kv_b c                              [B, T, H, Dn + Dv]
    k        = [kn | RoPE(kr) for every head] ;  q = [qn | RoPE(qr)]
    y        = o(softmax(q k^T * scale) v)         scale = (Dn + Dr)^-0.5 * m^2

where ``m = 0.1 * mscale_all_dim * ln(factor) + 1`` under YaRN scaling (1 otherwise).
RoPE (frequencies and q/k magnitude from ``layers.positions.rope_frequencies``; DeepSeek
sets YaRN's ``attention_factor`` to ``m(mscale) / m(mscale_all_dim)``, 1 for DeepSeek-V3)
rotates DeepSeek's *interleaved* channel pairs ``(2i, 2i + 1)`` (``rope_interleave``;
False: Llama's rotate-half pairs). Both q and k are de-interleaved before the
rotate-half rotation, as the reference does; the score is unchanged by that common
permutation.

Training / prefill (:func:`mla_attention_naive`) materializes per-head keys and values
from the latent. Decoding keeps only the normalized latent ``c [B, S, R]`` and the
rotated ``kr [B, S, Dr]`` per token (:class:`MLACache`; ``state_size`` =
``S * (R + Dr)`` elements, vs ``2 * S * H * Dh`` for MHA) and uses the absorbed form
(:func:`mla_attention_absorbed`): kv_b's key part is folded into the query
(``qn W_uk -> [B, T, H, R]``) and its value part into the output (``(p c) W_uv``),
so per-head keys and values are never formed. ``absorb=False`` decodes from the same
cache through the naive form (the test reference). Both forms compute the scores,
softmax and value sums densely in fp32 (no blockwise / kernel path yet); a fully masked
row returns zeros.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import initializers as init
from layers.contracts import MixerConfig, in_range, nbytes, no_aux, positive
from layers.heads import dense, project_heads, project_out
from layers.norms import RMSNorm
from layers.positions import RopeConfig, rope_frequencies
from layers.typing import Array, DType
from pallas_kernels.attention.reference import split_segment_ids, visible


class MLACache(NamedTuple):
    """latent: [B, S, R] normalized c; k_rope: [B, S, Dr] rotated; index: int32 [] tokens written."""
    latent: Array
    k_rope: Array
    index: Array

    def write(self, latent: Array, k_rope: Array) -> "MLACache":
        """Writes T new tokens at ``index``; index += T."""
        upd = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
            buf, new.astype(buf.dtype), self.index, axis=1)
        return MLACache(upd(self.latent, latent), upd(self.k_rope, k_rope),
                        self.index + latent.shape[1])


def yarn_mscale(factor: float, mscale: float) -> float:
    """DeepSeek's YaRN magnitude ``0.1 * mscale * ln(factor) + 1`` (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class MLAConfig(MixerConfig):
    """MLA. Field names follow DeepSeek's config (``qk_nope_head_dim`` = Dn, ...).

    ``q_lora_rank=None``: queries by one ``[D, H, Dn + Dr]`` projection (DeepSeek-V2-Lite).
    ``mscale_all_dim``: YaRN softmax magnitude (used only with ``rope.scaling="yarn"``).
    ``absorb``: decode through the absorbed form (False: the naive form, same cache).
    """
    kind: ClassVar[str] = "mla"
    n_heads: int = 4
    q_lora_rank: int | None = 32
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    rope: RopeConfig = RopeConfig()
    rope_interleave: bool = True
    mscale_all_dim: float = 0.0
    latent_eps: float = 1e-6
    absorb: bool = True

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self, d_model: int, path: str = "mla") -> None:
        for name in ("n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim"):
            positive(f"{path}.{name}", getattr(self, name))
        positive(f"{path}.q_lora_rank", self.q_lora_rank, allow_none=True)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"{path}.qk_rope_head_dim={self.qk_rope_head_dim} must be even "
                             "(RoPE rotates channel pairs)")
        in_range(f"{path}.latent_eps", self.latent_eps, 0.0, lo_open=True)
        in_range(f"{path}.mscale_all_dim", self.mscale_all_dim, 0.0)
        self.rope.validate(f"{path}.rope")
        if self.rope.fraction != 1.0:
            raise ValueError(f"{path}.rope.fraction={self.rope.fraction} is not allowed; MLA's "
                             "rotary part is qk_rope_head_dim (use 1.0)")

    def make(self, d_model, dtype, param_dtype, name=None):
        return MLA(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        if not self.causal:
            raise ValueError("mla: a bidirectional (causal=False) mixer has no decode cache")
        return MLACache(jnp.zeros((batch, max_len, self.kv_lora_rank), dtype),
                        jnp.zeros((batch, max_len, self.qk_rope_head_dim), dtype),
                        jnp.zeros((), jnp.int32))

    def state_size(self, d_model, seq_len, dtype=jnp.float32):
        return seq_len * (self.kv_lora_rank + self.qk_rope_head_dim) * nbytes(dtype)

    def softmax_scale(self) -> float:
        m = yarn_mscale(self.rope.factor, self.mscale_all_dim) if self.rope.scaling == "yarn" else 1.0
        return self.qk_head_dim ** -0.5 * m * m


# ----------------------------------------------------------------------------- pure math

def rotate(x: Array, positions: Array, inv_freq: Array, factor: float, interleave: bool) -> Array:
    """RoPE on ``x [B, T, ..., Dr]`` by ``positions [B, T]``, fp32. ``interleave``: pairs
    (2i, 2i+1), returned de-interleaved (evens then odds); else pairs (i, i + Dr/2)."""
    xf = x.astype(jnp.float32)
    if interleave:
        xf = jnp.concatenate([xf[..., 0::2], xf[..., 1::2]], axis=-1)
    half = xf.shape[-1] // 2
    ang = positions.astype(jnp.float32)[..., None] * inv_freq            # [B, T, Dr/2]
    ang = ang.reshape(ang.shape[:2] + (1,) * (x.ndim - 3) + (half,))
    cos, sin = jnp.cos(ang) * factor, jnp.sin(ang) * factor
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _probs(scores: Array, *, causal: bool, q_offset, kv_len, segment_ids) -> Array:
    """Masked fp32 softmax of ``scores [B, H, T, S]`` (fully masked rows -> 0)."""
    t, s = scores.shape[-2:]
    q_seg, k_seg = split_segment_ids(segment_ids, t, s)
    mask = visible(q_offset + jnp.arange(t), jnp.arange(s), causal=causal, window=None,
                   kv_len=kv_len, q_seg=q_seg, k_seg=k_seg)
    mask = mask[:, None] if mask.ndim == 3 else mask[None, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(den > 0, den, 1.0)


def mla_attention_naive(q_nope, q_rope, latent, k_rope, w_kv, scale, *, causal=True,
                        q_offset=0, kv_len=None, segment_ids=None):
    """Per-head keys/values from the latent, then softmax attention.

    Args:
      q_nope: [B, T, H, Dn]; q_rope: [B, T, H, Dr] (rotated).
      latent: [B, S, R] normalized c; k_rope: [B, S, Dr] rotated, shared by all heads.
      w_kv: [R, H, Dn + Dv] (kv_b). scale: softmax scale.
      q_offset, kv_len, segment_ids: as in ``pallas_kernels.reference_attention``.

    Returns:
      [B, T, H, Dv] fp32.
    """
    dn = q_nope.shape[-1]
    kv = jnp.einsum("bsr,rhk->bshk", latent.astype(jnp.float32), w_kv.astype(jnp.float32))
    k_nope, v = kv[..., :dn], kv[..., dn:]                              # [B, S, H, Dn|Dv]
    scores = (jnp.einsum("bthn,bshn->bhts", q_nope.astype(jnp.float32), k_nope)
              + jnp.einsum("bthr,bsr->bhts", q_rope.astype(jnp.float32),
                           k_rope.astype(jnp.float32))) * scale
    p = _probs(scores, causal=causal, q_offset=q_offset, kv_len=kv_len, segment_ids=segment_ids)
    return jnp.einsum("bhts,bshv->bthv", p, v)


def mla_attention_absorbed(q_nope, q_rope, latent, k_rope, w_kv, scale, *, causal=True,
                           q_offset=0, kv_len=None, segment_ids=None):
    """The same as :func:`mla_attention_naive` with kv_b absorbed: scores against the
    latent (``qn W_uk [B, T, H, R]``), values read as latent then mapped by ``W_uv``.
    Shapes as in :func:`mla_attention_naive`; returns [B, T, H, Dv] fp32."""
    dn = q_nope.shape[-1]
    w = w_kv.astype(jnp.float32)
    w_uk, w_uv = w[..., :dn], w[..., dn:]                               # [R, H, Dn|Dv]
    latent = latent.astype(jnp.float32)
    q_lat = jnp.einsum("bthn,rhn->bthr", q_nope.astype(jnp.float32), w_uk)
    scores = (jnp.einsum("bthr,bsr->bhts", q_lat, latent)
              + jnp.einsum("bthr,bsr->bhts", q_rope.astype(jnp.float32),
                           k_rope.astype(jnp.float32))) * scale
    p = _probs(scores, causal=causal, q_offset=q_offset, kv_len=kv_len, segment_ids=segment_ids)
    o_lat = jnp.einsum("bhts,bsr->bthr", p, latent)                     # [B, T, H, R]
    return jnp.einsum("bthr,rhv->bthv", o_lat, w_uv)


# ----------------------------------------------------------------------------- module

class MLA(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new MLACache or None, aux {}). Parameters: ``q_a``
    [D, Rq], ``q_norm``, ``q_b`` [Rq, H, Dn + Dr] (or ``q`` [D, H, Dn + Dr]); ``kv_a``
    [D, R + Dr], ``kv_norm``, ``kv_b`` [R, H, Dn + Dv]; ``o`` [H, Dv, D]. The rank axes
    (Rq, R) have no logical axis name: they are small and stay replicated."""
    cfg: MLAConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def _queries(self, x: Array) -> Array:
        cfg, h = self.cfg, self.cfg.n_heads
        if cfg.q_lora_rank is None:
            return project_heads(self, x, h, cfg.qk_head_dim, "q")
        cq = dense(cfg.q_lora_rank, ("embed", None), self.dtype, self.param_dtype, "q_a")(x)
        cq = RMSNorm(cfg.latent_eps, self.dtype, self.param_dtype, name="q_norm")(cq)
        w = init.param(self, "q_b", init.fan_in(1.0, in_axis=0, out_axis=(1, 2)),
                       (cfg.q_lora_rank, h, cfg.qk_head_dim), (None, "heads", "head_dim"))
        return jnp.einsum("btr,rhk->bthk", cq, w.astype(self.dtype))   # [B, T, H, Dn + Dr]

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache: MLACache | None = None, train: bool = False):
        cfg = self.cfg
        r, dn, dr = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        x = x.astype(self.dtype)
        q = nn.with_logical_constraint(self._queries(x), ("batch", "length", "heads", "head_dim"))
        ckv = dense(r + dr, ("embed", None), self.dtype, self.param_dtype, "kv_a")(x)
        latent = RMSNorm(cfg.latent_eps, self.dtype, self.param_dtype, name="kv_norm")(ckv[..., :r])
        w_kv = init.param(self, "kv_b", init.fan_in(1.0, in_axis=0, out_axis=(1, 2)),
                          (r, cfg.n_heads, dn + cfg.v_head_dim), (None, "heads", "head_dim"))
        inv_freq, factor = rope_frequencies(dr, cfg.rope, positions)
        rot = lambda z: rotate(z, positions, inv_freq, factor, cfg.rope_interleave)
        q_nope, q_rope = q[..., :dn], rot(q[..., dn:])
        k_rope = rot(ckv[..., r:])                                           # [B, T, Dr]
        scale = cfg.softmax_scale()
        if cache is None:
            out = mla_attention_naive(q_nope, q_rope, latent, k_rope, w_kv, scale,
                                      causal=cfg.causal, segment_ids=segment_ids)
            new_cache = None
        else:
            new_cache = cache.write(latent, k_rope)
            fn = mla_attention_absorbed if cfg.absorb else mla_attention_naive
            out = fn(q_nope, q_rope, new_cache.latent, new_cache.k_rope, w_kv, scale,
                     q_offset=cache.index, kv_len=new_cache.index)
        out = nn.with_logical_constraint(out.astype(self.dtype),
                                         ("batch", "length", "heads", "head_dim"))
        return project_out(self, out, self.d_model), new_cache, no_aux()
