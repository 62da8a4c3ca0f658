"""RetNet: multi-scale retention (Sun et al. 2023, "Retentive Network: A Successor to
Transformer for Large Language Models").

Per head (``Dh = D / H`` unless ``head_dim`` is set; value dim ``Dv = value_factor * Dh``,
the paper's doubled value width)::

    Q = (X W_Q) . Theta,  K = (X W_K) . conj(Theta),  V = X W_V     (eq. 5; Theta_n = e^{i n theta}:
                                                                     rotary on q and k, here via
                                                                     layers.positions.apply_rope)
    parallel:    Retention(X) = (Q K^T . D) V,  D_nm = gamma^{n-m} [n >= m]        (eq. 5)
    recurrent:   S_n = gamma S_{n-1} + K_n^T V_n,  Retention(X_n) = Q_n S_n          (eq. 6)
    chunkwise:   intra-chunk (eq. 5) + cross-chunk state R_i = K_i^T (V_i . zeta) + gamma^B R_{i-1}  (eq. 7)
    gamma_h = 1 - 2^(-5 - h),  h = 0..H-1                                             (eq. 8)
    Y = GroupNorm_h(Concat(head_1..head_H)),  MSR(X) = (swish(X W_G) . Y) W_O          (eq. 8)

K is scaled by ``Dh^-0.5`` (Sec. 2.3). The three forms are
``layers.recurrence.matrix_recurrence`` with the constant log-decay ``log gamma_h``
(``scan_impl`` ``parallel`` / ``sequential`` / ``chunked``; all equal, tested). The
extra score normalizations of Sec. 2.3 are omitted: GroupNorm is invariant to the
per-row scale they apply (up to its eps), and fp32 accumulation keeps the
unnormalized sums finite. The GroupNorm is ``layers.norms.HeadNorm`` (one group per
head). ``out_norm="rms"`` is the official code's variant instead (torchscale: a per-head RMS
normalization over Dv without affine, the same for every head). Projections: ``layers.heads.project_heads`` (q, k ``[D, H, Dh]``; v and the
gate ``[D, H, Dv]``) and ``project_out`` (``[H, Dv, D]``). Decode cache =
S [B, H, Dh, Dv] fp32. Verified in tests/layers/recurrent/test_linear_mixers.py.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.contracts import MixerConfig, no_aux, one_of, positive
from layers.heads import HeadsConfig, project_heads, project_out
from layers.norms import HeadNorm, rms_normalize
from layers.positions import RopeConfig, apply_rope
from layers.recurrence import MATRIX_IMPLS, matrix_recurrence
from layers.recurrent.common import check_no_kv_heads
from layers.typing import Array, DType


OUT_NORMS = ("groupnorm", "rms")

class RetNetCache(NamedTuple):
    """state: [B, H, Dh, Dv] fp32 retention state."""
    state: Array


def retnet_log_gammas(n_heads: int) -> Array:
    """``log gamma_h = log(1 - 2^(-5 - h))`` (eq. 8), [H] fp32."""
    return jnp.log1p(-jnp.exp2(-5.0 - jnp.arange(n_heads, dtype=jnp.float32)))


@dataclasses.dataclass(frozen=True)
class RetNetConfig(MixerConfig, HeadsConfig):
    """Multi-scale retention with ``n_heads`` heads of key dim ``head_dim`` (None: D / H)."""
    kind: ClassVar[str] = "retnet"
    value_factor: int = 2
    rope: RopeConfig = RopeConfig()
    norm_eps: float = 1e-5
    out_norm: str = "groupnorm"         # one of OUT_NORMS: the paper's GroupNorm or "rms"
    scan_impl: str = "chunked"          # one of MATRIX_IMPLS
    chunk: int = 64

    def dims(self, d_model: int) -> tuple[int, int]:
        """``(Dh, Dv)``."""
        dh = self.head_dim_for(d_model)
        return dh, dh * self.value_factor

    def validate(self, d_model: int, path: str = "retnet") -> None:
        self.validate_heads(d_model, path, even_head_dim="the rotary Theta")
        check_no_kv_heads(self, path, "retention")
        positive(f"{path}.value_factor", self.value_factor)
        positive(f"{path}.chunk", self.chunk)
        one_of(f"{path}.scan_impl", self.scan_impl, MATRIX_IMPLS)
        one_of(f"{path}.out_norm", self.out_norm, OUT_NORMS)
        self.rope.validate(f"{path}.rope")
        if not self.causal:
            raise ValueError(f"{path}.causal=False is not supported: retention is causal")

    def make(self, d_model, dtype, param_dtype, name=None):
        return RetNet(self, d_model, dtype, param_dtype, name=name)

    def init_cache(self, d_model, batch, max_len, dtype):
        dh, dv = self.dims(d_model)
        return RetNetCache(jnp.zeros((batch, self.n_heads, dh, dv), jnp.float32))


class RetNet(nn.Module):
    """x [B, T, D] -> (y [B, T, D], new RetNetCache or None, {})."""
    cfg: RetNetConfig
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 cache: RetNetCache | None = None, train: bool = False):
        cfg = self.cfg
        h = cfg.n_heads
        dh, dv = cfg.dims(self.d_model)
        bsz, t, _ = x.shape
        q = project_heads(self, x, h, dh, "q")                       # [B, T, H, Dh]
        k = project_heads(self, x, h, dh, "k")
        v = project_heads(self, x, h, dv, "v")                       # [B, T, H, Dv]
        gate = project_heads(self, x, h, dv, "g")
        q = apply_rope(q, positions, cfg.rope)
        k = apply_rope(k, positions, cfg.rope).astype(jnp.float32) * dh ** -0.5
        log_gamma = jnp.broadcast_to(retnet_log_gammas(h), (bsz, t, h))
        o, state = matrix_recurrence(q, k, v, log_gamma, h0=None if cache is None else cache.state,
                                     segment_ids=segment_ids, scan_impl=cfg.scan_impl,
                                     chunk=cfg.chunk)
        if cfg.out_norm == "rms":
            o = rms_normalize(o.astype(jnp.float32), cfg.norm_eps)
        else:
            o = HeadNorm("layernorm", cfg.norm_eps, self.param_dtype, name="group_norm")(o)
        y = (jax.nn.silu(gate.astype(jnp.float32)) * o).astype(self.dtype)   # [B, T, H, Dv]
        y = nn.with_logical_constraint(y, ("batch", "length", "heads", "head_dim"))
        out = project_out(self, y, self.d_model, "o")
        return out, (None if cache is None else RetNetCache(state)), no_aux()
