"""Analytic model FLOPs and the roofline estimate of step time and MFU.

Model FLOPs (what MFU is defined on; recomputation under remat is not counted):

* matmul parameters ``N``: every parameter except the input-embedding table (a
  lookup), plus ``V * D`` for the tied output head; routed-expert parameters
  (logical axis ``expert``) count with the active fraction ``top_k / n_experts``
  of their MoE layer.
* attention: per attention layer and token, ``QK^T`` and ``PV`` cost
  ``2 * 2 * H * Dh * ctx`` forward, with ``ctx = T / 2`` for causal attention
  (the mean context; the kernels skip masked blocks) or ``min(window, T / 2)``.
* training step: ``3 x`` forward (backward = 2 x forward), i.e.
  ``tokens * (6 N + 12 * L_attn * H * Dh * ctx)``. Recurrent mixers (Mamba, RetNet,
  ...) contribute their projections through ``N``; their scans are not counted.
* decode step (one token per sequence): ``B * (2 N + 4 * L_attn * H * Dh * S)``
  with ``S`` the cache length.

``compiled.cost_analysis()`` is not used for FLOPs: it counts a ``while`` body
(the scanned layer stack) once, so it under-counts by about the depth.

Roofline (per device, perfect overlap of compute, memory and communication):

* ``t_compute = model FLOPs per device / peak bf16 FLOP/s``
* ``t_memory = (arguments + outputs + 2 * temporaries) / HBM bandwidth`` -- each
  input read once, each output written once, each temporary written and read
  once: a lower bound on HBM traffic.
* ``t_comm = sum of ring bytes / per-direction link bandwidth`` (half the published
  bidirectional ICI / NVLink figure; the inter-host InfiniBand figure for GPU
  collectives whose group spans hosts).
* ``step time >= max(t_compute, t_memory, t_comm)``; ``MFU <= t_compute / step``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np


def _block_index(path) -> int | None:
    for k in path:
        name = getattr(k, "key", getattr(k, "name", ""))
        if isinstance(name, str) and name.startswith("block_"):
            return int(name.split("_")[1])
    return None


def matmul_params(model_cfg, boxed_params) -> tuple[int, float]:
    """(total parameters, active matmul parameters) of a boxed abstract params tree."""
    names = nn.get_partition_spec(boxed_params)
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(boxed_params))
    specs = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    total, active = 0, 0.0
    for (path, leaf), spec in zip(leaves, specs):
        n = int(np.prod(leaf.shape))
        total += n
        keys = [getattr(k, "key", "") for k in path]
        if keys and keys[0] == "embed":
            continue  # the input lookup; a tied head is added below
        frac = 1.0
        if "expert" in tuple(spec):
            i = _block_index(path)
            ffn = model_cfg.pattern[i].ffn if i is not None else None
            if ffn is not None and hasattr(ffn, "n_experts"):
                frac = ffn.top_k / ffn.n_experts
        active += n * frac
    if model_cfg.tie_embeddings:
        active += model_cfg.vocab_size * model_cfg.d_model
    return total, active


def _attention_layers(model_cfg) -> list[tuple[int, int, int | None]]:
    """(H, Dh, window) of every softmax-attention layer in the stack."""
    out = []
    for spec in model_cfg.pattern:
        m = spec.mixer
        if getattr(m, "kind", "") == "attention" and hasattr(m, "n_heads"):
            dh = getattr(m, "head_dim", None) or model_cfg.d_model // m.n_heads
            out += [(m.n_heads, dh, getattr(m, "window", None))] * model_cfg.n_repeats
    return out


def train_flops(model_cfg, active_params: float, batch: int, seq_len: int) -> float:
    attn = sum(h * dh * (min(w, seq_len / 2) if w else seq_len / 2)
               for h, dh, w in _attention_layers(model_cfg))
    return batch * seq_len * (6 * active_params + 12 * attn)


def decode_flops(model_cfg, active_params: float, batch: int, cache_len: int) -> float:
    attn = sum(h * dh * (min(w, cache_len) if w else cache_len)
               for h, dh, w in _attention_layers(model_cfg))
    return batch * (2 * active_params + 4 * attn)


def comm_seconds(colls: list[dict], target) -> float:
    """Ring transfer time of ``colls`` (from :func:`experiments.aot.hlo.collectives`)."""
    intra = target.per_device("link_bw") / 2
    inter = target.per_device("host_link_bw") / 2 or intra
    return sum(c["ring_bytes"] / (inter if c.get("cross_host") else intra) for c in colls)


def roofline(flops_per_device: float, mem: dict, colls: list[dict], target) -> dict:
    """Step-time lower bound and MFU upper bound (module docstring) on ``target``."""
    t_compute = flops_per_device / target.per_device("peak_flops")
    traffic = mem["argument_bytes"] + mem["output_bytes"] + 2 * mem["temp_bytes"]
    t_memory = traffic / target.per_device("hbm_bw")
    t_comm = comm_seconds(colls, target)
    step = max(t_compute, t_memory, t_comm, 1e-12)
    bound = {t_compute: "compute", t_memory: "memory", t_comm: "comm"}[max(t_compute, t_memory, t_comm)]
    return {"t_compute_s": t_compute, "t_memory_s": t_memory, "t_comm_s": t_comm,
            "step_s": step, "mfu": t_compute / step, "bound": bound}
