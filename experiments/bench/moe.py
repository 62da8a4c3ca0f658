"""`archlab bench moe`: MoE layer forward+backward time and FLOPs vs a dense SwiGLU FFN
with the same ACTIVE parameters (hidden width ``k * F``), for E experts and top-k.

Paths: ``capacity`` (sort + [E, C, D] buffers + batched matmuls + scatter),
``dropless`` (sort + ``pallas_kernels.grouped_matmul``; its XLA scan on CPU), ``onehot`` (GShard
einsum dispatch). Each row is the whole MoE layer (router, routing, dispatch), timed
as ``jit(value_and_grad)`` of ``sum(y * cotangent)`` w.r.t. the input and every
parameter.
FLOPs are XLA's cost analysis of that compiled function; XLA counts a loop body once,
so ``dropless`` (a ``lax.scan``) is undercounted there and ``flops_model`` gives the
analytic matmul FLOPs of each path (6 matmuls per SwiGLU x 3 for fwd+bwd).

Variants of one (E, k) are timed in alternating rounds (median of ``--repeats``), so
slow drifts of background load affect them alike. Targets (CPU): capacity time <= 1.5x
dense-active; capacity FLOPs <= capacity_factor * 1.05 x dense-active.

  archlab bench moe [--tokens 2048] [--seq 1024] [--d-model 256] [--hidden 512]
                    [--experts 8,64] [--topk 1,2,8] [--paths capacity,dropless,onehot]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from experiments.bench.common import (compile_fn, compiled_stats, markdown_table, print_header,
                                      write_results)
from layers.ffn import FFNConfig
from layers.moe import MoEConfig
from layers.moe.dispatch import expert_capacity

PATHS = ("capacity", "dropless", "onehot")


def _grad_fn(module, x):
    """Compiled fwd+bwd of ``module`` and its arguments."""
    params = jax.jit(module.init)(jax.random.PRNGKey(0), x)
    cot = jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype)

    def loss(p, x, cot):  # value_and_grad: like training, the layer output is needed
        y, _, aux = module.apply(p, x)
        return jnp.sum(y * cot) + sum(jnp.sum(v) for v in aux.get("losses", {}).values())

    fn = jax.value_and_grad(loss, argnums=(0, 1))
    compiled, compile_s = compile_fn(fn, params, x, cot)
    return compiled, (params, x, cot), compile_s


def _model_flops(path: str, n: int, seq: int, d: int, f: int, e: int, k: int, cf: float) -> float:
    """Analytic fwd+bwd matmul FLOPs: 3 SwiGLU matmuls of rows x d x f, times 2 (mul-add) x 3."""
    n_seqs = n // seq                                      # sequences (capacity is per sequence)
    if path == "dense":
        rows, width = n, k * f
    elif path == "dropless":
        rows, width = n * k, f
    else:
        rows, width = n_seqs * e * expert_capacity(seq, e, k, cf), f
    flops = 3 * 2 * rows * d * width * 3
    if path != "dense":
        flops += 2 * n * d * e * 3                           # router
    if path == "onehot":
        cap = expert_capacity(seq, e, k, cf)
        flops += 2 * 2 * n_seqs * seq * e * cap * d * 3        # dispatch + combine einsums
    return float(flops)


def _interleaved_times(fns: list, repeats: int) -> list[float]:
    """Median seconds of each ``(compiled, args)``, timed in alternating rounds so that
    drifting background load hits every variant alike (ratios are what we report)."""
    for compiled, fargs in fns:
        jax.block_until_ready(compiled(*fargs))           # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, (compiled, fargs) in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*fargs))
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def run(args) -> list[dict]:
    d, f, n, seq, cf = args.d_model, args.hidden, args.tokens, args.seq, args.capacity_factor
    if n % seq:
        raise ValueError(f"--tokens={n} must be a multiple of --seq={seq}")
    x = jax.random.normal(jax.random.PRNGKey(2), (n // seq, seq, d), jnp.float32)
    rows = []
    for e in args.experts:
        for k in args.topk:
            if k > e:
                continue
            modules = {"dense-active": FFNConfig(activation="swiglu", hidden=k * f)}
            for path in args.paths:
                modules[path] = MoEConfig(n_experts=e, top_k=k, hidden=f, dispatch=path,
                                          capacity_factor=cf, expert_parallel=False)
                modules[path].validate(d)
            built = {name: _grad_fn(m.make(d, jnp.float32, jnp.float32), x)
                     for name, m in modules.items()}
            times = _interleaved_times([(c, a) for c, a, _ in built.values()], args.repeats)
            base_t, base_flops = times[0], compiled_stats(built["dense-active"][0])["flops"]
            for (name, (compiled, _, cs)), t in zip(built.items(), times):
                st = compiled_stats(compiled)
                model_path = "dense" if name == "dense-active" else name
                rows.append({"E": e, "k": k, "path": name, "ms": t * 1e3, "x_time": t / base_t,
                             "gflops_xla": st["flops"] / 1e9, "x_flops": st["flops"] / base_flops,
                             "gflops_model": _model_flops(model_path, n, seq, d, f, e, k, cf) / 1e9,
                             "compile_s": cs, "peak": st["peak_bytes"] / 2**20})
                print(rows[-1], flush=True)
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="archlab bench moe", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per call (B * T)")
    p.add_argument("--seq", type=int, default=1024, help="sequence length T (capacity is per sequence)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512, help="expert width F")
    p.add_argument("--experts", type=lambda s: [int(v) for v in s.split(",")], default=[8, 64])
    p.add_argument("--topk", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 8])
    p.add_argument("--paths", type=lambda s: s.split(","), default=list(PATHS))
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    for path in args.paths:
        if path not in PATHS:
            raise ValueError(f"--paths: {path!r} is not one of {list(PATHS)}")
    print_header(f"moe: fwd+bwd, tokens={args.tokens} (T={args.seq}), D={args.d_model}, "
                 f"F={args.hidden}, capacity_factor={args.capacity_factor}")
    rows = run(args)
    cols = ["E", "k", "path", "ms", "x_time", "gflops_xla", "x_flops", "gflops_model", "compile_s",
            "peak"]
    print(markdown_table(rows, cols))
    print("x_time / x_flops: ratio to dense-active in the same (E, k) block; peak: MiB (XLA estimate)")
    print("wrote", write_results("moe", rows, args.out, extra={"args": vars(args)}))
    return 0
