"""Mamba-2: the SSD layer (Dao & Gu 2024, "Transformers are SSMs: Generalized Models
and Efficient Algorithms Through Structured State Space Duality").

Selective SSM with a *scalar* decay per head (the SSD restriction, Sec. 3-4): for
head h with state ``S [N, P]`` (``P = headdim``)::

    S_t = exp(Delta_t A_h) S_{t-1} + B_t (Delta_t x_t)^T      (eq. 1 with A_t = a_t I)
    y_t = C_t^T S_t + D_h x_t

B and C are shared by the heads of a group (``n_groups``, the multi-input / GQA-like
head pattern of Sec. 7.2). The block (Sec. 7.1, Fig. 6 "parallel projections"):
one ``in_proj`` produces ``(z, x, B, C, dt)``; ``x, B, C`` pass a causal depthwise
conv1d + SiLU; ``Delta = softplus(dt + dt_bias)``; ``A = -exp(A_log)`` (A init
uniform in [1, 16]); the SSD output gets the ``D`` skip, then the extra gated
normalization ``RMSNorm(y * SiLU(z))`` (grouped per ``n_groups``, Sec. 7.1) and
``out_proj``. ``dt_bias`` is initialized like Mamba (Delta log-uniform in
[dt_min, dt_max]).

The SSD algorithm (Sec. 6, the block decomposition of the semiseparable matrix):
``layers.recurrence.matrix_recurrence_chunked`` with q = C, k = B, v = Delta x and
log-decay Delta A: masked ``[C, C]`` matmuls inside chunks ("diagonal blocks"),
chunk states passed by a scan ("off-diagonal low-rank blocks"). ``impl`` selects
the same function computed as ``associative`` (scan over ``[B, T, H, N, P]``
states), ``sequential`` (``lax.scan`` reference) or ``parallel`` (quadratic
"attention" dual). Decode cache = (conv window, SSM state [B, H, N, P] fp32).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.conv import causal_conv
from layers.ffn import dense
from layers.mamba import check_dt, conv_params, dt_bias_init
from layers.mixer import MixerConfig, one_of, positive
from layers.recurrence import MATRIX_IMPLS, check_chunk, matrix_recurrence
from layers.typing import Array, DType


class Mamba2Cache(NamedTuple):
    """conv: [B, d_conv - 1, Di + 2 G N]; ssm: [B, H, N, P] fp32."""
    conv: Array
    ssm: Array


@dataclasses.dataclass(frozen=True)
class Mamba2Config(MixerConfig):
    """Mamba-2 mixer: ``Di = expand * D`` split into ``H = Di / headdim`` heads."""
    kind: ClassVar[str] = "mamba2"
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    n_groups: int = 1
    a_init_min: float = 1.0
    a_init_max: float = 16.0
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    norm_eps: float = 1e-5
    impl: str = "chunked"          # one of MATRIX_IMPLS
    chunk: int = 64

    def heads(self, d_model: int) -> int:
        return self.expand * d_model // self.headdim

    def validate(self, d_model: int, path: str = "mamba2") -> None:
        for f in ("d_state", "d_conv", "expand", "headdim", "n_groups"):
            positive(f"{path}.{f}", getattr(self, f))
        one_of(f"{path}.impl", self.impl, MATRIX_IMPLS)
        check_chunk(f"{path}.chunk", self.chunk)
        check_dt(path, self.dt_min, self.dt_max, self.dt_init_floor)
        di = self.expand * d_model
        if di % self.headdim:
            raise ValueError(f"{path}.headdim={self.headdim} must divide the inner width "
                             f"expand * d_model = {di}")
        if self.heads(d_model) % self.n_groups:
            raise ValueError(f"{path}.n_groups={self.n_groups} must divide the number of heads "
                             f"{self.heads(d_model)} (= expand * d_model / headdim)")
        if not 0 < self.a_init_min <= self.a_init_max:
            raise ValueError(f"{path}.a_init_min/a_init_max=({self.a_init_min}, {self.a_init_max}) "
                             "must satisfy 0 < min <= max")
        if not self.causal:
            raise ValueError(f"{path}.causal=False is not supported: Mamba-2 is a causal recurrence")

    def make(self, d_model, dtype, param_dtype, name=None):
        return Mamba2(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        di = self.expand * d_model
        conv_dim = di + 2 * self.n_groups * self.d_state
        return Mamba2Cache(jnp.zeros((batch, self.d_conv - 1, conv_dim), dtype),
                           jnp.zeros((batch, self.heads(d_model), self.d_state, self.headdim),
                                     jnp.float32))


def gated_rms_norm(y: Array, z: Array, scale: Array, groups: int, eps: float) -> Array:
    """``RMSNorm(y * SiLU(z))`` over ``groups`` equal channel groups (fp32). y, z: [B, T, Di]."""
    h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    hg = h.reshape(h.shape[:-1] + (groups, -1))
    hg = hg * jax.lax.rsqrt(jnp.mean(hg * hg, axis=-1, keepdims=True) + eps)
    return hg.reshape(h.shape) * scale.astype(jnp.float32)


class Mamba2(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new Mamba2Cache or None)."""
    cfg: Mamba2Config
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache: Mamba2Cache | None = None, train: bool = False):
        cfg = self.cfg
        di, n, g, p = cfg.expand * self.d_model, cfg.d_state, cfg.n_groups, cfg.headdim
        h = cfg.heads(self.d_model)
        pdt, dt_ = self.param_dtype, self.dtype
        bsz, t, _ = x.shape
        proj = dense(2 * di + 2 * g * n + h, ("embed", "mlp"), dt_, pdt, "in_proj")(x)
        z, xbc, dt = jnp.split(proj, [di, 2 * di + 2 * g * n], axis=-1)
        w, b = conv_params(self, cfg.d_conv, di + 2 * g * n, pdt)
        xbc, conv_state = causal_conv(xbc, w, b, None if cache is None else cache.conv, segment_ids)
        xbc = jax.nn.silu(xbc)
        xs, bm, cm = jnp.split(xbc, [di, di + g * n], axis=-1)
        xs = xs.reshape(bsz, t, h, p)                                   # [B, T, H, P]
        bm, cm = bm.reshape(bsz, t, g, n), cm.reshape(bsz, t, g, n)     # [B, T, G, N]
        xs = nn.with_logical_constraint(xs, ("batch", "length", "heads", "head_dim"))

        dt_bias = self.param("dt_bias", nn.with_logical_partitioning(
            dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor), ("heads",)), (h,), pdt)
        lo, hi = cfg.a_init_min, cfg.a_init_max
        a_init = lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)
                                                   ).astype(dtype)
        a_log = self.param("A_log", nn.with_logical_partitioning(a_init, ("heads",)), (h,), pdt)
        d_skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, ("heads",)), (h,), pdt)
        delta = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))  # [B, T, H]
        a = -jnp.exp(a_log.astype(jnp.float32))
        xf = xs.astype(jnp.float32)
        y, state = matrix_recurrence(cm, bm, xf * delta[..., None], delta * a,
                                     h0=None if cache is None else cache.ssm,
                                     segment_ids=segment_ids, impl=cfg.impl, chunk=cfg.chunk)
        y = y + xf * d_skip.astype(jnp.float32)[:, None]
        scale = self.param("norm_scale", nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
                           (di,), pdt)
        y = gated_rms_norm(y.reshape(bsz, t, di), z, scale, g, cfg.norm_eps).astype(dt_)
        y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
        out = dense(self.d_model, ("mlp", "embed"), dt_, pdt, "out_proj")(y)
        return out, (None if cache is None else Mamba2Cache(conv_state.astype(cache.conv.dtype), state))

