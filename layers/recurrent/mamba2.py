"""Mamba-2: the SSD layer (Dao & Gu 2024, "Transformers are SSMs: Generalized Models
and Efficient Algorithms Through Structured State Space Duality").

Selective SSM with a *scalar* decay per head (the SSD restriction, Sec. 3-4): for
SSM head h with state ``S [N, Dh]`` (``Dh = head_dim``, the width of x per head)::

    S_t = exp(Delta_t A_h) S_{t-1} + B_t (Delta_t x_t)^T      (eq. 1 with A_t = a_t I)
    y_t = C_t^T S_t + D_h x_t

B and C (the SSM's input/output matrices, ``bm``/``cm`` in the code) have
``n_bc_heads`` (= K) heads, each shared by ``G = H / K`` SSM heads like the kv heads
of GQA (the paper's "groups", the multi-input head pattern of Sec. 7.2). The block
(Sec. 7.1, Fig. 6 "parallel projections"): one ``in_proj`` produces
``(z, x, B, C, dt)``; ``x, B, C`` pass a causal depthwise conv1d + SiLU;
``Delta = softplus(dt + dt_bias)``; ``A = -exp(A_log)`` (A init uniform in [1, 16]);
the SSD output gets the ``D`` skip, then the extra gated normalization
``RMSNorm(y * SiLU(z))`` (normalized per B/C head, Sec. 7.1;
``layers.norms.gated_rms_norm``) and ``out_proj``. ``dt_bias`` is initialized like
Mamba (Delta log-uniform in [dt_min, dt_max]).

The SSD algorithm (Sec. 6, the block decomposition of the semiseparable matrix):
``layers.recurrence.matrix_recurrence`` with q = C, k = B, v = Delta x and log-decay
Delta A: masked ``[C, C]`` matmuls inside chunks ("diagonal blocks"), chunk states
passed by a scan ("off-diagonal low-rank blocks"). ``scan_impl`` selects the same
function computed as ``chunked`` (default), ``associative`` (scan over
``[B, T, H, N, Dh]`` states), ``sequential`` (``lax.scan`` reference) or ``parallel``
(quadratic "attention" dual). Decode cache = (conv window, SSM state [B, H, N, Dh]
fp32). Verified in tests/layers/recurrent/test_linear_mixers.py.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import initializers as init
from layers.contracts import MixerConfig, no_aux, one_of, positive
from layers.conv import causal_conv, conv_params
from layers.heads import dense
from layers.norms import gated_rms_norm
from layers.recurrence import MATRIX_IMPLS, matrix_recurrence
from layers.recurrent.common import check_dt, dt_bias_init
from layers.typing import Array, DType


class Mamba2Cache(NamedTuple):
    """conv: [B, d_conv - 1, Di + 2 K N]; ssm: [B, H, N, Dh] fp32."""
    conv: Array
    ssm: Array


@dataclasses.dataclass(frozen=True)
class Mamba2Config(MixerConfig):
    """Mamba-2 mixer: ``Di = expand * D`` split into ``H = Di / head_dim`` SSM heads,
    with ``n_bc_heads`` heads of B and C."""
    kind: ClassVar[str] = "mamba2"
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_bc_heads: int = 1
    a_init_min: float = 1.0
    a_init_max: float = 16.0
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    norm_eps: float = 1e-5
    scan_impl: str = "chunked"          # one of MATRIX_IMPLS
    chunk: int = 64

    def heads(self, d_model: int) -> int:
        return self.expand * d_model // self.head_dim

    def validate(self, d_model: int, path: str = "mamba2") -> None:
        for f in ("d_state", "d_conv", "expand", "head_dim", "n_bc_heads", "chunk"):
            positive(f"{path}.{f}", getattr(self, f))
        one_of(f"{path}.scan_impl", self.scan_impl, MATRIX_IMPLS)
        check_dt(path, self.dt_min, self.dt_max, self.dt_init_floor)
        di = self.expand * d_model
        if di % self.head_dim:
            raise ValueError(f"{path}.head_dim={self.head_dim} must divide the inner width "
                             f"expand * d_model = {di}")
        if self.heads(d_model) % self.n_bc_heads:
            raise ValueError(f"{path}.n_bc_heads={self.n_bc_heads} must divide the number of "
                             f"SSM heads {self.heads(d_model)} (= expand * d_model / head_dim)")
        if not 0 < self.a_init_min <= self.a_init_max:
            raise ValueError(f"{path}.a_init_min/a_init_max=({self.a_init_min}, {self.a_init_max}) "
                             "must satisfy 0 < min <= max")
        if not self.causal:
            raise ValueError(f"{path}.causal=False is not supported: Mamba-2 is a causal recurrence")

    def make(self, d_model, dtype, param_dtype, name=None):
        return Mamba2(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        conv_dim = self.expand * d_model + 2 * self.n_bc_heads * self.d_state
        return Mamba2Cache(jnp.zeros((batch, self.d_conv - 1, conv_dim), dtype),
                           jnp.zeros((batch, self.heads(d_model), self.d_state, self.head_dim),
                                     jnp.float32))


class Mamba2(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new Mamba2Cache or None, {})."""
    cfg: Mamba2Config
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache: Mamba2Cache | None = None, train: bool = False):
        cfg = self.cfg
        di, n, kh, dh = cfg.expand * self.d_model, cfg.d_state, cfg.n_bc_heads, cfg.head_dim
        h = cfg.heads(self.d_model)
        bsz, t, _ = x.shape
        proj = dense(2 * di + 2 * kh * n + h, ("embed", "mlp"), self.dtype, self.param_dtype,
                     "in_proj")(x)
        z, xbc, dt = jnp.split(proj, [di, 2 * di + 2 * kh * n], axis=-1)
        w, b = conv_params(self, cfg.d_conv, di + 2 * kh * n)
        xbc, conv_state = causal_conv(xbc, w, b, None if cache is None else cache.conv, segment_ids)
        xbc = jax.nn.silu(xbc)
        xs, bm, cm = jnp.split(xbc, [di, di + kh * n], axis=-1)
        xs = xs.reshape(bsz, t, h, dh)                                   # [B, T, H, Dh]
        bm, cm = bm.reshape(bsz, t, kh, n), cm.reshape(bsz, t, kh, n)    # [B, T, K, N]
        xs = nn.with_logical_constraint(xs, ("batch", "length", "heads", "head_dim"))
        delta, a, d_skip = self._ssm_params(dt, h)
        xf = xs.astype(jnp.float32)
        y, state = matrix_recurrence(cm, bm, xf * delta[..., None], delta * a,
                                     h0=None if cache is None else cache.ssm,
                                     segment_ids=segment_ids, scan_impl=cfg.scan_impl,
                                     chunk=cfg.chunk)
        y = y + xf * d_skip[:, None]
        scale = init.param(self, "norm_scale", init.ones, (di,), ("mlp",))
        y = gated_rms_norm(y.reshape(bsz, t, di), z, scale, kh, cfg.norm_eps).astype(self.dtype)
        y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
        out = dense(self.d_model, ("mlp", "embed"), self.dtype, self.param_dtype, "out_proj")(y)
        new_cache = None if cache is None else Mamba2Cache(conv_state.astype(cache.conv.dtype), state)
        return out, new_cache, no_aux()

    def _ssm_params(self, dt: Array, h: int) -> tuple[Array, Array, Array]:
        """``(Delta [B, T, H], A [H] < 0, D [H])`` in fp32 from the projected ``dt [B, T, H]``."""
        cfg = self.cfg
        dt_bias = init.param(self, "dt_bias", dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor),
                             (h,), ("heads",))
        lo, hi = cfg.a_init_min, cfg.a_init_max
        a_init = lambda key, shape, dtype: jnp.log(
            jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)
        a_log = init.param(self, "A_log", a_init, (h,), ("heads",))
        d_skip = init.param(self, "D", init.ones, (h,), ("heads",))
        delta = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        return delta, -jnp.exp(a_log.astype(jnp.float32)), d_skip.astype(jnp.float32)
