"""Position schemes: RoPE (Su et al. 2021) in Llama's rotate-half layout with
context extension, xPos (Sun et al. 2022) and ALiBi (Press et al. 2022).

RoPE rotates channel pairs ``(i, i + Dh/2)`` of q and k by ``pos * theta_i`` with
``theta_i = base^(-2i/Dh)``, so the score ``<R(m) q, R(n) k>`` depends on ``m - n``
only. Context extension (HF transformers' ``rope_type`` semantics; only the frequencies/scale change):

* ``linear`` position interpolation (Chen et al. 2023): ``pos / factor``.
* ``ntk`` static NTK-aware scaling (bloc97 2023): ``base' = base * factor^(Dh / (Dh - 2))``.
* ``dynamic`` NTK (HF's ``dynamic``): per call, with ``L = max(max(positions) + 1,
  original_max_len)``, ``base' = base * (factor L / original_max_len - (factor - 1))^(Dh / (Dh - 2))``.
  Length-dependent: a cached decode rotates each new token with its own length's base while
  cached keys keep theirs, exactly like HF's cached generation.
* ``yarn`` (Peng et al. 2023; the reference code and HF): correction dims
  ``d(r) = Dh ln(original_max_len / (2 pi r)) / (2 ln base)``, ``low = floor(d(beta_fast))``,
  ``high = ceil(d(beta_slow))`` clamped to ``[0, Dh - 1]``; ramp ``clip((i - low) / (high - low))``
  over the pair index i; ``inv' = inv / factor * ramp + inv * (1 - ramp)``; q and k are both scaled
  by ``attention_factor`` (default ``0.1 ln(factor) + 1``).
* ``llama3`` (Llama-3.1): wavelengths above ``original_max_len / low_freq_factor`` are divided by
  ``factor``, below ``original_max_len / high_freq_factor`` kept, smoothly interpolated between;
  no attention scale.

``fraction`` < 1 is partial rotary: only the first ``round(fraction * Dh)`` channels of each head
are rotated (in rotate-half layout among themselves), the rest pass through.

xPos multiplies the RoPE-rotated channel pair ``i`` of q by ``zeta_i^(n / gamma)`` and of
k by ``zeta_i^(-m / gamma)`` with ``zeta_i = (i / (Dh/2) + 0.4) / 1.4`` and ``gamma =
xpos_scale_base`` (paper: 512), so the score gains the decay ``zeta_i^((n - m) / gamma)``.
Positions are not re-centred (decoding needs one fixed origin), so the fp32 scale
factors stay finite up to roughly 35 * gamma positions.

Positions are explicit ``[B, T]`` int inputs so decoding (offset positions) and packed
sequences (positions restarting per segment) work.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from layers.typing import Array

ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE frequencies. ``base`` is theta (Llama-3: 500000)."""
    base: float = 10000.0
    scaling: str = "none"          # one of ROPE_SCALINGS
    factor: float = 1.0            # context extension factor s
    original_max_len: int = 2048   # yarn/llama3/dynamic: training context of the unscaled model
    beta_fast: float = 32.0        # YaRN ramp ends
    beta_slow: float = 1.0
    attention_factor: float | None = None  # YaRN q/k scale; None: 0.1 ln(factor) + 1
    low_freq_factor: float = 1.0   # llama3 band edges
    high_freq_factor: float = 4.0
    fraction: float = 1.0          # partial rotary: fraction of the head dim rotated
    xpos_scale_base: float = 512.0  # xPos gamma (used only with position="xpos")

    def validate(self, path: str = "rope") -> None:
        if self.scaling not in ROPE_SCALINGS:
            raise ValueError(f"{path}.scaling={self.scaling!r} is not allowed; choose one of {ROPE_SCALINGS}")
        if self.base <= 1:
            raise ValueError(f"{path}.base={self.base} must be > 1")
        if self.factor < 1:
            raise ValueError(f"{path}.factor={self.factor} must be >= 1 (it extends the context)")
        if self.xpos_scale_base <= 0:
            raise ValueError(f"{path}.xpos_scale_base={self.xpos_scale_base} must be positive")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"{path}.fraction={self.fraction} must be in (0, 1]")
        if self.scaling == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"{path}.low_freq_factor={self.low_freq_factor} must be > 0 and < "
                             f"{path}.high_freq_factor={self.high_freq_factor}")
        if self.original_max_len <= 0:
            raise ValueError(f"{path}.original_max_len={self.original_max_len} must be positive")


