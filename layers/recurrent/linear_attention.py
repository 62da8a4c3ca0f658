"""Kernelized linear attention: Katharopoulos et al. 2020 ("Transformers are RNNs")
and Performer FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").

Both replace ``softmax(q k^T)`` by a feature-map kernel ``phi(q)^T phi(k)`` (K et al.
eq. 4-5; the maps are in ``layers.feature_maps``), so causal attention becomes the
prefix sums (K et al. eqs. 10-12, the "RNN form" of Sec. 3.4)::

    S_i = S_{i-1} + phi(k_i) v_i^T,   z_i = z_{i-1} + phi(k_i)
    out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)

computed by ``layers.recurrence.matrix_recurrence`` (no decay) on ``v' = [v, 1]``:
the last output column is the normalizer. Decode state = (S [B, H, N, Dh], z [B, H, N]),
fixed size. Neither paper puts positions inside the kernel: both mixers are
position-agnostic except for causality (use ``BlockSpec.short_conv`` for local order).
Projections: ``layers.heads.project_heads`` (q, k, v ``[D, H, Dh]``) and ``project_out``.

* ``linear_attention``: ``phi(x) = elu(x) + 1`` (K et al. eq. 7), N = Dh; ``feature_map``
  selects ``relu`` or ``identity`` instead (``layers.feature_maps.FEATURE_MAPS``), and
  ``normalize=False`` drops the ``phi(q)^T z`` denominator (``out_i = phi(q_i)^T S_i``,
  the unnormalized form fla and later linear-attention work use; ``identity`` needs it,
  its normalizer can be zero).
* ``performer``: FAVOR+ positive orthogonal random features for
  ``SM(q, k) = exp(q^T k / sqrt(Dh))`` applied to ``x = Dh^-1/4 q`` (and k), N features.

  *Redraws*: the projection is a non-trainable variable in the ``"state"``
  collection (drawn at init from the "params" RNG; scanned layers get different
  draws), used at eval and decode. With ``train=True`` and ``redraw=True`` a fresh
  projection is drawn from the ``"features"`` RNG stream on every call (the train
  loop provides it; fixed key -> deterministic).

Verified in tests/layers/recurrent/test_linear_mixers.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from layers.contracts import MixerConfig, in_range, no_aux, one_of, positive
from layers.feature_maps import FEATURE_MAPS, favor_features, orthogonal_gaussian
from layers.heads import HeadsConfig, project_heads, project_out
from layers.recurrence import MATRIX_IMPLS, matrix_recurrence
from layers.recurrent.common import check_no_kv_heads
from layers.typing import Array, DType

STATE_COLLECTION = "state"   # == archs.model.STATE_COLLECTION (layers may not import archs)


class LinearAttentionCache(NamedTuple):
    """s: [B, H, N, Dh] = sum phi(k) v^T; z: [B, H, N] = sum phi(k) (fp32)."""
    s: Array
    z: Array


def kernel_attention(fq: Array, fk: Array, v: Array, *, eps: float, h0: LinearAttentionCache | None,
                     segment_ids: Array | None, scan_impl: str, chunk: int, normalize: bool = True):
    """Causal kernel attention from features ``fq, fk [B, T, H, N]`` and ``v [B, T, H, Dh]``,
    divided by ``phi(q)^T z + eps`` when ``normalize``; returns ``(out [B, T, H, Dh] fp32,
    LinearAttentionCache)``."""
    v1 = jnp.concatenate([v.astype(jnp.float32), jnp.ones(v.shape[:-1] + (1,), jnp.float32)], -1)
    s0 = None if h0 is None else jnp.concatenate([h0.s, h0.z[..., None]], axis=-1)
    o, s = matrix_recurrence(fq, fk, v1, None, h0=s0, segment_ids=segment_ids,
                             scan_impl=scan_impl, chunk=chunk)
    out = o[..., :-1] / (o[..., -1:] + eps) if normalize else o[..., :-1]
    return out, LinearAttentionCache(s[..., :-1], s[..., -1])


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig(MixerConfig, HeadsConfig):
    """Causal linear attention with ``phi = elu + 1`` (Katharopoulos et al. 2020)."""
    kind: ClassVar[str] = "linear_attention"
    eps: float = 1e-6
    feature_map: str = "elu"            # one of FEATURE_MAPS (linear_attention only)
    normalize: bool = True              # divide by phi(q)^T z
    scan_impl: str = "chunked"          # one of MATRIX_IMPLS
    chunk: int = 64

    def n_feat(self, d_model: int) -> int:
        """N, the feature count of the kernel feature map."""
        return self.head_dim_for(d_model)

    def validate(self, d_model: int, path: str = "linear_attention") -> None:
        self.validate_heads(d_model, path)
        check_no_kv_heads(self, path, self.kind)
        positive(f"{path}.chunk", self.chunk)
        one_of(f"{path}.scan_impl", self.scan_impl, MATRIX_IMPLS)
        in_range(f"{path}.eps", self.eps, 0.0, lo_open=True)
        one_of(f"{path}.feature_map", self.feature_map, tuple(FEATURE_MAPS))
        if self.feature_map == "identity" and self.normalize:
            raise ValueError(f"{path}.feature_map='identity' needs {path}.normalize=False (its "
                             "normalizer phi(q)^T z can be zero or negative)")
        if not self.causal:
            raise ValueError(f"{path}.causal=False is not supported (only the causal prefix-sum form)")

    def make(self, d_model, dtype, param_dtype, name=None):
        return LinearAttention(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        h, n, dh = self.n_heads, self.n_feat(d_model), self.head_dim_for(d_model)
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
        dh = self.head_dim_for(d_model)
        return max(1, round(dh * math.log(dh)))

    def validate(self, d_model: int, path: str = "performer") -> None:
        super().validate(d_model, path)
        positive(f"{path}.n_features", self.n_features, allow_none=True)
        if self.feature_map != "elu":
            raise ValueError(f"{path}.feature_map={self.feature_map!r}: the performer's features "
                             "are FAVOR+; leave feature_map at its default 'elu'")

    def make(self, d_model, dtype, param_dtype, name=None):
        return LinearAttention(self, d_model, dtype, param_dtype, name=name)


class LinearAttention(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new LinearAttentionCache or None, {}); the feature
    map is elu+1 for :class:`LinearAttentionConfig`, FAVOR+ for :class:`PerformerConfig`."""
    cfg: LinearAttentionConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache: LinearAttentionCache | None = None, train: bool = False):
        cfg = self.cfg
        h, dh = cfg.n_heads, cfg.head_dim_for(self.d_model)
        q = project_heads(self, x, h, dh, "q")                       # [B, T, H, Dh]
        k = project_heads(self, x, h, dh, "k")
        v = project_heads(self, x, h, dh, "v")
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "heads", "head_dim"))
        if isinstance(cfg, PerformerConfig):
            w = self.performer_projection(dh, train)                 # [N, Dh]
            scale = dh ** -0.25
            fq = favor_features(q.astype(jnp.float32) * scale, w, is_query=True)
            fk = favor_features(k.astype(jnp.float32) * scale, w, is_query=False)
        else:
            phi = FEATURE_MAPS[cfg.feature_map]
            fq, fk = phi(q), phi(k)                                  # [B, T, H, N]
        out, state = kernel_attention(fq, fk, v, eps=cfg.eps, h0=cache, segment_ids=segment_ids,
                                      scan_impl=cfg.scan_impl, chunk=cfg.chunk,
                                      normalize=cfg.normalize)
        y = project_out(self, out.astype(self.dtype), self.d_model, "o")
        return y, (None if cache is None else state), no_aux()

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
