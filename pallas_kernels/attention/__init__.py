"""Flash attention: dense reference, Pallas (FlashAttention-2) kernels, dispatcher."""

from pallas_kernels.attention.ops import flash_attention
from pallas_kernels.attention.reference import reference_attention

__all__ = ["flash_attention", "reference_attention"]
