"""`archlab bench moe`: MoE layer time, FLOPs and memory per token, forward and train, per
dispatch, vs a dense SwiGLU FFN with the same ACTIVE parameters (hidden width ``k * F``),
for E experts and top-k.

Paths (layers/moe/dispatch.py): ``capacity`` (per-sequence sort + ``[E, Cap, D]`` buffers
+ batched matmuls + scatter; drops past Cap), ``dropless`` (exact; on CPU its XLA
formulation: buffers at the mean expert load plus the overflow in a loop of single-expert
tiles, layers/moe/overflow.py; on TPU/GPU sort + Pallas grouped matmuls), ``onehot``
(GShard einsum dispatch) and ``dense`` (every expert on every token: the reference, E
times the active FLOPs). Each row is the whole MoE layer (router, routing, dispatch):
``fwd`` is the jitted forward, ``train`` is ``jit(value_and_grad)`` of
``sum(y * cotangent)`` w.r.t. the input and every parameter.

Columns: ``fwd_ms``/``train_ms`` (medians), ``x_train`` (train time / dense-active's),
``mflop_tok_fwd``/``mflop_tok_train``: analytic matmul FLOPs per token (the expert rows
each path computes x 6 D F, plus the router; train = 3x forward; dense-active's FFN
``6 D k F``; ``dropless`` counts its buffers plus the overflow tiles of this run's
routing, read from the layer's ``moe_load``), ``gflop_xla_train``: XLA's cost analysis
(it counts a loop body once, so it undercounts ``dropless``), ``kib_tok_fwd``/
``kib_tok_train``: XLA's compiled temp bytes per token, ``dropped``: share of the
selected assignments not computed.

Variants of one (E, k) are timed in alternating rounds (median of ``--repeats``), so
slow drifts of background load affect them alike. Targets (CPU): capacity train time
<= 1.5x dense-active; dropless faster than capacity when routing is balanced.

  archlab bench moe [--tokens 2048] [--seq 512] [--d-model 256] [--hidden 512]
                    [--experts 8,64] [--topk 1,2,8] [--paths capacity,dropless,onehot,dense]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.common import (compile_fn, compiled_stats, markdown_table, print_header,
                                      write_results)
from layers.ffn import FFNConfig
from layers.moe import MoEConfig
from layers.moe.dispatch import expert_capacity

PATHS = ("capacity", "dropless", "onehot", "dense")
MODES = ("fwd", "train")


def _compiled(module, x) -> dict:
    """Compiled forward and train step of ``module``, their arguments and the layer's aux."""
    params = jax.jit(module.init)(jax.random.PRNGKey(0), x)
    cot = jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype)

    def loss(p, x, cot):  # value_and_grad: like training, the layer output is needed
        y, _, aux = module.apply(p, x)
        return jnp.sum(y * cot) + sum(jnp.sum(v) for v in aux.get("losses", {}).values())

    fwd, fwd_s = compile_fn(lambda p, x: module.apply(p, x)[0], params, x)
    train, train_s = compile_fn(jax.value_and_grad(loss, argnums=(0, 1)), params, x, cot)
    aux = jax.jit(lambda p, x: module.apply(p, x)[2])(params, x)
    return {"fwd": (fwd, (params, x)), "train": (train, (params, x, cot)),
            "compile_s": fwd_s + train_s, "aux": aux}


