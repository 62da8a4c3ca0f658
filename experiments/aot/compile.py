"""Deviceless compile of an experiment's train step and decode step for a target.

The train step is :func:`experiments.train.make_train_step` jitted by
:func:`experiments.train.jit_train_step`: the very function ``archlab run`` runs
(optimizer, aux losses, ``state`` collection, donation, parameter shardings from
the config's logical-axis rules). Arguments are ``jax.ShapeDtypeStruct`` with
``NamedSharding`` over a mesh of compile-only devices, so nothing is allocated;
the optimizer state is sharded like the parameters, as in ``archlab run``
(:func:`experiments.train.opt_state_shardings`).

The decode step is one token per sequence through the model with its decode
cache (donated), greedy next token out; the cache is sharded over its batch
dimension (data-parallel axes) when the batch divides, replicated otherwise.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import archs
from archs.model import STATE_COLLECTION
from experiments import mesh as mesh_lib
from experiments import train
from experiments.aot import estimate, hlo
from experiments.config import ExperimentConfig
from experiments.tasks import Batch, get_batch


def _sds(abstract, sharding):
    return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=sharding)


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
           "code_bytes": int(getattr(m, "generated_code_size_in_bytes", 0))}
    # Donated outputs reuse their argument buffers (alias); the peak is the live sum.
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                          + out["temp_bytes"])
    return out


def abstract_train_args(cfg: ExperimentConfig, model, tx, mesh):
    """(TrainState, Batch, rng) as sharded ShapeDtypeStructs, and the boxed params."""
    boxed = train.abstract_variables(cfg, model)
    var_sh = mesh_lib.logical_sharding(boxed, mesh, cfg.mesh)
    variables = jax.tree.map(_sds, nn.unbox(boxed), var_sh)  # unbox outside the mesh context
    params = variables["params"]
    replicated = NamedSharding(mesh, P())
    opt_sh = train.opt_state_shardings(tx, params, var_sh["params"], mesh)
    opt_state = jax.tree.map(_sds, jax.eval_shape(tx.init, params), opt_sh)
    state = train.TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params,
                             opt_state, variables.get(STATE_COLLECTION, {}))
    shapes = jax.eval_shape(lambda: get_batch(cfg.task, cfg.train.seed, 0, cfg.train.batch_size))
    batch_sh = mesh_lib.batch_sharding(mesh, cfg.mesh)
    batch = Batch(*(_sds(x, batch_sh) for x in shapes))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    return (state, batch, rng), boxed["params"]


def compile_train(cfg: ExperimentConfig, mesh, target) -> dict:
    """Compiles the train step; returns memory, collectives, FLOPs and the roofline."""
    model = archs.build(cfg.model)
    tx, schedule = train.make_optimizer(cfg)
    args, boxed_params = abstract_train_args(cfg, model, tx, mesh)
    step = train.jit_train_step(train.make_train_step(cfg, model, tx, schedule),
                                jax.tree.map(lambda x: x.sharding, args[0]))
    t0 = time.perf_counter()
    with mesh_lib.mesh_context(mesh), nn.logical_axis_rules(mesh_lib.rules(cfg.mesh)):
        compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - t0
    total, active = estimate.matmul_params(cfg.model, boxed_params)
    flops = estimate.train_flops(cfg.model, active, cfg.train.batch_size, cfg.task.seq_len)
    return _analyse(compiled, target, flops, seconds) | {"params": total, "active_params": active}


def compile_decode(cfg: ExperimentConfig, mesh, target, batch: int, cache_len: int) -> dict:
    """Compiles one decode step (``batch`` sequences, cache of ``cache_len`` tokens)."""
    model = archs.build(cfg.model)
    boxed = train.abstract_variables(cfg, model)
    var_sh = mesh_lib.logical_sharding(boxed, mesh, cfg.mesh)
    variables = jax.tree.map(_sds, nn.unbox(boxed), var_sh)
    cache = jax.eval_shape(lambda: model.init_cache(batch, cache_len))
    cache_sh = _cache_shardings(cache, mesh, cfg, batch)
    cache = jax.tree.map(_sds, cache, cache_sh)
    dp = mesh_lib.batch_axis_size(mesh, cfg.mesh)
    tok_sh = NamedSharding(mesh, P(dict(cfg.mesh.rules).get("batch") if batch % dp == 0 else None))
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=tok_sh)

    def decode_step(variables, tokens, cache):
        logits, _, cache = model.apply(variables, tokens[:, None], cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    step = jax.jit(decode_step, donate_argnums=2, out_shardings=(tok_sh, cache_sh))
    t0 = time.perf_counter()
    with mesh_lib.mesh_context(mesh), nn.logical_axis_rules(mesh_lib.rules(cfg.mesh)):
        compiled = step.lower(variables, tokens, cache).compile()
    seconds = time.perf_counter() - t0
    _, active = estimate.matmul_params(cfg.model, boxed["params"])
    flops = estimate.decode_flops(cfg.model, active, batch, cache_len)
    return _analyse(compiled, target, flops, seconds)


def _cache_shardings(cache, mesh, cfg: ExperimentConfig, batch: int):
    """Shards each cache leaf's batch dimension over the ``batch`` rule's mesh axes."""
    axes = dict(cfg.mesh.rules).get("batch")
    dp = mesh_lib.batch_axis_size(mesh, cfg.mesh)
    scanned = cfg.model.scan_layers

    def one(x):
        dims = [None] * x.ndim
        if batch % dp == 0:
            for d in ((1, 0) if scanned else (0,)):
                if d < x.ndim and x.shape[d] == batch:
                    dims[d] = axes
                    break
        return NamedSharding(mesh, P(*dims))
    return jax.tree.map(one, cache)


def _analyse(compiled, target, flops: float, seconds: float) -> dict:
    mem = _memory(compiled)
    per_host = target.devices_per_host if target.chip.platform == "cuda" else target.n_devices
    colls = hlo.collectives(compiled.as_text(), target.n_devices, per_host)
    hbm = target.per_device("hbm_bytes")
    flops_dev = flops / target.n_devices
    return {"memory": mem, "hbm_bytes": hbm, "fits": mem["total_bytes"] <= hbm,
            "headroom_bytes": hbm - mem["total_bytes"], "collectives": colls,
            "model_flops": flops, "model_flops_per_device": flops_dev,
            "roofline": estimate.roofline(flops_dev, mem, colls, target), "compile_s": seconds}
