"""The two layer contracts every block is built from: sequence mixers and FFNs
(docs/design.md, "Contracts").

A block is ``x + mixer(norm(x))`` then ``x + ffn(norm(x))``. Mixers and FFNs are
described by frozen config dataclasses (subclasses of :class:`MixerConfig` and
:class:`FeedForwardConfig`) with a unique ``kind``; ``cfg.make(d_model, dtype,
param_dtype, name)`` builds the Flax Linen module. Both kinds of module share one
call signature::

    module(x [B, T, D], *, positions [B, T], segment_ids=None | [B, T],
           cache=None | pytree, train=False) -> (y [B, T, D], new_cache | None, aux)

* ``cache``: decoding state. ``cfg.init_cache(d_model, batch, max_len, dtype)``
  returns a typed pytree (a KV cache for attention, a fixed-size state for
  recurrent mixers, a one-token shift for RWKV channel mixing, ``None`` for layers
  without state); called with a cache, the module processes T >= 1 new tokens and
  returns the updated cache. Caches are explicit values, never hidden Flax state.
* ``aux``: ``{"losses": {name: scalar}, "metrics": {name: array}}`` (either key may
  be absent; ``{}`` is fine). Losses are summed over layers and added to the task
  loss by the train loop; metrics are logged per layer.
* ``cfg.state_size(d_model, seq_len, dtype)``: bytes of decode state per sequence.
* ``cfg.causal``: position t depends only on tokens <= t (decoders need it).
* ``cfg.validate(d_model, path)``: raises ``ValueError`` naming the field, the value
  and what is allowed, before anything is compiled.
* Packed sequences: ``segment_ids`` must stop information flowing across segment
  boundaries (recurrent layers reset their state there).

Every mixer has a test that prefill + token-by-token decode equals the parallel form.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.typing import DType, PyTree

Aux = dict  # {"losses": {name: scalar}, "metrics": {name: array}}


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """What mixers and FFNs have in common (an abstract base; see the module docstring)."""
    kind: ClassVar[str] = "layer"

    @property
    def causal(self) -> bool:
        return True

    def validate(self, d_model: int, path: str) -> None:
        raise NotImplementedError

    def make(self, d_model: int, dtype: DType, param_dtype: DType,
             name: str | None = None) -> nn.Module:
        raise NotImplementedError

    def init_cache(self, d_model: int, batch: int, max_len: int, dtype: DType) -> PyTree:
        """Decode state for ``batch`` sequences of up to ``max_len`` tokens (None: stateless)."""
        return None

    def state_size(self, d_model: int, seq_len: int, dtype: DType = jnp.float32) -> int:
        """Decode-state bytes per sequence after ``seq_len`` tokens. Default: the bytes of
        ``init_cache(d_model, 1, seq_len, dtype)``, computed abstractly (nothing is
        allocated) -- right for fixed-size recurrent states; attention-like mixers
        override it with the bytes that actually hold the context."""
        return cache_bytes(jax.eval_shape(lambda: self.init_cache(d_model, 1, seq_len, dtype)))


@dataclasses.dataclass(frozen=True)
class MixerConfig(LayerConfig):
    """Base of every sequence mixer (attention, recurrences, ...). ``causal=False`` asks
    for the bidirectional variant where a mixer has one."""
    kind: ClassVar[str] = "mixer"
    causal: bool = True


@dataclasses.dataclass(frozen=True)
class FeedForwardConfig(LayerConfig):
    """Base of every FFN (dense SwiGLU/GELU, mixture of experts, RWKV channel mixing)."""
    kind: ClassVar[str] = "feed_forward"


def cache_bytes(cache: PyTree) -> int:
    """Bytes of a cache pytree of arrays or ShapeDtypeStructs."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache)))


def nbytes(dtype: DType) -> int:
    return jnp.dtype(dtype).itemsize


# ----------------------------------------------------------------------------- validators
# One set, used by every config: each raises ValueError naming the field, the value and
# what is allowed.

def positive(path: str, value: Any, allow_none: bool = False) -> None:
    """``value`` must be a positive int (or None if ``allow_none``)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{path}={value!r} must be a positive integer"
                         + (" (or None)" if allow_none else ""))


def one_of(path: str, value: Any, allowed) -> None:
    """``value`` must be one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{path}={value!r} is not allowed; choose one of {list(allowed)}")


def in_range(path: str, value: Any, lo: float | None = None, hi: float | None = None, *,
             lo_open: bool = False, hi_open: bool = False) -> None:
    """``value`` must be a finite real number within the given bounds."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "any" if lo is None else f"{'(' if lo_open else '['}{lo}"
        right = "any" if hi is None else f"{hi}{')' if hi_open else ']'}"
        raise ValueError(f"{path}={value!r} must be a finite number in {left}, {right}")


def no_aux() -> Aux:
    """The empty aux dict of a layer with no losses or metrics."""
    return {}
