"""Flax Linen layers and the pure-JAX math they call (no training code).

Families live in subpackages (``attention/``, ``recurrent/``, ``moe/``); the shared
pieces (contracts, heads, initializers, norms, conv, embedding, FFN, positions,
recurrence primitives, the notation legend) at this level. No family imports another.
The registries of mixer and FFN kinds are in ``layers.registry``. See docs/design.md.
"""
