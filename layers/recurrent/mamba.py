"""Mamba: the selective SSM block (Gu & Dao 2023, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces").

The block (Sec. 3.4, Fig. 3) on ``x [B, T, D]`` with ``Di = expand * D``::

    (u, z)  = in_proj(x)                                  # [B, T, Di] each
    u       = SiLU(conv1d(u))                             # causal depthwise, kernel d_conv
    (dt_low, B, C) = x_proj(u)                            # [R], [N], [N]; R = dt_rank
    Delta   = softplus(dt_proj(dt_low))                   # [B, T, Di]  (Alg. 2: tau_Delta(Param + s_Delta(x)))
    A       = -exp(A_log)                                 # [Di, N], S4D-real init A_n = -(n + 1)
    Abar    = exp(Delta A)                                # eq. 4 (zero-order hold)
    Bbar    = Delta B                                     # discretization="delta_b" (default)
            = expm1(Delta A) / A * B                      # discretization="zoh" (eq. 4 exactly)
    h_t     = Abar_t h_{t-1} + Bbar_t u_t                 # eq. 2a, state [Di, N] per sequence
    y_t     = C_t h_t + D u_t                             # eq. 2b plus the D skip
    out     = out_proj(y * SiLU(z))

(B and C here are the SSM's input/output matrices, ``bm``/``cm`` in the code, not the
batch or chunk length.) The default ``Bbar = Delta B`` is what the authors' kernel, HF
transformers and every released checkpoint compute; ``discretization="zoh"`` is eq. 4
exactly (they differ by O(Delta^2 A)). Jamba (Lieber et al. 2024) RMS-normalizes
Delta_low, B and C right after ``x_proj`` (``dt_bc_norm=True``, eps ``dt_bc_norm_eps``);
``proj_bias`` adds biases to ``in_proj``/``out_proj`` (HF's ``use_bias``). Initialization follows
Sec. 3.6 / App. D: ``dt_proj`` bias = softplus^-1(Delta0) with Delta0 log-uniform in
[dt_min, dt_max] (floored at dt_init_floor), ``dt_proj`` kernel
uniform(+-dt_rank^-0.5 * dt_scale), ``D = 1``, conv1d PyTorch-default uniform(+-1/sqrt(d_conv)).

Parallel form (``scan_impl="associative"``): ``jax.lax.associative_scan`` over
``[B, C, Di, N]`` inside chunks of ``scan_chunk`` (= C) tokens, the state carried
between chunks by ``lax.scan``; each chunk is rematerialized in the backward pass, so
memory is O(C Di N) rather than O(T Di N). ``scan_impl="sequential"`` is the
``lax.scan`` reference :func:`selective_scan_ref`. Decode cache = (conv window
[B, d_conv - 1, Di], SSM state [B, Di, N] fp32). Verified in
tests/layers/recurrent/test_linear_mixers.py (forms, decode, packed segments, bf16).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import initializers as init
from layers.contracts import MixerConfig, in_range, no_aux, one_of, positive
from layers.conv import causal_conv, conv_params
from layers.heads import dense
from layers.norms import RMSNorm
from layers.recurrence import linear_scan, segment_resets
from layers.recurrent.common import check_dt, dt_bias_init
from layers.typing import Array, DType

MAMBA_IMPLS = ("associative", "sequential")
DISCRETIZATIONS = ("delta_b", "zoh")


class MambaCache(NamedTuple):
    """conv: [B, d_conv - 1, Di] last conv inputs; ssm: [B, Di, N] fp32 state."""
    conv: Array
    ssm: Array


@dataclasses.dataclass(frozen=True)
class MambaConfig(MixerConfig):
    """Mamba (S6) mixer. ``dt_rank=None`` means ceil(D / 16); ``scan_chunk=0`` runs one
    associative scan over the whole sequence (memory O(T Di N))."""
    kind: ClassVar[str] = "mamba"
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    scan_impl: str = "associative"      # one of MAMBA_IMPLS
    scan_chunk: int = 128
    discretization: str = "delta_b"     # one of DISCRETIZATIONS
    dt_bc_norm: bool = False            # Jamba: RMSNorm on Delta_low, B, C after x_proj
    dt_bc_norm_eps: float = 1e-6
    proj_bias: bool = False             # biases on in_proj / out_proj

    def rank(self, d_model: int) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(d_model / 16)

    def validate(self, d_model: int, path: str = "mamba") -> None:
        for f in ("d_state", "d_conv", "expand"):
            positive(f"{path}.{f}", getattr(self, f))
        positive(f"{path}.dt_rank", self.dt_rank, allow_none=True)
        one_of(f"{path}.scan_impl", self.scan_impl, MAMBA_IMPLS)
        one_of(f"{path}.discretization", self.discretization, DISCRETIZATIONS)
        in_range(f"{path}.dt_bc_norm_eps", self.dt_bc_norm_eps, 0.0, lo_open=True)
        if not isinstance(self.scan_chunk, int) or self.scan_chunk < 0:
            raise ValueError(f"{path}.scan_chunk={self.scan_chunk!r} must be an int >= 0 "
                             "(0: one scan over the whole sequence)")
        check_dt(path, self.dt_min, self.dt_max, self.dt_init_floor)
        if not self.causal:
            raise ValueError(f"{path}.causal=False is not supported: Mamba is a causal recurrence")

    def make(self, d_model, dtype, param_dtype, name=None):
        return Mamba(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        di = self.expand * d_model
        return MambaCache(jnp.zeros((batch, self.d_conv - 1, di), dtype),
                          jnp.zeros((batch, di, self.d_state), jnp.float32))


def _discretize(x, dt, a, bm, keep, zoh=False):
    """Abar = exp(Delta A); Bbar = Delta B, or the exact ZOH expm1(Delta A) / A B (eq. 4).
    x, dt: [B, C, Di]; a: [Di, N]; bm: [B, C, N]; keep: [B, C].
    Returns Abar, Bbar*x: [B, C, Di, N] (Abar zeroed at segment starts)."""
    da = dt[..., None] * a                                     # [B, C, Di, N], <= 0
    abar = jnp.exp(da) * keep[:, :, None, None]
    bbar = jnp.expm1(da) / a if zoh else dt[..., None]
    bx = bbar * bm[:, :, None, :] * x[..., None]
    return abar, bx


def selective_scan_ref(x: Array, dt: Array, a: Array, bm: Array, cm: Array, h0: Array,
                       keep: Array, zoh: bool = False) -> tuple[Array, Array]:
    """The reference: one ``lax.scan`` step per token (fp32 inputs as prepared by
    :func:`selective_scan`; ``keep [B, T]`` is 0 at segment starts)."""
    def step(h, xs):
        xt, dtt, bt, ct, kt = (z[:, None] for z in xs)
        abar, bx = _discretize(xt, dtt, a, bt, kt, zoh)
        h = abar[:, 0] * h + bx[:, 0]
        return h, jnp.einsum("bdn,bn->bd", h, ct[:, 0])
    h_t, y = jax.lax.scan(step, h0, tuple(jnp.moveaxis(z, 1, 0) for z in (x, dt, bm, cm, keep)))
    return jnp.moveaxis(y, 0, 1), h_t


def _selective_scan_chunked(x, dt, a, bm, cm, h0, keep, chunk: int, zoh: bool = False):
    """Associative scans inside chunks of C tokens, the state carried by ``lax.scan``."""
    bsz, t, di = x.shape
    c = t if chunk <= 0 else min(chunk, t)
    nc = -(-t // c)
    pad = nc * c - t
    if pad:  # dt = 0, keep = 1 -> Abar = 1, Bbar = 0: padding leaves the state unchanged
        x, dt, bm, cm = (jnp.pad(z, [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2))
                         for z in (x, dt, bm, cm))
        keep = jnp.pad(keep, ((0, 0), (0, pad)), constant_values=1.0)

    def chunk_fn(h, xs):
        xc, dtc, bc, cc, kc = xs
        abar, bx = _discretize(xc, dtc, a, bc, kc, zoh)        # [B, C, Di, N]
        hs, h_last = linear_scan(abar, bx, h)
        return h_last, jnp.einsum("bcdn,bcn->bcd", hs, cc)

    if nc == 1:
        h_t, y = chunk_fn(h0, (x, dt, bm, cm, keep))
        return y[:, :t], h_t
    # Rematerialize each chunk in the backward pass: only the [B, Di, N] carries are saved.
    xs = tuple(z.reshape((bsz, nc, c) + z.shape[2:]).swapaxes(0, 1) for z in (x, dt, bm, cm, keep))
    h_t, y = jax.lax.scan(jax.checkpoint(chunk_fn), h0, xs)   # y: [NC, B, C, Di]
    return y.swapaxes(0, 1).reshape(bsz, nc * c, di)[:, :t], h_t


def selective_scan(x: Array, dt: Array, a: Array, bm: Array, cm: Array, *,
                   h0: Array | None = None, segment_ids: Array | None = None,
                   chunk: int = 128, scan_impl: str = "associative",
                   discretization: str = "delta_b") -> tuple[Array, Array]:
    """The selective SSM of eqs. 2a/2b/4 (without the D skip).

    Args:
      x, dt: [B, T, Di] input and step size (Delta > 0); a: [Di, N] (< 0);
      bm, cm: [B, T, N] input/output projections; h0: [B, Di, N] initial state;
      segment_ids: None or [B, T] (state reset at segment starts);
      chunk: tokens per associative-scan chunk (0: all of T); scan_impl: one of MAMBA_IMPLS;
      discretization: one of DISCRETIZATIONS.
    Returns:
      ``(y [B, T, Di] fp32, h_T [B, Di, N] fp32)``.
    """
    one_of("scan_impl", scan_impl, MAMBA_IMPLS)
    one_of("discretization", discretization, DISCRETIZATIONS)
    zoh = discretization == "zoh"
    x, dt, a, bm, cm = (z.astype(jnp.float32) for z in (x, dt, a, bm, cm))
    bsz, t, di = x.shape
    keep = 1.0 - segment_resets(segment_ids, bsz, t).astype(jnp.float32)
    h0 = jnp.zeros((bsz, di, a.shape[-1]), jnp.float32) if h0 is None else h0.astype(jnp.float32)
    if scan_impl == "sequential":
        return selective_scan_ref(x, dt, a, bm, cm, h0, keep, zoh)
    return _selective_scan_chunked(x, dt, a, bm, cm, h0, keep, chunk, zoh)


class Mamba(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new MambaCache or None, {})."""
    cfg: MambaConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache: MambaCache | None = None, train: bool = False):
        cfg = self.cfg
        di, n, r = cfg.expand * self.d_model, cfg.d_state, cfg.rank(self.d_model)
        pdt, dt_ = self.param_dtype, self.dtype
        uz = dense(2 * di, ("embed", "mlp"), dt_, pdt, "in_proj", use_bias=cfg.proj_bias)(x)
        u, z = jnp.split(uz, 2, axis=-1)                                   # [B, T, Di]
        u = nn.with_logical_constraint(u, ("batch", "length", "mlp"))
        w, b = conv_params(self, cfg.d_conv, di)
        u, conv_state = causal_conv(u, w, b, None if cache is None else cache.conv, segment_ids)
        u = jax.nn.silu(u)
        dbc = dense(r + 2 * n, ("mlp", "state"), dt_, pdt, "x_proj")(u)
        dt_low, bm, cm = jnp.split(dbc, [r, r + n], axis=-1)              # [R], [N], [N]
        if cfg.dt_bc_norm:
            dt_low, bm, cm = (RMSNorm(cfg.dt_bc_norm_eps, dt_, pdt, name=f"{nm}_norm")(z)
                              for nm, z in (("dt", dt_low), ("b", bm), ("c", cm)))
        dt_proj = nn.Dense(di, dtype=dt_, param_dtype=pdt, name="dt_proj",
                           kernel_init=nn.with_logical_partitioning(
                               init.uniform(r ** -0.5 * cfg.dt_scale), ("state", "mlp")),
                           bias_init=nn.with_logical_partitioning(
                               dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor), ("mlp",)))
        dt = jax.nn.softplus(dt_proj(dt_low).astype(jnp.float32))        # [B, T, Di]
        s4d = jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32))            # A_n = -(n + 1)
        a_log = init.param(self, "A_log", init.constant(s4d), (di, n), ("mlp", "state"))
        d_skip = init.param(self, "D", init.ones, (di,), ("mlp",))
        a = -jnp.exp(a_log.astype(jnp.float32))
        y, h = selective_scan(u, dt, a, bm, cm, h0=None if cache is None else cache.ssm,
                              segment_ids=segment_ids, chunk=cfg.scan_chunk,
                              scan_impl=cfg.scan_impl, discretization=cfg.discretization)
        y = y + u.astype(jnp.float32) * d_skip.astype(jnp.float32)
        y = (y * jax.nn.silu(z.astype(jnp.float32))).astype(dt_)
        y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
        out = dense(self.d_model, ("mlp", "embed"), dt_, pdt, "out_proj", use_bias=cfg.proj_bias)(y)
        new_cache = None if cache is None else MambaCache(conv_state.astype(cache.conv.dtype), h)
        return out, new_cache, no_aux()
