"""Tile sizes (static Python ints) and zero padding shared by the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def round_up(x: int, m: int) -> int:
    """The smallest multiple of ``m`` that is >= ``x``."""
    return -(-x // m) * m


def tile(size: int, block: int) -> int:
    """Block used for a dim of ``size``: ``block``, or the next power of two >= 16 when the
    dim is smaller (Triton dots need tiles of at least 16)."""
    return min(block, max(16, pl.next_power_of_2(size)))


def pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``x`` zero-padded at the end of each dim to ``shape`` (no copy when it already fits)."""
    pads = [(0, t - s) for s, t in zip(x.shape, shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x
