"""The parameter initializers of archlab (one set; every layer uses these).

* :func:`fan_in`: truncated normal with variance ``1 / fan_in`` (LeCun normal), the
  default for every projection; ``in_axis``/``out_axis`` name the fan-in axes of
  multi-axis kernels (e.g. ``[D, H, Dh]`` head projections).
* :func:`normal`, :func:`uniform`: fixed scale; :func:`constant`: a fixed array
  (used by initializations that depend on the channel index, e.g. RWKV-6).
* ``zeros``/``ones``: Flax's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.typing import Array

zeros = nn.initializers.zeros
ones = nn.initializers.ones


def fan_in(scale: float = 1.0, in_axis=-2, out_axis=-1, batch_axis=()):
    """Truncated normal, variance ``scale / fan_in`` over ``in_axis``; ``batch_axis``
    names stacked independent kernels (e.g. the E axis of ``[E, D, F]`` expert weights)."""
    return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis,
                                            batch_axis=batch_axis)


def normal(stddev: float):
    return nn.initializers.normal(stddev)


def uniform(bound: float):
    """U(-bound, bound)."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def constant(values: Array):
    """Broadcasts the fixed array ``values`` to the parameter's shape."""
    return lambda key, shape, dtype=jnp.float32: jnp.broadcast_to(values, shape).astype(dtype)


def param(mod: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype=None) -> Array:
    """``mod.param`` with logical axis names (the only way layers create parameters)."""
    return mod.param(name, nn.with_logical_partitioning(init, axes), shape,
                     mod.param_dtype if dtype is None else dtype)
