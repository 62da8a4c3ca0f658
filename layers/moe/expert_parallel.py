"""Expert parallelism: capacity buffers exchanged by all-to-all over the ``expert`` mesh axis.

Layout (GShard, Lepikhin et al. 2020). The routing plan (layers/moe/dispatch.py) is
computed outside, under the ordinary pjit/GSPMD sharding of the batch. Inside
``shard_map`` each device holds ``b`` sequences (its shard of the batch B; capacity
is per sequence), sharded over every batch mesh axis present (``data``, ``fsdp``,
``expert``), and ``E / n`` experts (``n`` = size of the ``expert`` axis; the expert
weights are sharded on their E axis). Per device::

    buf  [E, b*Cap, D]       gather of its tokens into every expert's capacity slots
    a2a  [E/n, n*b*Cap, D]   all-to-all: expert slices out, the other devices' slots in
    out  [E/n, n*b*Cap, D]   its local experts, one batched matmul
    a2a  [E, b*Cap, D]       all-to-all back; weighted scatter-add into its tokens

so results equal the single-device capacity path exactly. A ``data`` axis composes:
the all-to-all runs within each ``expert`` row of the mesh, and the gradients of the
(replicated over ``data``) expert weights are summed by ``shard_map``'s transpose.

Besides ``layers/sharding.py`` this module is the one place in model code that names mesh
axes: ``shard_map`` needs them. It activates when the ambient mesh (``jax.set_mesh``) has an ``expert`` axis of
size > 1 and the batch shards divide the number of sequences; otherwise the caller
runs the single-device path (same result). Buffers have fixed capacity (a dropless
``ragged_all_to_all`` exchange is not implemented): the ``dropless`` dispatch uses
capacity ``Cap = T`` here, which is exact but sized for the worst case.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec

from layers.moe.dispatch import expert_swiglu, run_plan
from layers.sharding import BATCH_AXES, batch_spec
from layers.typing import Array

EXPERT_AXIS = "expert"


def expert_mesh(n_sequences: int, n_experts: int):
    """The ambient mesh if expert parallelism applies to a call on ``n_sequences``
    sequences (the batch B), else None.

    Raises ValueError if the mesh's ``expert`` axis does not divide ``n_experts``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or EXPERT_AXIS not in mesh.axis_names:
        return None
    n = mesh.shape[EXPERT_AXIS]
    if n == 1:
        return None
    if n_experts % n:
        raise ValueError(f"moe: {n_experts} experts cannot be split over mesh axis "
                         f"'{EXPERT_AXIS}' of size {n}; make the expert count a multiple of it")
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)
    return mesh if n_sequences % shards == 0 else None


def expert_parallel_run(x: Array, slot_token: Array, slot_weight: Array, w: dict,
                        n_experts: int, mesh) -> Array:
    """:func:`layers.moe.dispatch.run_plan` with experts sharded over the ``expert`` axis.

    Args:
      x: [B, T, D] tokens (capacity is per sequence).
      slot_token, slot_weight: [B, E*Cap] the capacity plan.
      w: expert weights {"wi", "wg": [E, D, F], "wo": [E, F, D]}.
      n_experts: E.
      mesh: from :func:`expert_mesh`.

    Returns:
      [B, T, D], equal to the single-device ``run_plan``.
    """
    batch = batch_spec(mesh)
    expert = PartitionSpec(EXPERT_AXIS)

    def exchange(buf: Array, w_local: dict) -> Array:  # [E, b*Cap, D] -> [E, b*Cap, D]
        buf = jax.lax.all_to_all(buf, EXPERT_AXIS, split_axis=0, concat_axis=1, tiled=True)
        out = expert_swiglu(buf, w_local)                                # [E/n, n*b*Cap, D]
        return jax.lax.all_to_all(out, EXPERT_AXIS, split_axis=1, concat_axis=0, tiled=True)

    def body(x, st, sw, w_local):
        return run_plan(x, st, sw, w_local, n_experts, experts_fn=exchange)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(batch, batch, batch, {k: expert for k in w}),
                       out_specs=batch)
    return fn(x, slot_token, slot_weight, w)


def batch_sharded_dropless(fn, x: Array, experts: Array, weights: Array, w: dict, mesh) -> Array:
    """Runs the dropless path ``fn(x [M, D], experts [M, k], weights [M, k], w) -> [M, D]``
    on each device's shard of the batch inside ``shard_map``.

    Dropless routing treats every token independently, so per-shard results equal the
    global computation exactly. The grouped-matmul kernels are custom calls that GSPMD
    cannot partition (a Mosaic kernel under a sharded ``jit`` fails to compile), so the
    sort + grouped matmuls (on CPU: the buffers + overflow loop of
    ``dispatch.buffered_dropless_moe``) run per shard; the expert weights enter replicated
    (``P()``: FSDP/tensor-sharded weights are all-gathered, as FSDP does for any layer).
    x: [B, T, D]; experts, weights: [B, T, k] -> [B, T, D].
    """
    batch = batch_spec(mesh)

    def body(x, e, wt, w_full):
        b, t, d = x.shape
        y = fn(x.reshape(b * t, d), e.reshape(b * t, -1), wt.reshape(b * t, -1), w_full)
        return y.reshape(b, t, d)

    # check_vma=False: the XLA loops start from replicated constants and Pallas calls
    # do not track varying-manual-axes types; every value here is per-shard by construction.
    return jax.shard_map(body, mesh=mesh, in_specs=(batch, batch, batch, {k: PartitionSpec() for k in w}),
                         out_specs=batch, check_vma=False)(x, experts, weights, w)
