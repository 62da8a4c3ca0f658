"""Token embedding with optional weight tying to the output head (Press & Wolf 2017;
Llama-3 ties for its small models). The table is ``[V, D]`` with logical axes
("vocab", "embed"); the tied head computes ``x @ table.T`` in fp32-accumulated compute dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from layers.typing import Array, DType


class Embedding(nn.Module):
    """tokens [B, T] int -> [B, T, D]; ``attend(x [B, T, D]) -> logits [B, T, V]``."""
    vocab_size: int
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def setup(self):
        init = nn.initializers.normal(stddev=1.0)
        self.table = self.param("table", nn.with_logical_partitioning(init, ("vocab", "embed")),
                                (self.vocab_size, self.d_model), self.param_dtype)

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(self.table, tokens, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        # Scale the tied head by 1/sqrt(D) so logits start O(1) with a unit-variance table.
        w = self.table.astype(self.dtype) * (self.d_model ** -0.5)
        return jnp.einsum("btd,vd->btv", x.astype(self.dtype), w,
                          preferred_element_type=jnp.float32)
