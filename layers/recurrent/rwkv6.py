"""RWKV-6 "Finch" (Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States
and Dynamic Recurrence", Sec. 4-5): time mixing (a mixer) and channel mixing (an FFN).

Token shift uses the previous token ``x_{t-1}`` (zero before the first token)::

    lerp_[](a, b)   = a + (b - a) . mu_[]                                  (Finch lerp)
    lora_[](x)      = lambda_[] + tanh(x A_[]) B_[]                        (eq. 14)
    ddlerp_[](a, b) = a + (b - a) . lora_[](a + (b - a) . mu_x)            (eq. 15)

Time mixing (kind ``rwkv6``), per head of size Dh (``head_dim``)::

    r, k, v, g_pre = ddlerp_{r,k,v,g}(x_t, x_{t-1}) W_{r,k,v,g}
    d_t  = lora_d(ddlerp_d(x_t, x_{t-1}));   w_t = exp(-exp(d_t))         (data-dependent decay)
    wkv_t = diag(u) k_t^T v_t + sum_{i<t} diag(prod_{j=i+1}^{t-1} w_j) k_i^T v_i
    o_t  = concat_h(SiLU(g_t) . GroupNorm(r_t wkv_t)) W_o

i.e. the exclusive matrix recurrence ``S_t = diag(w_t) S_{t-1} + k_t^T v_t``,
``out_t = r_t (S_{t-1} + diag(u) k_t^T v_t)`` of ``layers.recurrence`` (chunked
parallel form for training/prefill, ``lax.scan`` step for decoding). The five
``lora`` of ddlerp share one ``A`` of rank ``5 * mix_rank`` (the reference
implementation's fused ``maa_w1``); the decay LoRA has rank ``decay_rank``.
``exp(d)`` is clamped at ``exp(20)`` (``w`` is then 0 in fp32 either way). The
r/k/v/g projections are ``layers.heads.project_heads`` (``[D, H, Dh]``), the output
``project_out`` (``[H, Dh, D]``), the GroupNorm ``layers.norms.HeadNorm``.

Channel mixing (kind ``rwkv6_channel_mix``, an FFN)::

    r' = lerp_r'(x_t, x_{t-1}) W_r',  k' = lerp_k'(x_t, x_{t-1}) W_k'
    v' = ReLU(k')^2 W_v',            out = sigmoid(r') . v'                (hidden F = 3.5 D)

It needs ``x_{t-1}`` too, so it keeps a one-token decode cache through the FFN
contract (``init_cache`` -> :class:`TokenShiftCache`). An RWKV layer is one block
``BlockSpec(mixer=RWKV6Config(...), ffn=RWKV6ChannelMixConfig(...))``: the block
computes ``x + TM(LN1 x)`` then ``x + CM(LN2 x)``, exactly RWKV's residual structure.

Initialization follows the reference code at a mid-depth layer (``layer_ratio``:
the init depends on depth there, but scanned layers share one init function):
``mu`` from ``1 - (i/D)^ratio`` curves, decay ``lambda_d`` from ``-6 + 5 (n/(D-1))^(0.7 + 1.3 r)``,
bonus ``u`` from a ramp with a period-3 zigzag, LoRA ``A = 0`` and ``B ~ U(+-0.01)``.
RWKV-7 is not implemented. Verified in tests/layers/recurrent/test_linear_mixers.py.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import initializers as init
from layers.contracts import FeedForwardConfig, MixerConfig, in_range, no_aux, one_of, positive
from layers.heads import dense, project_heads, project_out
from layers.norms import HeadNorm
from layers.recurrence import MATRIX_IMPLS, matrix_recurrence, segment_resets
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


@dataclasses.dataclass(frozen=True)
class RWKV6Config(MixerConfig):
    """RWKV-6 time mixing with ``D / head_dim`` heads."""
    kind: ClassVar[str] = "rwkv6"
    head_dim: int = 64
    mix_rank: int = 32
    decay_rank: int = 64
    layer_ratio: float = 0.5       # depth used for the depth-dependent init, in [0, 1]
    norm_eps: float = 64e-5        # 1e-5 * head_size_divisor^2 (divisor 8), as the reference
    scan_impl: str = "chunked"     # one of MATRIX_IMPLS
    chunk: int = 16                # the per-channel decay costs C^2 Dh per chunk: keep C small

    def validate(self, d_model: int, path: str = "rwkv6") -> None:
        for f in ("head_dim", "mix_rank", "decay_rank", "chunk"):
            positive(f"{path}.{f}", getattr(self, f))
        one_of(f"{path}.scan_impl", self.scan_impl, MATRIX_IMPLS)
        if d_model % self.head_dim:
            raise ValueError(f"{path}.head_dim={self.head_dim} must divide model.d_model={d_model}")
        in_range(f"{path}.layer_ratio", self.layer_ratio, 0.0, 1.0)
        if not self.causal:
            raise ValueError(f"{path}.causal=False is not supported: RWKV is a causal recurrence")

    def make(self, d_model, dtype, param_dtype, name=None):
        return RWKV6TimeMix(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        h = d_model // self.head_dim
        return RWKV6Cache(jnp.zeros((batch, d_model), dtype),
                          jnp.zeros((batch, h, self.head_dim, self.head_dim), jnp.float32))


class _TimeMixParams(NamedTuple):
    """The token-shift, LoRA and decay parameters of time mixing (fp32 views)."""
    mu_x: Array          # [D]
    mu: Array            # [5, D]: lambda of the five ddlerp LoRAs (w, k, v, r, g)
    mix_a: Array         # [D, 5 R]
    mix_b: Array         # [5, R, D]
    decay_lambda: Array  # [D]
    decay_a: Array       # [D, R]
    decay_b: Array       # [R, D]
    bonus: Array         # [H, Dh]


class RWKV6TimeMix(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new RWKV6Cache or None, {})."""
    cfg: RWKV6Config
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache: RWKV6Cache | None = None, train: bool = False):
        cfg, d = self.cfg, self.d_model
        dh = cfg.head_dim
        h = d // dh
        bsz, t, _ = x.shape
        p = self._params(h)
        xf = x.astype(jnp.float32)
        dx = token_shift(x, None if cache is None else cache.shift, segment_ids).astype(jnp.float32) - xf
        m = jnp.tanh((xf + dx * p.mu_x) @ p.mix_a).reshape(bsz, t, 5, cfg.mix_rank)
        m = jnp.einsum("btfr,frd->btfd", m, p.mix_b) + p.mu                 # lora (eq. 14)
        xw, xk, xv, xr, xg = (xf + dx * m[:, :, i] for i in range(5))      # ddlerp (eq. 15)
        heads = lambda z, name: project_heads(self, z.astype(self.dtype), h, dh, name)
        r, k, v = heads(xr, "receptance"), heads(xk, "key"), heads(xv, "value")  # [B, T, H, Dh]
        g = jax.nn.silu(heads(xg, "gate").astype(jnp.float32))
        dd = p.decay_lambda + jnp.tanh(xw @ p.decay_a) @ p.decay_b          # lora_d
        log_w = -jnp.exp(jnp.minimum(dd, 20.0)).reshape(bsz, t, h, dh)     # log w_t, <= 0
        wkv, state = matrix_recurrence(r, k, v, log_w, bonus=p.bonus,
                                       h0=None if cache is None else cache.wkv,
                                       segment_ids=segment_ids, scan_impl=cfg.scan_impl,
                                       chunk=cfg.chunk)
        o = HeadNorm("layernorm", cfg.norm_eps, self.param_dtype, name="ln_x")(wkv) * g
        o = nn.with_logical_constraint(o.astype(self.dtype), ("batch", "length", "heads", "head_dim"))
        y = project_out(self, o, d, "output")
        new_cache = None if cache is None else RWKV6Cache(x[:, -1].astype(cache.shift.dtype), state)
        return y, new_cache, no_aux()

    def _params(self, h: int) -> _TimeMixParams:
        """Creates the parameters with the reference code's depth-dependent init."""
        cfg, d = self.cfg, self.d_model
        r1 = 1.0 - cfg.layer_ratio                              # "ratio_1_to_almost0"
        r0 = cfg.layer_ratio                                    # "ratio_0_to_1"
        ddd = _ramp(d)
        mu0 = jnp.stack([1 - ddd ** r1,                         # w
                         1 - ddd ** r1,                         # k
                         1 - (ddd ** r1 + 0.3 * r0),            # v
                         1 - ddd ** (0.5 * r1),                 # r
                         1 - ddd ** (0.5 * r1)])                # g
        n = jnp.arange(d, dtype=jnp.float32) / max(d - 1, 1)
        zigzag = ((jnp.arange(d) + 1) % 3 - 1).astype(jnp.float32) * 0.1
        mk = lambda name, fn, shape, axes: init.param(self, name, fn, shape, axes).astype(jnp.float32)
        return _TimeMixParams(
            mu_x=mk("mu_x", init.constant(1 - ddd ** r1), (d,), ("embed",)),
            mu=mk("mu", init.constant(mu0), (5, d), (None, "embed")),
            mix_a=mk("mix_A", init.zeros, (d, 5 * cfg.mix_rank), ("embed", None)),
            mix_b=mk("mix_B", init.uniform(0.01), (5, cfg.mix_rank, d), (None, None, "embed")),
            decay_lambda=mk("decay_lambda", init.constant(-6 + 5 * n ** (0.7 + 1.3 * r0)), (d,),
                            ("embed",)),
            decay_a=mk("decay_A", init.zeros, (d, cfg.decay_rank), ("embed", None)),
            decay_b=mk("decay_B", init.uniform(0.01), (cfg.decay_rank, d), (None, "embed")),
            bonus=mk("bonus", init.constant((r0 * (1 - n) + zigzag).reshape(h, -1)),
                     (h, cfg.head_dim), ("heads", "head_dim")))


