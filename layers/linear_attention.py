"""Kernelized linear attention: Katharopoulos et al. 2020 ("Transformers are RNNs")
and Performer FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").

Both replace ``softmax(q k^T)`` by a feature-map kernel ``phi(q)^T phi(k)`` (K et al.
eq. 4-5), so causal attention becomes the prefix sums (K et al. eqs. 10-12, the
"RNN form" of Sec. 3.4)::

    S_i = S_{i-1} + phi(k_i) v_i^T,   z_i = z_{i-1} + phi(k_i)
    out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)

computed by ``layers.recurrence.matrix_recurrence`` (no decay) on ``v' = [v, 1]``:
the last output column is the normalizer. Decode state = (S [B, H, N, Dh], z [B, H, N]),
fixed size. Neither paper puts positions inside the kernel: both mixers are
position-agnostic except for causality (use ``BlockSpec.short_conv`` for local order).

* ``linear_attention``: ``phi(x) = elu(x) + 1`` (K et al. eq. 7), N = Dh.
* ``performer``: positive orthogonal random features (Lemma 1; orthogonal features
  Sec. 2.4) for ``SM(q, k) = exp(q^T k / sqrt(Dh))``: with ``x = Dh^-1/4 q``,
  ``phi(x) = exp(w^T x - |x|^2 / 2) / sqrt(N)`` for N rows ``w`` of a block-orthogonal
  Gaussian matrix (rows rescaled to chi(Dh) norms).

  *Numerical stabilization* (the paper's code subtracts maxima before ``exp``): a
  per-query constant cancels in the ratio, so queries subtract their row max
  (``stop_gradient``). A per-key constant does *not* cancel, and the official global
  max over all keys would look at future keys (breaking decode == forward). Keys
  therefore keep the exact ``exp(w_j^T k - |k|^2/2)``, whose mean over ``w`` is 1, so
  sums stay O(T); it is bounded by ``exp(|w_j|^2 / 2)``, and for features with
  ``|w_j|^2 / 2 > 40`` (only when Dh >~ 64) the excess ``s_j`` is moved from the key
  side to the query side (``phi_k,j * exp(-s_j)``, ``phi_q,j * exp(+s_j)`` before the
  row max): the product ``phi_q . phi_k`` is unchanged, no key feature exceeds
  ``exp(40)``.

  *Redraws*: the projection is a non-trainable variable in the ``"state"``
  collection (drawn at init from the "params" RNG; scanned layers get different
  draws), used at eval and decode. With ``train=True`` and ``redraw=True`` a fresh
  projection is drawn from the ``"features"`` RNG stream on every call (the train
  loop provides it; fixed key -> deterministic).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.ffn import dense
from layers.mixer import MixerConfig, one_of, positive
from layers.recurrence import MATRIX_IMPLS, check_chunk, matrix_recurrence
from layers.typing import Array, DType

STATE_COLLECTION = "state"   # == archs.model.STATE_COLLECTION (layers may not import archs)


class LinearAttentionCache(NamedTuple):
    """s: [B, H, N, Dh] = sum phi(k) v^T; z: [B, H, N] = sum phi(k) (fp32)."""
    s: Array
    z: Array


def elu_feature_map(x: Array) -> Array:
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al. eq. 7), in fp32."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def orthogonal_gaussian(key: Array, n_features: int, dim: int, orthogonal: bool = True) -> Array:
    """``[N, Dh]`` projection: stacked blocks of ``Dh`` orthonormal rows (QR of Gaussian
    matrices, sign-corrected to Haar), rows rescaled by independent chi(Dh) norms so
    each row is marginally N(0, I). ``orthogonal=False``: i.i.d. Gaussian rows."""
    k_blocks, k_norms = jax.random.split(key)
    if not orthogonal:
        return jax.random.normal(k_blocks, (n_features, dim), jnp.float32)
    n_blocks = -(-n_features // dim)

    def block(k):
        qm, r = jnp.linalg.qr(jax.random.normal(k, (dim, dim), jnp.float32))
        return (qm * jnp.sign(jnp.diagonal(r))[None, :]).T
    rows = jax.vmap(block)(jax.random.split(k_blocks, n_blocks)).reshape(-1, dim)[:n_features]
    norms = jnp.linalg.norm(jax.random.normal(k_norms, (n_features, dim), jnp.float32), axis=-1)
    return rows * norms[:, None]


def favor_features(x: Array, w: Array, *, is_query: bool, cap: float = 40.0) -> Array:
    """Positive random features of ``x [B, T, H, Dh]`` (already scaled by Dh^-1/4) for
    projection ``w [N, Dh]``, stabilized as in the module docstring: returns
    ``[B, T, H, N]`` with ``phi_q^T phi_k = exp(q^T k) / N`` times a per-query constant."""
    x = x.astype(jnp.float32)
    w = w.astype(jnp.float32)
    logits = jnp.einsum("bthd,nd->bthn", x, w) - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    shift = jnp.maximum(0.5 * jnp.sum(w * w, axis=-1) - cap, 0.0)   # [N], 0 unless |w|^2/2 > cap
    if is_query:
        logits = logits + shift
        logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    else:
        logits = logits - shift
    return jnp.exp(logits) * (w.shape[0] ** -0.5)


def kernel_attention(fq: Array, fk: Array, v: Array, *, eps: float, h0: LinearAttentionCache | None,
                     segment_ids: Array | None, impl: str, chunk: int):
    """Causal normalized kernel attention from features ``fq, fk [B, T, H, N]`` and
    ``v [B, T, H, Dh]``; returns ``(out [B, T, H, Dh] fp32, LinearAttentionCache)``."""
    v1 = jnp.concatenate([v.astype(jnp.float32), jnp.ones(v.shape[:-1] + (1,), jnp.float32)], -1)
    s0 = None if h0 is None else jnp.concatenate([h0.s, h0.z[..., None]], axis=-1)
    o, s = matrix_recurrence(fq, fk, v1, None, h0=s0, segment_ids=segment_ids, impl=impl, chunk=chunk)
    out = o[..., :-1] / (o[..., -1:] + eps)
    return out, LinearAttentionCache(s[..., :-1], s[..., -1])


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig(MixerConfig):
    """Causal linear attention with ``phi = elu + 1`` (Katharopoulos et al. 2020)."""
    kind: ClassVar[str] = "linear_attention"
    n_heads: int = 4
    head_dim: int | None = None     # None: d_model // n_heads
    eps: float = 1e-6
    impl: str = "chunked"           # one of MATRIX_IMPLS
    chunk: int = 64

    def dh(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // self.n_heads

    def n_feat(self, d_model: int) -> int:
        return self.dh(d_model)

    def validate(self, d_model: int, path: str = "linear_attention") -> None:
        positive(f"{path}.n_heads", self.n_heads)
        positive(f"{path}.head_dim", self.head_dim, allow_none=True)
        one_of(f"{path}.impl", self.impl, MATRIX_IMPLS)
        check_chunk(f"{path}.chunk", self.chunk)
        if self.head_dim is None and d_model % self.n_heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by {path}.n_heads="
                             f"{self.n_heads} (or set {path}.head_dim explicitly)")
        if not self.eps > 0:
            raise ValueError(f"{path}.eps={self.eps} must be > 0")
        if not self.causal:
            raise ValueError(f"{path}.causal=False is not supported (only the causal prefix-sum form)")

    def make(self, d_model, dtype, param_dtype, name=None):
        return LinearAttention(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        h, n, dh = self.n_heads, self.n_feat(d_model), self.dh(d_model)
        return LinearAttentionCache(jnp.zeros((batch, h, n, dh), jnp.float32),
                                    jnp.zeros((batch, h, n), jnp.float32))


@dataclasses.dataclass(frozen=True)
class PerformerConfig(LinearAttentionConfig):
    """Performer FAVOR+ causal attention. ``n_features=None``: ``round(Dh ln Dh)`` (the
    paper's default ``m = Theta(d log d)``)."""
    kind: ClassVar[str] = "performer"
    n_features: int | None = None
    orthogonal: bool = True
    redraw: bool = True

    def n_feat(self, d_model: int) -> int:
        if self.n_features is not None:
            return self.n_features
        dh = self.dh(d_model)
        return max(1, round(dh * math.log(dh)))

    def validate(self, d_model: int, path: str = "performer") -> None:
        super().validate(d_model, path)
        positive(f"{path}.n_features", self.n_features, allow_none=True)

    def make(self, d_model, dtype, param_dtype, name=None):
        return LinearAttention(self, d_model, dtype, param_dtype, name=name)


class LinearAttention(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new LinearAttentionCache or None); the feature map is
    elu+1 for :class:`LinearAttentionConfig`, FAVOR+ for :class:`PerformerConfig`."""
    cfg: LinearAttentionConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache: LinearAttentionCache | None = None, train: bool = False):
        cfg = self.cfg
        h, dh = cfg.n_heads, cfg.dh(self.d_model)
        bsz, t, _ = x.shape
        mk = lambda f, axes, name: dense(f, axes, self.dtype, self.param_dtype, name)
        q = mk(h * dh, ("embed", "heads"), "q")(x).reshape(bsz, t, h, dh)
        k = mk(h * dh, ("embed", "heads"), "k")(x).reshape(bsz, t, h, dh)
        v = mk(h * dh, ("embed", "heads"), "v")(x).reshape(bsz, t, h, dh)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "heads", "head_dim"))
        if isinstance(cfg, PerformerConfig):
            w = self.performer_projection(dh, train)
            scale = dh ** -0.25
            fq = favor_features(q.astype(jnp.float32) * scale, w, is_query=True)
            fk = favor_features(k.astype(jnp.float32) * scale, w, is_query=False)
        else:
            fq, fk = elu_feature_map(q), elu_feature_map(k)
        out, state = kernel_attention(fq, fk, v, eps=cfg.eps, h0=cache, segment_ids=segment_ids,
                                      impl=cfg.impl, chunk=cfg.chunk)
        out = out.reshape(bsz, t, h * dh).astype(self.dtype)
        y = mk(self.d_model, ("heads", "embed"), "o")(out)
        return y, (None if cache is None else state)

    def performer_projection(self, dh: int, train: bool) -> Array:
        cfg = self.cfg
        n = cfg.n_feat(self.d_model)
        fixed = self.variable(STATE_COLLECTION, "projection", lambda: orthogonal_gaussian(
            self.make_rng("params"), n, dh, cfg.orthogonal))
        if not (train and cfg.redraw):
            return fixed.value
        if not self.has_rng("features"):
            raise ValueError("performer with redraw=True and train=True needs the 'features' RNG "
                             "stream: apply(..., rngs={'features': key}) (or set redraw=False)")
        return orthogonal_gaussian(self.make_rng("features"), n, dh, cfg.orthogonal)
