"""The notation legend of archlab (docs/conventions.md): every docstring, shape comment
(``# [B, T, H, Dh]``) and einsum string uses these symbols with these meanings only.

======  =================================================================
symbol  meaning
======  =================================================================
B       batch size
T       query length: tokens processed in this call
S       key/value length (KV cache, memory or compressed length)
D       model width (``d_model``)
F       hidden width of an FFN or of an expert
Di      inner width of an expanding mixer (Mamba: ``expand * D``)
H       query heads (the heads of any multi-head mixer)
K       key/value heads (GQA/MQA: H % K == 0)
G       query heads per kv head, ``H // K`` (the GQA group size; nothing else)
Dh      head dim of queries/keys (Mamba-2: of x)
Dv      head dim of values where it differs from Dh (RetNet)
N       state size of a recurrence or feature count of a kernel feature map
R       rank of a low-rank factor (LoRA, compressed projections)
E       experts
M       token rows of a flattened batch (``B * T``) in expert dispatch
Cap     expert capacity (slots per expert; einsum letter ``p``)
k       experts each token selects (MoE top-k; einsum letter ``j``)
C       chunk length (tokens per chunk of a chunked algorithm)
NC      number of chunks (``T / C``)
Bq, Bk  query / key block sizes of blockwise kernels
W       window length
V       vocabulary size
L       layers
======  =================================================================

Einsum strings use the lowercase letter (``b t s d f h k g n e v``); where two symbols
share a letter (``Dh`` and ``D``) the einsum uses ``d`` for the one of the two the
operand has, and the docstring shapes disambiguate. Activations are ``[B, T, D]``;
attention tensors use the ``jax.nn.dot_product_attention`` layout ``[B, T, H, Dh]``
and k/v ``[B, S, K, Dh]``.
"""

from typing import Any

import jax

Array = jax.Array
PyTree = Any
DType = Any
