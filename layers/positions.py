"""Position schemes: RoPE (Su et al. 2021) in Llama's rotate-half layout with
context extension, xPos (Sun et al. 2022) and ALiBi (Press et al. 2022).

RoPE rotates channel pairs ``(i, i + Dh/2)`` of q and k by ``pos * theta_i`` with
``theta_i = base^(-2i/Dh)``, so the score ``<R(m) q, R(n) k>`` depends on ``m - n``
only. Context extension (all three change only the frequencies/scale):

* ``linear`` position interpolation (Chen et al. 2023): ``pos / factor``.
* ``ntk`` NTK-aware scaling (bloc97 2023): ``base' = base * factor^(Dh / (Dh - 2))``.
* ``yarn`` (Peng et al. 2023, eq. 17-22): frequencies with wavelength ratio
  ``r_i = original_max_len / lambda_i`` below ``beta_slow`` are interpolated by
  ``factor``, above ``beta_fast`` kept, linearly ramped between; q and k are both
  scaled by ``0.1 ln(factor) + 1`` (the paper's sqrt(1/t)).

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

ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE frequencies. ``base`` is theta (Llama-3: 500000)."""
    base: float = 10000.0
    scaling: str = "none"          # one of ROPE_SCALINGS
    factor: float = 1.0            # context extension factor s
    original_max_len: int = 2048   # YaRN: training context of the unscaled model
    beta_fast: float = 32.0        # YaRN ramp ends
    beta_slow: float = 1.0
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
        if self.original_max_len <= 0:
            raise ValueError(f"{path}.original_max_len={self.original_max_len} must be positive")


def rope_frequencies(head_dim: int, cfg: RopeConfig) -> tuple[Array, float]:
    """Returns ``(inv_freq [Dh/2], attention_scale)`` for the configured scheme."""
    half = head_dim // 2
    base = cfg.base
    if cfg.scaling == "ntk":
        base = base * cfg.factor ** (head_dim / (head_dim - 2))
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)
    mscale = 1.0
    if cfg.scaling == "linear":
        inv_freq = inv_freq / cfg.factor
    elif cfg.scaling == "yarn":
        wavelength = 2 * math.pi / inv_freq
        ratio = cfg.original_max_len / wavelength
        ramp = jnp.clip((ratio - cfg.beta_slow) / (cfg.beta_fast - cfg.beta_slow), 0.0, 1.0)
        inv_freq = (1 - ramp) * inv_freq / cfg.factor + ramp * inv_freq
        mscale = 0.1 * math.log(cfg.factor) + 1.0 if cfg.factor > 1 else 1.0
    return inv_freq, mscale


def apply_rope(x: Array, positions: Array, cfg: RopeConfig) -> Array:
    """Rotates ``x [B, T, H, Dh]`` by ``positions [B, T]`` (rotate-half layout), in fp32."""
    dh = x.shape[-1]
    inv_freq, mscale = rope_frequencies(dh, cfg)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    cos = (jnp.cos(angles) * mscale)[:, :, None, :]
    sin = (jnp.sin(angles) * mscale)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : dh // 2], xf[..., dh // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
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
