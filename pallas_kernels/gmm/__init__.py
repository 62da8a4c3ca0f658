"""Grouped matmul (MoE expert dispatch): reference, Pallas kernels, dispatcher."""

from pallas_kernels.gmm.ops import gmm, gmm_xla, tgmm
from pallas_kernels.gmm.reference import gmm_reference

__all__ = ["gmm", "gmm_reference", "gmm_xla", "tgmm"]
