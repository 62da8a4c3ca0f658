"""Token embedding with optional weight tying to the output head (Press & Wolf 2017;
Llama-3 ties for its small models). The table is ``[V, D]`` with logical axes
("vocab", "embed"); the tied head computes ``x @ table.T`` in fp32-accumulated compute dtype,
unscaled as in Llama-3, Mamba and Mamba-2 (``head_scale`` multiplies the logits, e.g.
``d_model ** -0.5`` for a unit-variance table; ``ModelConfig.tied_head_scale`` selects it).
The table is initialized ``normal(init_std)``: archs/model.py uses ``d_model ** -0.5`` for an
unscaled tied head (logits O(1) at init) and 1 otherwise.
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
    head_scale: float = 1.0
    init_std: float = 1.0

    def setup(self):
        init = nn.initializers.normal(stddev=self.init_std)
        self.table = self.param("table", nn.with_logical_partitioning(init, ("vocab", "embed")),
                                (self.vocab_size, self.d_model), self.param_dtype)

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(self.table, tokens, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        w = self.table.astype(self.dtype)
        if self.head_scale != 1.0:
            w = w * self.head_scale
        return jnp.einsum("btd,vd->btv", x.astype(self.dtype), w,
                          preferred_element_type=jnp.float32)
