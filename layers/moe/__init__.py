"""Mixture of experts: the MoE FFN (``layer.py``), routers and balancing losses
(``routers.py``), dispatch paths with their dense reference (``dispatch.py``) and
expert parallelism (``expert_parallel.py``). See docs/design.md.
"""

from layers.moe.layer import DISPATCHES, ROUTERS, STATE_COLLECTION, MoE, MoEConfig

__all__ = ["DISPATCHES", "MoE", "MoEConfig", "ROUTERS", "STATE_COLLECTION"]
