"""Grouped matmul (MoE expert dispatch): reference, kernels (``pallas_tpu``: Mosaic TPU;
``pallas_triton``: Pallas Triton; ``tokamax``: tokamax.ragged_dot), dispatcher (``ops``)."""

from pallas_kernels.grouped_matmul.ops import gmm, gmm_xla, tgmm
from pallas_kernels.grouped_matmul.reference import gmm_reference

__all__ = ["gmm", "gmm_reference", "gmm_xla", "tgmm"]
