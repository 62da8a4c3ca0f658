"""RetNet: multi-scale retention (Sun et al. 2023, "Retentive Network: A Successor to
Transformer for Large Language Models").

Per head (``Dk = D / H``, value dim ``Dv = value_factor * Dk``, the paper's doubled
value width)::

    Q = (X W_Q) . Theta,  K = (X W_K) . conj(Theta),  V = X W_V     (eq. 5; Theta_n = e^{i n theta}:
                                                                     rotary on q and k, here via
                                                                     layers.positions.apply_rope)
    parallel:    Retention(X) = (Q K^T . D) V,  D_nm = gamma^{n-m} [n >= m]        (eq. 5)
    recurrent:   S_n = gamma S_{n-1} + K_n^T V_n,  Retention(X_n) = Q_n S_n          (eq. 6)
    chunkwise:   intra-chunk (eq. 5) + cross-chunk state R_i = K_i^T (V_i . zeta) + gamma^B R_{i-1}  (eq. 7)
    gamma_h = 1 - 2^(-5 - h),  h = 0..H-1                                             (eq. 8)
    Y = GroupNorm_h(Concat(head_1..head_H)),  MSR(X) = (swish(X W_G) . Y) W_O          (eq. 8)

K is scaled by ``Dk^-0.5`` (Sec. 2.3). The three forms are
``layers.recurrence.matrix_recurrence`` with the constant log-decay ``log gamma_h``
(impl ``parallel`` / ``sequential`` / ``chunked``; all equal, tested). The extra
score normalizations of Sec. 2.3 are omitted: GroupNorm is invariant to the per-row
scale they apply (up to its eps), and fp32 accumulation keeps the unnormalized sums
finite. Decode cache = S [B, H, Dk, Dv] fp32. GroupNorm (per head, affine) lives
here as :class:`HeadNorm` (RWKV-6 uses it too).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.ffn import dense
from layers.mixer import MixerConfig, one_of, positive
from layers.positions import RopeConfig, apply_rope
from layers.recurrence import MATRIX_IMPLS, check_chunk, matrix_recurrence
from layers.typing import Array, DType


class RetNetCache(NamedTuple):
    """state: [B, H, Dk, Dv] fp32 retention state."""
    state: Array


def retnet_log_gammas(n_heads: int) -> Array:
    """``log gamma_h = log(1 - 2^(-5 - h))`` (eq. 8), [H] fp32."""
    return jnp.log1p(-jnp.exp2(-5.0 - jnp.arange(n_heads, dtype=jnp.float32)))


class HeadNorm(nn.Module):
    """GroupNorm with one group per head: normalizes ``x [..., H, Dv]`` over Dv in fp32,
    then a per-channel affine ``[H * Dv]`` (weight 1, bias 0 at init)."""
    eps: float = 1e-5
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h, dv = x.shape[-2:]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("heads", "head_dim")),
                           (h, dv), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")),
                          (h, dv), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class RetNetConfig(MixerConfig):
    """Multi-scale retention with ``n_heads`` heads of key dim ``D / n_heads``."""
    kind: ClassVar[str] = "retnet"
    n_heads: int = 4
    value_factor: int = 2
    rope: RopeConfig = RopeConfig()
    norm_eps: float = 1e-5
    impl: str = "chunked"          # one of MATRIX_IMPLS
    chunk: int = 64

    def dims(self, d_model: int) -> tuple[int, int]:
        dk = d_model // self.n_heads
        return dk, dk * self.value_factor

    def validate(self, d_model: int, path: str = "retnet") -> None:
        positive(f"{path}.n_heads", self.n_heads)
        positive(f"{path}.value_factor", self.value_factor)
        one_of(f"{path}.impl", self.impl, MATRIX_IMPLS)
        check_chunk(f"{path}.chunk", self.chunk)
        if d_model % self.n_heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by {path}.n_heads={self.n_heads}")
        if (d_model // self.n_heads) % 2:
            raise ValueError(f"{path}: key head dim {d_model // self.n_heads} is odd; the rotary "
                             "Theta rotates channel pairs and needs an even head dim")
        self.rope.validate(f"{path}.rope")
        if not self.causal:
            raise ValueError(f"{path}.causal=False is not supported: retention is causal")

    def make(self, d_model, dtype, param_dtype, name=None):
        return RetNet(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        dk, dv = self.dims(d_model)
        return RetNetCache(jnp.zeros((batch, self.n_heads, dk, dv), jnp.float32))


class RetNet(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new RetNetCache or None)."""
    cfg: RetNetConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache: RetNetCache | None = None, train: bool = False):
        cfg = self.cfg
        h = cfg.n_heads
        dk, dv = cfg.dims(self.d_model)
        bsz, t, _ = x.shape
        mk = lambda f, axes, name: dense(f, axes, self.dtype, self.param_dtype, name)
        q = mk(h * dk, ("embed", "heads"), "q")(x).reshape(bsz, t, h, dk)
        k = mk(h * dk, ("embed", "heads"), "k")(x).reshape(bsz, t, h, dk)
        v = mk(h * dv, ("embed", "heads"), "v")(x).reshape(bsz, t, h, dv)
        gate = mk(h * dv, ("embed", "heads"), "g")(x)
        q = apply_rope(q, positions, cfg.rope)
        k = apply_rope(k, positions, cfg.rope).astype(jnp.float32) * dk ** -0.5
        log_gamma = jnp.broadcast_to(retnet_log_gammas(h), (bsz, t, h))
        o, state = matrix_recurrence(q, k, v, log_gamma, h0=None if cache is None else cache.state,
                                     segment_ids=segment_ids, impl=cfg.impl, chunk=cfg.chunk)
        o = HeadNorm(cfg.norm_eps, self.param_dtype, name="group_norm")(o)  # [B, T, H, Dv]
        y = (jax.nn.silu(gate.astype(jnp.float32)) * o.reshape(bsz, t, h * dv)).astype(self.dtype)
        y = nn.with_logical_constraint(y, ("batch", "length", "heads"))
        out = mk(self.d_model, ("heads", "embed"), "o")(y)
        return out, (None if cache is None else RetNetCache(state))
