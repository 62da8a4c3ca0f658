"""Shared pieces of the Mosaic TPU flash attention (``pallas_tpu.py``, ``pallas_tpu_bwd.py``).

Holds the static config ``TpuFlashConfig``; the block bands ``kv_band`` /
``q_band``, tabulated in numpy at trace time and handed to the kernels by scalar
prefetch (for each query block the key blocks it can see, and for each key block
the query blocks that can see it); ``step_block``, the clamped block index the
index maps read; and small helpers (``col``, ``compiler_params``, the
``dot_general`` dimension numbers). The algorithm and what has been verified where
are described in ``pallas_tpu.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class TpuFlashConfig:
    """Static settings: true lengths ``t``/``s`` and the effective (padded-fitting) blocks."""
    t: int
    s: int
    causal: bool
    window: int | None
    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    interpret: Any = None  # None (compile for TPU) or pltpu.InterpretParams


def kv_band(n_q: int, bq: int, n_k: int, bk: int, cfg: TpuFlashConfig):
    """For each query block: (first key block, number of key blocks it can see)."""
    start, count = np.zeros(n_q, np.int32), np.zeros(n_q, np.int32)
    for i in range(n_q):
        q0, q1 = i * bq, min(i * bq + bq, cfg.t) - 1
        lo, hi = 0, cfg.s  # visible keys [lo, hi)
        if cfg.window is not None:
            lo = max(0, q0 - cfg.window + 1)
        if cfg.causal:
            hi = min(hi, q1 + 1)
        elif cfg.window is not None:
            hi = min(hi, q1 + cfg.window)
        b_lo, b_hi = lo // bk, -(-hi // bk)
        start[i] = min(b_lo, n_k - 1)
        count[i] = b_hi - b_lo if hi > lo and q0 < cfg.t else 0  # padding-only block: 0
    return start, count


def q_band(n_k: int, bk: int, n_q: int, bq: int, cfg: TpuFlashConfig):
    """For each key block: (first query block, number of query blocks that can see it)."""
    start, count = np.zeros(n_k, np.int32), np.zeros(n_k, np.int32)
    for j in range(n_k):
        k0, k1 = j * bk, min(j * bk + bk, cfg.s) - 1
        lo, hi = 0, cfg.t  # queries [lo, hi) that see some key of the block
        if cfg.causal:
            lo = k0
        elif cfg.window is not None:
            lo = max(0, k0 - cfg.window + 1)
        if cfg.window is not None:
            hi = min(hi, k1 + cfg.window)
        b_lo, b_hi = lo // bq, -(-hi // bq)
        start[j] = min(b_lo, n_q - 1)
        count[j] = b_hi - b_lo if hi > lo and k0 < cfg.s else 0
    return start, count


def step_block(start_ref, count_ref, blk, step):
    """Block visited at ``step``: clamped to the last needed one (repeat = no new DMA)."""
    return start_ref[blk] + jnp.minimum(step, jnp.maximum(count_ref[blk] - 1, 0))


def col(row_ref):
    """A ``[1, n]`` row ref as an ``[n, 1]`` column value."""
    return row_ref[0][:, None]


def compiler_params(*semantics):
    """Mosaic compiler params with these grid ``dimension_semantics``."""
    return pltpu.CompilerParams(dimension_semantics=semantics)
