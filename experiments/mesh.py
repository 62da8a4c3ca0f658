"""Device mesh and logical-axis sharding (docs/design.md).

One code path from 1 CPU to a pod: a ``jax.sharding.Mesh`` with axes
``(data, fsdp, expert, tensor)`` (a size of -1 fills the devices left), and the
config's rules table mapping the model's logical axis names to mesh axes. Parameters
get ``NamedSharding`` from their logical names; the batch is sharded over the
``batch`` rule (data x fsdp x expert by default). Multi-host: call
``jax.distributed.initialize()`` before building the mesh (``archlab run
--distributed``); every host then runs the same program on its local devices.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments.config import MeshConfig

AXES = ("data", "fsdp", "expert", "tensor")


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """Builds the mesh; ValueError if the sizes do not multiply to the device count."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [getattr(cfg, a) for a in AXES]
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if fills:
        if n % known:
            raise ValueError(f"mesh: {n} devices are not divisible by the fixed axes {dict(zip(AXES, sizes))}")
        sizes[fills[0]] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh: axes {dict(zip(AXES, sizes))} use {math.prod(sizes)} devices but "
                         f"{n} are available")
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def rules(cfg: MeshConfig) -> tuple:
    return tuple((k, v) for k, v in cfg.rules)


def logical_sharding(tree, mesh: Mesh, cfg: MeshConfig):
    """NamedShardings for a (boxed) variable tree from its logical axis names."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules(cfg))


def batch_sharding(mesh: Mesh, cfg: MeshConfig) -> NamedSharding:
    """Sharding of [B, T] arrays: B over the mesh axes of the ``batch`` rule."""
    axes = dict(cfg.rules).get("batch")
    return NamedSharding(mesh, P(axes, None))


def batch_axis_size(mesh: Mesh, cfg: MeshConfig) -> int:
    axes = dict(cfg.rules).get("batch")
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def mesh_context(mesh: Mesh):
    """The context that makes ``mesh`` current for sharding constraints.

    ``jax.set_mesh`` (jax >= 0.7; the legacy ``with mesh:`` is deprecated and ignored
    by constraints on jax 0.12); falls back to ``with mesh:`` on older versions.
    """
    return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh
