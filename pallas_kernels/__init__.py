"""Pallas kernels, each beside its pure-JAX reference and a dispatcher (DESIGN.md).

* ``flash_attention(q, k, v, *, causal, window, segment_ids, impl)``: FlashAttention-2
  forward/backward kernels; ``reference_attention`` is the dense fp32 oracle.
* ``gmm(lhs, rhs, group_sizes, *, impl, group_offset)``: grouped matmul for MoE
  dispatch with ``tgmm`` (its weight gradient); ``gmm_reference`` is the oracle.

``impl=None`` runs the Pallas kernels on GPU and pure XLA on CPU/TPU;
``impl="pallas"`` on CPU runs them in interpret mode. What has been verified where
is stated in each ``pallas.py`` docstring: interpret mode on CPU (values and
gradients) and lowering to Triton IR; nothing has been run on a GPU or TPU yet.

Subpackages are named by operation (``attention``, ``grouped_matmul``) and never
shadowed by the public functions, so ``import pallas_kernels.grouped_matmul.ops`` works.
"""

from pallas_kernels.attention import flash_attention, reference_attention
from pallas_kernels.grouped_matmul import gmm, gmm_reference, tgmm

__all__ = ["flash_attention", "gmm", "gmm_reference", "reference_attention", "tgmm"]
