"""The sequence-mixer contract (DESIGN.md "Blocks, mixers, caches").

A mixer is described by a frozen config dataclass (a :class:`MixerConfig`
subclass) that builds a Flax Linen module. Every mixer provides:

1. parallel form: ``module(x [B, T, D], positions=[B, T], segment_ids=None|[B, T],
   train=False) -> (y [B, T, D], None)``;
2. decode form: ``cfg.init_cache(d_model, batch, max_len, dtype)`` returns a typed
   cache pytree (KV cache for attention, a fixed-size state for recurrent mixers);
   ``module(x, positions=..., cache=cache) -> (y, new_cache)`` processes T >= 1 new
   tokens (prefill or one decode step) and returns the updated cache. Caches are
   explicit values, never hidden Flax state;
3. ``cfg.state_size(d_model, seq_len, dtype)``: bytes of decode state per sequence
   (default: the bytes of ``init_cache``; KV caches count the filled context);
4. a test that prefill + token-by-token decode equals the parallel form.

``cfg.causal`` says whether position t depends only on tokens <= t (decoders,
generation and the MQAR sweep need it). ``cfg.validate(d_model, path)`` raises
``ValueError`` naming the field, the value and what is allowed, before any
compilation. Packed sequences: ``segment_ids`` must stop information flowing across
segment boundaries (recurrent mixers reset their state there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.typing import DType, PyTree


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Base class; subclasses are frozen dataclasses with a unique ``kind``."""
    kind: ClassVar[str] = "mixer"
    causal: bool = True

    def validate(self, d_model: int, path: str) -> None:
        raise NotImplementedError

    def make(self, d_model: int, dtype: DType, param_dtype: DType,
             name: str | None = None) -> nn.Module:
        raise NotImplementedError

    def init_cache(self, d_model: int, batch: int, max_len: int, dtype: DType) -> PyTree:
        raise NotImplementedError

    def state_size(self, d_model: int, seq_len: int, dtype: DType = jnp.float32) -> int:
        """Decode-state bytes per sequence after ``seq_len`` tokens. Default: the bytes of
        ``init_cache(d_model, 1, seq_len, dtype)``, computed abstractly (nothing is
        allocated) -- right for every fixed-size recurrent cache; attention-like mixers
        override it with the bytes that actually hold the context."""
        return cache_bytes(jax.eval_shape(lambda: self.init_cache(d_model, 1, seq_len, dtype)))


def cache_bytes(cache: PyTree) -> int:
    """Bytes of a cache pytree of arrays or ShapeDtypeStructs."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache)))


def positive(path: str, value: Any, allow_none: bool = False) -> None:
    """Raises ValueError unless ``value`` is a positive int (or None if allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{path}={value!r} must be a positive integer")


def one_of(path: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{path}={value!r} is not allowed; choose one of {list(allowed)}")


def nbytes(dtype: DType) -> int:
    return jnp.dtype(dtype).itemsize
