"""RWKV-6 "Finch" (Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States
and Dynamic Recurrence", Sec. 4-5): time mixing and channel mixing.

Token shift uses the previous token ``x_{t-1}`` (zero before the first token)::

    lerp_[](a, b)   = a + (b - a) . mu_[]                                  (Finch lerp)
    lora_[](x)      = lambda_[] + tanh(x A_[]) B_[]                        (eq. 14)
    ddlerp_[](a, b) = a + (b - a) . lora_[](a + (b - a) . mu_x)            (eq. 15)

Time mixing (kind ``rwkv6``), per head of size Dh::

    r, k, v, g_pre = ddlerp_{r,k,v,g}(x_t, x_{t-1}) W_{r,k,v,g}
    d_t  = lora_d(ddlerp_d(x_t, x_{t-1}));   w_t = exp(-exp(d_t))         (data-dependent decay)
    wkv_t = diag(u) k_t^T v_t + sum_{i<t} diag(prod_{j=i+1}^{t-1} w_j) k_i^T v_i
    o_t  = concat_h(SiLU(g_t) . GroupNorm(r_t wkv_t)) W_o

i.e. the exclusive matrix recurrence ``S_t = diag(w_t) S_{t-1} + k_t^T v_t``,
``out_t = r_t (S_{t-1} + diag(u) k_t^T v_t)`` of ``layers.recurrence`` (chunked
parallel form for training/prefill, ``lax.scan`` step for decoding). The five
``lora`` of ddlerp share one ``A`` of rank ``5 * mix_rank`` (the reference
implementation's fused ``maa_w1``); the decay LoRA has rank ``decay_rank``.
``exp(d)`` is clamped at ``exp(20)`` (``w`` is then 0 in fp32 either way).

Channel mixing (kind ``rwkv6_channel_mix``)::

    r' = lerp_r'(x_t, x_{t-1}) W_r',  k' = lerp_k'(x_t, x_{t-1}) W_k'
    v' = ReLU(k')^2 W_v',            out = sigmoid(r') . v'                (hidden F = 3.5 D)

**Design choice (documented deviation in structure, not in math).** Channel mixing
needs ``x_{t-1}`` too, so decoding needs state; the FFN contract has no cache. A
block that fused time- and channel-mixing into one mixer would only see ``norm(x)``,
not the residual stream ``x`` that RWKV's channel mix normalizes
(``x' = x + TM(LN1(x)); x'' = x' + CM(LN2(x'))``). So channel mixing is its own
*mixer* with a one-token cache, and an RWKV-6 layer is two blocks with ``ffn=None``:
``BlockSpec(RWKV6Config)`` then ``BlockSpec(RWKV6ChannelMixConfig)`` — exactly the
RWKV residual structure, with prefill + decode == forward.

Initialization follows the reference code at a mid-depth layer (``layer_ratio``:
the init depends on depth there, but scanned layers share one init function):
``mu`` from ``1 - (i/D)^ratio`` curves, decay ``lambda_d`` from ``-6 + 5 (n/(D-1))^(0.7 + 1.3 r)``,
bonus ``u`` from a ramp with a period-3 zigzag, LoRA ``A = 0`` and ``B ~ U(+-0.01)``.
RWKV-7 is not implemented.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.ffn import dense
from layers.mixer import MixerConfig, one_of, positive
from layers.recurrence import MATRIX_IMPLS, check_chunk, matrix_recurrence, segment_resets
from layers.retnet import HeadNorm
from layers.typing import Array, DType


class RWKV6Cache(NamedTuple):
    """shift: [B, D] last input token; wkv: [B, H, Dh, Dh] fp32 state."""
    shift: Array
    wkv: Array


class TokenShiftCache(NamedTuple):
    """shift: [B, D] last input token (channel mixing's only state)."""
    shift: Array


def token_shift(x: Array, prev: Array | None, segment_ids: Array | None) -> Array:
    """``x_{t-1}`` for x [B, T, D]: ``prev [B, D]`` (or zeros) before the first token, zero
    at segment starts."""
    first = jnp.zeros_like(x[:, :1]) if prev is None else prev[:, None].astype(x.dtype)
    xp = jnp.concatenate([first, x[:, :-1]], axis=1)
    if segment_ids is not None:
        resets = segment_resets(segment_ids, x.shape[0], x.shape[1])
        xp = jnp.where(resets[..., None], 0, xp)
    return xp


def _ramp(d: int) -> Array:
    return jnp.arange(d, dtype=jnp.float32) / d


def _const_init(values: Array):
    return lambda key, shape, dtype: jnp.broadcast_to(values, shape).astype(dtype)


def _uniform(bound: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class RWKV6Config(MixerConfig):
    """RWKV-6 time mixing with ``D / head_size`` heads."""
    kind: ClassVar[str] = "rwkv6"
    head_size: int = 64
    mix_rank: int = 32
    decay_rank: int = 64
    layer_ratio: float = 0.5       # depth used for the depth-dependent init, in [0, 1]
    norm_eps: float = 64e-5        # 1e-5 * head_size_divisor^2 (divisor 8), as the reference
    impl: str = "chunked"          # one of MATRIX_IMPLS
    chunk: int = 16                # the per-channel decay costs C^2 Dk per chunk: keep C small

    def validate(self, d_model: int, path: str = "rwkv6") -> None:
        for f in ("head_size", "mix_rank", "decay_rank"):
            positive(f"{path}.{f}", getattr(self, f))
        one_of(f"{path}.impl", self.impl, MATRIX_IMPLS)
        check_chunk(f"{path}.chunk", self.chunk)
        if d_model % self.head_size:
            raise ValueError(f"{path}.head_size={self.head_size} must divide model.d_model={d_model}")
        if not 0.0 <= self.layer_ratio <= 1.0:
            raise ValueError(f"{path}.layer_ratio={self.layer_ratio} must be in [0, 1]")
        if not self.causal:
            raise ValueError(f"{path}.causal=False is not supported: RWKV is a causal recurrence")

    def make(self, d_model, dtype, param_dtype, name=None):
        return RWKV6TimeMix(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        h = d_model // self.head_size
        return RWKV6Cache(jnp.zeros((batch, d_model), dtype),
                          jnp.zeros((batch, h, self.head_size, self.head_size), jnp.float32))


class RWKV6TimeMix(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new RWKV6Cache or None)."""
    cfg: RWKV6Config
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache: RWKV6Cache | None = None, train: bool = False):
        cfg, d, pdt = self.cfg, self.d_model, self.param_dtype
        hs = cfg.head_size
        h = d // hs
        bsz, t, _ = x.shape
        r1 = 1.0 - cfg.layer_ratio                              # "ratio_1_to_almost0"
        r0 = cfg.layer_ratio                                    # "ratio_0_to_1"
        ddd = _ramp(d)
        mu_x = self.param("mu_x", nn.with_logical_partitioning(_const_init(1 - ddd ** r1), ("embed",)),
                          (d,), pdt)
        mu0 = jnp.stack([1 - ddd ** r1,                         # w
                         1 - ddd ** r1,                         # k
                         1 - (ddd ** r1 + 0.3 * r0),            # v
                         1 - ddd ** (0.5 * r1),                 # r
                         1 - ddd ** (0.5 * r1)])                # g
        mu = self.param("mu", nn.with_logical_partitioning(_const_init(mu0), (None, "embed")), (5, d), pdt)
        a_mix = self.param("mix_A", nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)),
                           (d, 5 * cfg.mix_rank), pdt)
        b_mix = self.param("mix_B", nn.with_logical_partitioning(_uniform(0.01), (None, None, "embed")),
                           (5, cfg.mix_rank, d), pdt)
        n = jnp.arange(d, dtype=jnp.float32) / max(d - 1, 1)
        lam_d = self.param("decay_lambda", nn.with_logical_partitioning(
            _const_init(-6 + 5 * n ** (0.7 + 1.3 * r0)), ("embed",)), (d,), pdt)
        a_dec = self.param("decay_A", nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)),
                           (d, cfg.decay_rank), pdt)
        b_dec = self.param("decay_B", nn.with_logical_partitioning(_uniform(0.01), (None, "embed")),
                           (cfg.decay_rank, d), pdt)
        zigzag = ((jnp.arange(d) + 1) % 3 - 1).astype(jnp.float32) * 0.1
        u = self.param("bonus", nn.with_logical_partitioning(
            _const_init((r0 * (1 - n) + zigzag).reshape(h, hs)), ("heads", "head_dim")), (h, hs), pdt)

        f32 = lambda a: a.astype(jnp.float32)
        xf = f32(x)
        dx = f32(token_shift(x, None if cache is None else cache.shift, segment_ids)) - xf
        xxx = xf + dx * f32(mu_x)
        m = jnp.tanh(xxx @ f32(a_mix)).reshape(bsz, t, 5, cfg.mix_rank)
        m = jnp.einsum("btfr,frd->btfd", m, f32(b_mix)) + f32(mu)            # lora (eq. 14)
        xw, xk, xv, xr, xg = (xf + dx * m[:, :, i] for i in range(5))       # ddlerp (eq. 15)
        mk = lambda name, z: dense(d, ("embed", "heads"), self.dtype, pdt, name)(z.astype(self.dtype))
        r = mk("receptance", xr).reshape(bsz, t, h, hs)
        k = mk("key", xk).reshape(bsz, t, h, hs)
        v = mk("value", xv).reshape(bsz, t, h, hs)
        g = jax.nn.silu(f32(mk("gate", xg)))
        dd = f32(lam_d) + jnp.tanh(xw @ f32(a_dec)) @ f32(b_dec)            # lora_d
        log_w = -jnp.exp(jnp.minimum(dd, 20.0)).reshape(bsz, t, h, hs)      # log w_t, <= 0
        wkv, state = matrix_recurrence(r, k, v, log_w, bonus=u, h0=None if cache is None else cache.wkv,
                                       segment_ids=segment_ids, impl=cfg.impl, chunk=cfg.chunk)
        o = HeadNorm(cfg.norm_eps, pdt, name="ln_x")(wkv).reshape(bsz, t, d) * g
        o = nn.with_logical_constraint(o.astype(self.dtype), ("batch", "length", "heads"))
        y = dense(d, ("heads", "embed"), self.dtype, pdt, "output")(o)
        new_cache = None if cache is None else RWKV6Cache(x[:, -1].astype(cache.shift.dtype), state)
        return y, new_cache


@dataclasses.dataclass(frozen=True)
class RWKV6ChannelMixConfig(MixerConfig):
    """RWKV-6 channel mixing as a mixer (it needs the previous token); ``hidden=None``:
    3.5 * D rounded up to a multiple of 32."""
    kind: ClassVar[str] = "rwkv6_channel_mix"
    hidden: int | None = None
    layer_ratio: float = 0.5

    def hidden_dim(self, d_model: int) -> int:
        if self.hidden is not None:
            return self.hidden
        return 32 * (-(-int(3.5 * d_model) // 32))

    def validate(self, d_model: int, path: str = "rwkv6_channel_mix") -> None:
        positive(f"{path}.hidden", self.hidden, allow_none=True)
        if not 0.0 <= self.layer_ratio <= 1.0:
            raise ValueError(f"{path}.layer_ratio={self.layer_ratio} must be in [0, 1]")
        if not self.causal:
            raise ValueError(f"{path}.causal=False is not supported: the token shift is causal")

    def make(self, d_model, dtype, param_dtype, name=None):
        return RWKV6ChannelMix(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        return TokenShiftCache(jnp.zeros((batch, d_model), dtype))


class RWKV6ChannelMix(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new TokenShiftCache or None)."""
    cfg: RWKV6ChannelMixConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache: TokenShiftCache | None = None, train: bool = False):
        d, pdt, f = self.d_model, self.param_dtype, self.cfg.hidden_dim(self.d_model)
        ddd = _ramp(d) ** (1.0 - self.cfg.layer_ratio)
        mu_k = self.param("mu_k", nn.with_logical_partitioning(_const_init(1 - ddd), ("embed",)), (d,), pdt)
        mu_r = self.param("mu_r", nn.with_logical_partitioning(_const_init(1 - ddd), ("embed",)), (d,), pdt)
        xf = x.astype(jnp.float32)
        dx = token_shift(x, None if cache is None else cache.shift, segment_ids).astype(jnp.float32) - xf
        xk = (xf + dx * mu_k.astype(jnp.float32)).astype(self.dtype)
        xr = (xf + dx * mu_r.astype(jnp.float32)).astype(self.dtype)
        kk = dense(f, ("embed", "mlp"), self.dtype, pdt, "key")(xk)
        kk = jnp.square(jax.nn.relu(kk))
        kk = nn.with_logical_constraint(kk, ("batch", "length", "mlp"))
        vv = dense(d, ("mlp", "embed"), self.dtype, pdt, "value")(kk)
        rr = dense(d, ("embed", None), self.dtype, pdt, "receptance")(xr)
        y = jax.nn.sigmoid(rr.astype(jnp.float32)) * vv.astype(jnp.float32)
        new_cache = None if cache is None else TokenShiftCache(x[:, -1].astype(cache.shift.dtype))
        return y.astype(self.dtype), new_cache