def rotary_dim(head_dim: int, cfg: RopeConfig) -> int:
    """Channels rotated per head (even): ``fraction * Dh`` rounded down to an even number."""
    return max(2, int(head_dim * cfg.fraction) // 2 * 2)


def _yarn(inv_freq: Array, dim: int, cfg: RopeConfig) -> tuple[Array, float]:
    def corr(rotations):
        return dim * math.log(cfg.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.base))
    low = max(math.floor(corr(cfg.beta_fast)), 0)
    high = min(math.ceil(corr(cfg.beta_slow)), dim - 1)
    high = high + 0.001 if low == high else high
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    scale = cfg.attention_factor
    if scale is None:
        scale = 0.1 * math.log(cfg.factor) + 1.0 if cfg.factor > 1 else 1.0
    return inv_freq / cfg.factor * ramp + inv_freq * (1 - ramp), scale


def _llama3(inv_freq: Array, cfg: RopeConfig) -> Array:
    wavelen = 2 * math.pi / inv_freq
    old = cfg.original_max_len
    smooth = (old / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    out = jnp.where(wavelen > old / cfg.low_freq_factor, inv_freq / cfg.factor, inv_freq)
    mid = (wavelen >= old / cfg.high_freq_factor) & (wavelen <= old / cfg.low_freq_factor)
    return jnp.where(mid, (1 - smooth) * out / cfg.factor + smooth * out, out)


def rope_frequencies(head_dim: int, cfg: RopeConfig, positions: Array | None = None
                     ) -> tuple[Array, float]:
    """Returns ``(inv_freq [Dr/2], attention_scale)`` for the configured scheme, with
    ``Dr = rotary_dim(head_dim)``. ``dynamic`` needs ``positions`` (its base depends on the
    longest position of the call); without them it is the unscaled base."""
    dim = rotary_dim(head_dim, cfg)
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    base = cfg.base
    if cfg.scaling == "ntk":
        base = base * cfg.factor ** (dim / (dim - 2))
    if cfg.scaling == "dynamic" and positions is not None:
        length = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1, cfg.original_max_len)
        base = base * (cfg.factor * length / cfg.original_max_len - (cfg.factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** exponents)
    if cfg.scaling == "linear":
        return inv_freq / cfg.factor, 1.0
    if cfg.scaling == "yarn":
        return _yarn(inv_freq, dim, cfg)
    if cfg.scaling == "llama3":
        return _llama3(inv_freq, cfg), 1.0
    return inv_freq, 1.0


def apply_rope(x: Array, positions: Array, cfg: RopeConfig) -> Array:
    """Rotates ``x [B, T, H, Dh]`` by ``positions [B, T]`` (rotate-half layout over the first
    ``rotary_dim`` channels), in fp32."""
    dh = x.shape[-1]
    dr = rotary_dim(dh, cfg)
    inv_freq, mscale = rope_frequencies(dh, cfg, positions)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dr/2]
    cos = (jnp.cos(angles) * mscale)[:, :, None, :]
    sin = (jnp.sin(angles) * mscale)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., : dr // 2], xf[..., dr // 2: dr], xf[..., dr:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)


def apply_xpos(x: Array, positions: Array, cfg: RopeConfig, *, key: bool) -> Array:
    """xPos: RoPE (with ``cfg``'s frequencies) times ``zeta^(+-pos / gamma)``; ``key=True``
    for keys (negative exponent). x: [B, T, H, Dh], positions: [B, T]."""
    dh = x.shape[-1]
    zeta = (jnp.arange(dh // 2, dtype=jnp.float32) / (dh // 2) + 0.4) / 1.4       # [Dh/2]
    expo = positions.astype(jnp.float32)[..., None] / cfg.xpos_scale_base * (-1.0 if key else 1.0)
    scale = jnp.power(zeta, expo)                                                 # [B, T, Dh/2]
    scale = jnp.concatenate([scale, scale], axis=-1)[:, :, None, :]
    return (apply_rope(x, positions, cfg).astype(jnp.float32) * scale).astype(x.dtype)


def alibi_slopes(n_heads: int) -> Array:
    """ALiBi head slopes: the geometric sequence ``2^(-8 i / n)``, i = 1..n, for n a power
    of two; otherwise the closest power of two's slopes plus every other slope of the
    next power (Press et al. 2022, appendix). Returns [H] fp32."""
    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    if math.log2(n_heads).is_integer():
        slopes = pow2(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = pow2(closest) + pow2(2 * closest)[0::2][: n_heads - closest]
    return jnp.asarray(slopes, jnp.float32)
