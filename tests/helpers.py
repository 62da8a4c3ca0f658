"""Shared test helpers: relative RMS error and random inputs."""

import jax
import jax.numpy as jnp
import numpy as np


def rel_rms(a, b) -> float:
    """||a - b||_rms / ||b||_rms in float64 (0 when both are 0)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = np.sqrt(np.mean(b ** 2))
    err = np.sqrt(np.mean((a - b) ** 2))
    return float(err / denom) if denom > 0 else float(err)


def normal(seed: int, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape).astype(dtype)
