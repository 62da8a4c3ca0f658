"""Running per-example computations on each device's shard of the batch (``shard_map``).

Pallas kernels (flash attention, grouped matmul) are custom calls that GSPMD cannot
partition: under a sharded ``jit`` a Mosaic kernel fails to compile ("Mosaic kernels
cannot be automatically partitioned"). Attention and dropless MoE treat every sequence
independently, so the layers run them inside ``shard_map`` on the local batch shard
(and, for attention, the local heads when the mesh has a ``tensor`` axis that divides
them), which equals the global computation exactly.

With the MoE all-to-all (``layers/moe/expert_parallel.py``) this is the only model code
that names mesh axes: ``shard_map`` needs them. The names follow the default rules of
``experiments.config.MeshConfig`` (batch over ``data``, ``fsdp``, ``expert``; heads over
``tensor``).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import PartitionSpec

from layers.typing import Array

BATCH_AXES = ("data", "fsdp", "expert")
HEAD_AXIS = "tensor"


def batch_mesh(n_sequences: int):
    """The ambient mesh (``jax.set_mesh``) if it has more than one device and its batch
    axes divide ``n_sequences``; else None (run the unsharded path)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    return mesh if n_sequences % batch_shards(mesh) == 0 else None


def batch_shards(mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


def batch_spec(mesh) -> PartitionSpec:
    """The batch dimension's PartitionSpec entry (leading axis of [B, ...] arrays)."""
    return PartitionSpec(tuple(a for a in BATCH_AXES if a in mesh.axis_names))


def shard_attention(fn: Callable, q: Array, k: Array, v: Array, segment_ids: Array | None,
                    mesh) -> Array:
    """``fn(q, k, v, segment_ids) -> out`` per (batch shard, head shard).

    q: [B, T, H, Dh]; k, v: [B, S, K, Dh]; segment_ids: None or [B, T] (T == S). Heads are
    split over the ``tensor`` axis when it divides both H and K (query head h then stays
    with its kv head h // G), else kept whole.
    """
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    n_t = mesh.shape[HEAD_AXIS] if HEAD_AXIS in mesh.axis_names else 1
    heads = HEAD_AXIS if n_t > 1 and q.shape[2] % n_t == 0 and k.shape[2] % n_t == 0 else None
    spec = PartitionSpec(batch, None, heads, None)
    if segment_ids is None:
        body = lambda q, k, v: fn(q, k, v, None)
        args, specs = (q, k, v), (spec, spec, spec)
    else:
        body, args = fn, (q, k, v, segment_ids)
        specs = (spec, spec, spec, PartitionSpec(batch, None))
    # check_vma=False: Pallas calls do not track varying-manual-axes types; every value
    # here is per-shard by construction.
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(*args)
