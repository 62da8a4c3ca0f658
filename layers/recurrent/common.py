"""Small pieces shared by several recurrent mixers of this family (kept out of the mixer
files so no mixer imports another):

* the step-size (Delta) parameters of Mamba and Mamba-2 (Gu & Dao 2023, Sec. 3.6 and
  App. D; Dao & Gu 2024 reuse it): the bias of Delta is initialized so that
  ``softplus(bias)`` is log-uniform in ``[dt_min, dt_max]`` (floored at ``dt_init_floor``);
* :func:`check_no_kv_heads`: multi-head recurrent mixers (RetNet, linear attention,
  Performer) keep one state per head and refuse ``n_kv_heads``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def check_dt(path: str, dt_min: float, dt_max: float, floor: float) -> None:
    """``0 < dt_min <= dt_max`` and ``dt_init_floor >= 0``, else ValueError naming the fields."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"{path}.dt_min={dt_min} and {path}.dt_max={dt_max} must satisfy "
                         "0 < dt_min <= dt_max")
    if floor < 0:
        raise ValueError(f"{path}.dt_init_floor={floor} must be >= 0")


def dt_bias_init(dt_min: float, dt_max: float, floor: float):
    """softplus^-1 of Delta0 ~ log-uniform[dt_min, dt_max] (floored): Mamba's dt init."""
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus
    return init


def check_no_kv_heads(cfg, path: str, what: str) -> None:
    """``cfg`` (a ``layers.heads.HeadsConfig``) must leave ``n_kv_heads`` unset (or equal
    to ``n_heads``): ``what`` keeps one state per head."""
    if cfg.kv_heads != cfg.n_heads:
        raise ValueError(f"{path}.n_kv_heads={cfg.n_kv_heads} is not supported: {what} keeps one "
                         f"state per head; leave it None (= n_heads={cfg.n_heads})")
