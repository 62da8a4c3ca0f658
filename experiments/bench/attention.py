"""``archlab bench attention``: attention memory/time, quickstart throughput, compile time.

1. Compiled peak memory (XLA ``memory_analysis``) and median time of forward+backward
   for dense vs blockwise attention (``layers.attention.blockwise``, the attention
   layer's ``attn_impl="blockwise"``) at T = 1k ... 16k (B=1, H=4, K=2, Dh=64, causal).
2. Train-step tokens/s of the quickstart models on this backend.
3. Compile time of a 4-layer vs a 32-layer llama under ``nn.scan`` (same width).

Flags: ``--quick`` (T up to 4k, fewer repeats), ``--lengths 1024,2048``, ``--out DIR``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

from experiments.bench.common import (compile_fn, compiled_stats, fmt_bytes, markdown_table,
                                      print_header, time_compiled, write_results)


def _attn_rows(lengths, repeats, max_time_dense):
    from layers.attention.blockwise import blockwise_attention
    from pallas_kernels.attention.reference import reference_attention

    rows = []
    for t in lengths:
        key = jax.random.PRNGKey(t)
        q = jax.random.normal(key, (1, t, 4, 64))
        k = jax.random.normal(jax.random.fold_in(key, 1), (1, t, 2, 64))
        v = jax.random.normal(jax.random.fold_in(key, 2), (1, t, 2, 64))
        res = {}
        for impl, fn in (("dense", lambda q, k, v: reference_attention(q, k, v, causal=True)),
                         ("blockwise", lambda q, k, v: blockwise_attention(q, k, v, causal=True,
                                                                          block_q=256, block_k=256))):
            loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) ** 2)
            step = jax.value_and_grad(loss, argnums=(0, 1, 2))
            compiled, ctime = compile_fn(step, q, k, v)
            stats = compiled_stats(compiled)
            sec = float("nan")
            if impl == "blockwise" or t <= max_time_dense:
                sec = time_compiled(compiled, q, k, v, repeats=repeats)
            res[impl] = (stats, sec)
            rows.append({"T": t, "impl": impl, "peak": fmt_bytes(stats["peak_bytes"]),
                         "peak_bytes": stats["peak_bytes"], "fwd+bwd ms": sec * 1e3,
                         "compile s": ctime})
        rows[-1]["mem vs dense"] = res["blockwise"][0]["peak_bytes"] / res["dense"][0]["peak_bytes"]
        if res["dense"][1] == res["dense"][1]:
            rows[-1]["time vs dense"] = res["blockwise"][1] / res["dense"][1]
    return rows


def _throughput_rows(steps):
    from experiments.config import load_experiment_file
    from experiments.train import make_optimizer, masked_ce
    from experiments.tasks import get_batch
    import archs

    rows = []
    for cfg in load_experiment_file("experiments/configs/quickstart.py"):
        model = archs.build(cfg.model)
        tx, _ = make_optimizer(cfg)
        batch = get_batch(cfg.task, 0, 0, cfg.train.batch_size)
        params = model.init(jax.random.PRNGKey(0), batch.inputs)
        opt = tx.init(params)

        def step(params, opt, batch):
            def loss(p):
                nll, _, n = masked_ce(model.apply(p, batch.inputs)[0], batch.targets, batch.loss_mask)
                return nll / n
            val, g = jax.value_and_grad(loss)(params)
            u, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, u), opt, val
        compiled, ctime = compile_fn(step, params, opt, batch)
        sec = time_compiled(compiled, params, opt, batch, repeats=steps)
        rows.append({"run": cfg.name, "batch x T": f"{cfg.train.batch_size}x{cfg.task.seq_len}",
                     "step ms": sec * 1e3, "tokens/s": cfg.train.batch_size * cfg.task.seq_len / sec,
                     "compile s": ctime})
    return rows


def _compile_rows():
    import archs
    rows = []
    tokens = jnp.zeros((1, 128), jnp.int32)
    for n_layers in (4, 32):
        cfg = archs.preset("llama", "small", n_layers=n_layers)
        model = archs.build(cfg)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
        params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
        fn = jax.value_and_grad(lambda p: jnp.mean(model.apply(p, tokens)[0]))
        t0 = time.perf_counter()
        jax.jit(fn).lower(params).compile()
        rows.append({"layers": n_layers, "compile s (fwd+bwd, scanned)": time.perf_counter() - t0})
    rows[-1]["ratio 32/4"] = rows[1]["compile s (fwd+bwd, scanned)"] / rows[0]["compile s (fwd+bwd, scanned)"]
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="archlab bench attention")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--lengths", default=None, help="comma-separated T values")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: attention,throughput,compile")
    args = p.parse_args(argv)
    lengths = ([int(x) for x in args.lengths.split(",")] if args.lengths
               else [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384])
    skip = set(filter(None, args.skip.split(",")))
    print_header("archlab bench attention")
    out = {}
    if "attention" not in skip:
        rows = _attn_rows(lengths, repeats=3 if args.quick else 5, max_time_dense=8192)
        out["attention"] = rows
        print("\n## Dense vs blockwise attention, forward+backward (B=1, H=4, K=2, Dh=64, causal)\n")
        print(markdown_table(rows, ["T", "impl", "peak", "fwd+bwd ms", "compile s", "mem vs dense",
                                    "time vs dense"]))
    if "throughput" not in skip:
        rows = _throughput_rows(steps=5 if args.quick else 10)
        out["throughput"] = rows
        print("\n## Quickstart train-step throughput\n")
        print(markdown_table(rows, ["run", "batch x T", "step ms", "tokens/s", "compile s"]))
    if "compile" not in skip:
        rows = _compile_rows()
        out["compile"] = rows
        print("\n## Compile time under nn.scan (llama small, T=128)\n")
        print(markdown_table(rows, ["layers", "compile s (fwd+bwd, scanned)", "ratio 32/4"]))
    path = write_results("attention", [r for v in out.values() for r in v], args.out, extra=out)
    print(f"\nwrote {path}")
    return 0
