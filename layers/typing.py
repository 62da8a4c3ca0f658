"""The one notation legend for archlab (STYLE.md #2).

Every docstring, shape comment (``# [B, T, H, Dh]``) and einsum string in the
codebase uses these letters:

====  ==========================================================
B     batch
T     query length (tokens processed in this call)
S     key/value length (cache or memory length)
D     model width (d_model)
F     FFN hidden width
H     query heads
K     key/value heads (GQA/MQA: H % K == 0, G = H // K)
G     query heads per kv head
Dh    head dim (written ``d`` in einsum strings)
N     recurrent state size (SSM state, feature count)
E     experts
C     chunk length / expert capacity
V     vocabulary
L     layers
W     window length
====  ==========================================================

Activations are ``[B, T, D]``; attention tensors use the
``jax.nn.dot_product_attention`` layout ``[B, T, H, Dh]`` and k/v ``[B, S, K, Dh]``.
"""

from typing import Any

import jax

Array = jax.Array
PyTree = Any
DType = Any
