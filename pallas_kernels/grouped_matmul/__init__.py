"""Grouped matmul (MoE expert dispatch): reference, Pallas kernels, dispatcher."""

from pallas_kernels.grouped_matmul.ops import gmm, gmm_xla, tgmm
from pallas_kernels.grouped_matmul.reference import gmm_reference

__all__ = ["gmm", "gmm_reference", "gmm_xla", "tgmm"]
