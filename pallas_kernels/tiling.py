"""Tile-size helpers shared by the Pallas kernels (static Python ints only)."""

from __future__ import annotations

from jax.experimental import pallas as pl


def round_up(x: int, m: int) -> int:
    """The smallest multiple of ``m`` that is >= ``x``."""
    return -(-x // m) * m


def tile(size: int, block: int) -> int:
    """Block used for a dim of ``size``: ``block``, or the next power of two >= 16 when the
    dim is smaller (Triton dots need tiles of at least 16)."""
    return min(block, max(16, pl.next_power_of_2(size)))
