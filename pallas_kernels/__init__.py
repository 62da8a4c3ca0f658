"""Pallas kernels, each beside its pure-JAX reference and a dispatcher (docs/design.md).

* ``flash_attention(q, k, v, *, causal, window, segment_ids, impl)``: FlashAttention-2
  forward/backward kernels; ``reference_attention`` is the dense fp32 oracle.
* ``gmm(lhs, rhs, group_sizes, *, impl, group_offset)``: grouped matmul for MoE
  dispatch with ``tgmm`` (its weight gradient); ``gmm_reference`` is the oracle.

Both dispatchers take the same ``impl`` names, with one meaning on every backend
(the backend is the abstract mesh's platform during a deviceless compile, else
``jax.default_backend()``):

* ``None``: the best for the backend: ``"pallas_tpu"`` on TPU, ``"pallas_gpu"`` on
  GPU, ``"xla"`` on CPU.
* ``"xla"``: pure JAX, any backend.
* ``"pallas"``: the backend's own kernel (TPU: ``"pallas_tpu"``, GPU:
  ``"pallas_gpu"``, CPU: ``"pallas_triton"`` in the generic Pallas interpreter).
* ``"pallas_tpu"``: Mosaic TPU kernels; on CPU in TPU interpret mode.
* ``"pallas_gpu"``: Mosaic GPU on Hopper and newer where a kernel exists, else the
  Triton kernel (gmm has no Mosaic GPU kernel: Triton on GPU, the generic
  interpreter on CPU).
* ``"pallas_triton"``: Pallas Triton kernels; on CPU the generic interpreter.
* ``"tokamax"``: the tokamax library (``tokamax.dot_product_attention``,
  ``tokamax.ragged_dot``; the ``tokamax`` extra), its XLA path on CPU.

An impl a backend cannot run is refused with a ValueError listing those it can.
What has been verified where is stated in each kernel module's docstring
(interpret modes on CPU, deviceless compiles); nothing here has run on a GPU or
TPU.

Subpackages are named by operation (``attention``, ``grouped_matmul``) and never
shadowed by the public functions, so ``import pallas_kernels.grouped_matmul.ops`` works.
``dispatch`` holds what both dispatchers share (impl names, backend detection,
``interpret`` checks); ``tiling`` the tile and padding helpers of the kernels.
"""

from pallas_kernels.attention import flash_attention, reference_attention
from pallas_kernels.grouped_matmul import gmm, gmm_reference, tgmm

__all__ = ["flash_attention", "gmm", "gmm_reference", "reference_attention", "tgmm"]