@dataclasses.dataclass(frozen=True)
class RWKV6ChannelMixConfig(FeedForwardConfig):
    """RWKV-6 channel mixing, an FFN with a one-token decode cache; ``hidden=None``:
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
        in_range(f"{path}.layer_ratio", self.layer_ratio, 0.0, 1.0)

    def make(self, d_model, dtype, param_dtype, name=None):
        return RWKV6ChannelMix(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        return TokenShiftCache(jnp.zeros((batch, d_model), dtype))


class RWKV6ChannelMix(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new TokenShiftCache or None, {})."""
    cfg: RWKV6ChannelMixConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array | None = None,
                 segment_ids: Array | None = None, cache: TokenShiftCache | None = None,
                 train: bool = False):
        d, pdt, f = self.d_model, self.param_dtype, self.cfg.hidden_dim(self.d_model)
        ddd = _ramp(d) ** (1.0 - self.cfg.layer_ratio)
        mu_k = init.param(self, "mu_k", init.constant(1 - ddd), (d,), ("embed",))
        mu_r = init.param(self, "mu_r", init.constant(1 - ddd), (d,), ("embed",))
        xf = x.astype(jnp.float32)
        dx = token_shift(x, None if cache is None else cache.shift, segment_ids).astype(jnp.float32) - xf
        xk = (xf + dx * mu_k.astype(jnp.float32)).astype(self.dtype)
        xr = (xf + dx * mu_r.astype(jnp.float32)).astype(self.dtype)
        kk = jnp.square(jax.nn.relu(dense(f, ("embed", "mlp"), self.dtype, pdt, "key")(xk)))
        kk = nn.with_logical_constraint(kk, ("batch", "length", "mlp"))       # [B, T, F]
        vv = dense(d, ("mlp", "embed"), self.dtype, pdt, "value")(kk)
        rr = dense(d, ("embed", None), self.dtype, pdt, "receptance")(xr)
        y = jax.nn.sigmoid(rr.astype(jnp.float32)) * vv.astype(jnp.float32)
        new_cache = None if cache is None else TokenShiftCache(x[:, -1].astype(cache.shift.dtype))
        return y.astype(self.dtype), new_cache, no_aux()