def _overflow_rows(counts: np.ndarray, cap: int) -> int:
    """Rows the dropless overflow loop computes for per-expert ``counts`` past ``cap``."""
    from layers.moe.overflow import TILE_SIZES
    rows = 0
    for c in counts:
        rest = max(int(c) - cap, 0)
        for i, (bm, _) in enumerate(TILE_SIZES):
            last = i == len(TILE_SIZES) - 1
            n = -(-rest // bm) if last else rest // bm
            rows, rest = rows + n * bm, rest - min(rest, n * bm)
    return rows


def _expert_rows(path: str, n: int, seq: int, e: int, k: int, cf: float, aux) -> float:
    """Expert rows (token copies) each path multiplies by the expert weights."""
    if path == "dense":
        return n * e
    if path == "dropless" and jax.default_backend() != "cpu":
        return n * k                                                # sorted grouped matmuls
    if path == "dropless":  # the XLA formulation: buffers at the mean load + overflow tiles
        cap = expert_capacity(n, e, k, 1.0)
        counts = np.round(np.asarray(aux["metrics"]["moe_load"]) * n * k)
        return e * cap + _overflow_rows(counts, cap)
    return (n // seq) * e * expert_capacity(seq, e, k, cf)          # capacity, onehot


def _model_flops(path: str, n: int, seq: int, d: int, f: int, e: int, k: int, cf: float,
                 aux) -> float:
    """Analytic forward matmul FLOPs (3 SwiGLU matmuls of rows x d x f, 2 per mul-add)."""
    if path == "dense-active":
        return 3 * 2 * n * d * k * f
    flops = 3 * 2 * _expert_rows(path, n, seq, e, k, cf, aux) * d * f + 2 * n * d * e  # + router
    if path == "onehot":
        cap = expert_capacity(seq, e, k, cf)
        flops += 2 * 2 * n * e * cap * d                 # dispatch + combine einsums
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


def _block(args, x, e: int, k: int) -> list[dict]:
    """Rows of one (E, k): every path and dense-active, both modes."""
    d, f, n, seq, cf = args.d_model, args.hidden, args.tokens, args.seq, args.capacity_factor
    modules = {"dense-active": FFNConfig(activation="swiglu", hidden=k * f)}
    for path in args.paths:
        modules[path] = MoEConfig(n_experts=e, top_k=k, hidden=f, dispatch=path,
                                  capacity_factor=cf, expert_parallel=False)
        modules[path].validate(d)
    built = {name: _compiled(m.make(d, jnp.float32, jnp.float32), x)
             for name, m in modules.items()}
    times = {mode: dict(zip(built, _interleaved_times([b[mode] for b in built.values()],
                                                      args.repeats)))
             for mode in MODES}
    rows = []
    for name, b in built.items():
        st = {mode: compiled_stats(b[mode][0]) for mode in MODES}
        flops = _model_flops(name, n, seq, d, f, e, k, cf, b["aux"])
        metrics = b["aux"].get("metrics", {}) if isinstance(b["aux"], dict) else {}
        rows.append({
            "E": e, "k": k, "path": name,
            "fwd_ms": times["fwd"][name] * 1e3, "train_ms": times["train"][name] * 1e3,
            "x_train": times["train"][name] / times["train"]["dense-active"],
            "mflop_tok_fwd": flops / n / 1e6, "mflop_tok_train": 3 * flops / n / 1e6,
            "gflop_xla_train": st["train"]["flops"] / 1e9,
            "kib_tok_fwd": st["fwd"]["temp_bytes"] / n / 1024,
            "kib_tok_train": st["train"]["temp_bytes"] / n / 1024,
            "dropped": float(metrics.get("moe_dropped", 0.0)), "compile_s": b["compile_s"]})
        print(rows[-1], flush=True)
    return rows


def run(args) -> list[dict]:
    if args.tokens % args.seq:
        raise ValueError(f"--tokens={args.tokens} must be a multiple of --seq={args.seq}")
    x = jax.random.normal(jax.random.PRNGKey(2), (args.tokens // args.seq, args.seq,
                                                  args.d_model), jnp.float32)
    return [row for e in args.experts for k in args.topk if k <= e
            for row in _block(args, x, e, k)]


COLUMNS = ["E", "k", "path", "fwd_ms", "train_ms", "x_train", "mflop_tok_fwd",
           "mflop_tok_train", "gflop_xla_train", "kib_tok_fwd", "kib_tok_train", "dropped",
           "compile_s"]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="archlab bench moe", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per call (B * T)")
    p.add_argument("--seq", type=int, default=512,
                   help="sequence length T (capacity is per sequence)")
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
    print_header(f"moe: forward and train (fwd+bwd), tokens={args.tokens} (T={args.seq}), "
                 f"D={args.d_model}, F={args.hidden}, capacity_factor={args.capacity_factor}")
    rows = run(args)
    print(markdown_table(rows, COLUMNS))
    print("x_train: train time / dense-active's in the same (E, k) block; mflop_tok: analytic "
          "matmul FLOPs per token; kib_tok: XLA compiled temp bytes per token")
    print("wrote", write_results("moe", rows, args.out, extra={"args": vars(args)}))
    return 0
