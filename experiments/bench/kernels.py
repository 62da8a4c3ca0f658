"""`archlab bench kernels`: flash attention and grouped matmul (gmm) vs their baselines.

Attention, forward and forward+backward (``vjp`` with a fixed cotangent), causal:

* ``flash-pallas``: ``pallas_kernels.flash_attention(impl="pallas")`` (GPU only);
* ``dpa-xla`` / ``dpa-cudnn``: ``jax.nn.dot_product_attention`` (cudnn on GPU only);
* ``dense-xla``: ``flash_attention(impl="xla")`` = ``reference_attention`` (pure JAX);
* ``blockwise-xla``: ``layers.blockwise_attention`` (pure-JAX FlashAttention).

TFLOP/s use model FLOPs: forward ``4 B H T S Dh * f`` (``f`` the visible fraction,
``(T + 1) / 2T`` causal), forward+backward 3.5x forward (the FlashAttention-2
convention). ``vs_xla`` / ``vs_cudnn``: baseline time / row time, measured in the
same run (> 1: faster than the baseline). ``err``: relative RMS error of the
forward output vs ``dpa-xla``.

gmm (``M = tokens * k`` rows sorted into E groups of random sizes, ``[M, D] x [E, D, F]``):

* ``gmm-pallas`` (GPU only), ``gmm-xla`` (the tiled scan of ``pallas_kernels.grouped_matmul``),
  ``ragged_dot`` (``jax.lax.ragged_dot``), ``capacity-einsum`` (the matmul of a
  capacity-buffer MoE, ``[E, C, D] x [E, D, F]`` with ``C = 1.25 M / E``; dispatch
  and combine are not included). TFLOP/s count useful work only, ``2 M D F``
  forward and 3x for forward+backward; ``vs_ragged``: ragged_dot time / row time.

On CPU the Pallas rows are not timed (interpret mode is a correctness tool, far
too slow to mean anything) and are listed as needing a GPU. The default shapes are
the issue's GPU shapes and are refused on other backends; ``--quick`` is CPU-sized.

  archlab bench kernels [--quick] [--only attention|gmm] [--repeats 5] [--out bench_out]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.common import (compile_fn, markdown_table, print_header, time_compiled,
                                      write_results)

NEEDS_GPU = "needs a GPU (Pallas interpret mode is not timed)"


@dataclasses.dataclass(frozen=True)
class Shapes:
    b: int
    t: int
    h: int
    kh: int
    dh: int
    tokens: int
    topk: int
    d_model: int
    hidden: int
    experts: tuple[int, ...]
    dtype: str


# The GPU shapes (bf16, causal, Dh = 128, T = 8192; gmm E = 64, k = 2) and a
# CPU-sized set that finishes in about a minute on 2 cores.
DEFAULT = Shapes(b=2, t=8192, h=16, kh=8, dh=128, tokens=8192, topk=2, d_model=2048,
                 hidden=1024, experts=(64,), dtype="bfloat16")
QUICK = Shapes(b=1, t=1024, h=4, kh=2, dh=64, tokens=1024, topk=2, d_model=256, hidden=512,
               experts=(8, 64), dtype="float32")


def _rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


def _time(fn, args, repeats):
    """(median seconds, compile seconds, output) of ``jit(fn)(*args)``."""
    compiled, compile_s = compile_fn(fn, *args)
    out = compiled(*args)
    return time_compiled(compiled, *args, repeats=repeats), compile_s, out


def _fwd_bwd(f, cot):
    def run(*args):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(cot)
    return run


# --------------------------------------------------------------------------------------
# attention

def attention_rows(s: Shapes, gpu: bool, repeats: int) -> list[dict]:
    from layers.blockwise_attention import blockwise_attention
    from pallas_kernels import flash_attention

    dt = jnp.dtype(s.dtype)
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (s.b, s.t, s.h, s.dh), dt)
    k = jax.random.normal(ks[1], (s.b, s.t, s.kh, s.dh), dt)
    v = jax.random.normal(ks[2], (s.b, s.t, s.kh, s.dh), dt)
    cot = jax.random.normal(ks[3], q.shape, dt)
    fwd_flops = 4 * s.b * s.h * s.t * s.t * s.dh * (s.t + 1) / (2 * s.t)
    paths = {  # the baselines first: later rows compare with them
        "dpa-xla": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="xla"),
        "dpa-cudnn": (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")) if gpu else None,
        "flash-pallas": (lambda q, k, v: flash_attention(q, k, v, impl="pallas")) if gpu else None,
        "dense-xla": lambda q, k, v: flash_attention(q, k, v, impl="xla"),
        "blockwise-xla": lambda q, k, v: blockwise_attention(q, k, v, causal=True),
    }
    shape = f"B{s.b} T{s.t} H{s.h} K{s.kh} Dh{s.dh} {s.dtype}"
    rows, base, ref_out = [], {}, None
    for name, f in paths.items():
        if f is None:
            if name == "flash-pallas":
                rows.append({"op": "attention", "path": name, "shape": shape, "note": NEEDS_GPU})
            continue
        for mode, fn, flops in (("fwd", f, fwd_flops), ("fwd+bwd", _fwd_bwd(f, cot),
                                                        3.5 * fwd_flops)):
            try:
                sec, cs, out = _time(fn, (q, k, v), repeats)
            except Exception as e:  # e.g. cudnn unsupported for this shape/GPU
                rows.append({"op": "attention", "path": name, "mode": mode, "shape": shape,
                             "note": f"failed: {type(e).__name__}: {str(e)[:80]}"})
                print(rows[-1], flush=True)
                continue
            base[(name, mode)] = sec
            row = {"op": "attention", "path": name, "mode": mode, "shape": shape,
                   "ms": sec * 1e3, "tflops": flops / sec / 1e12, "compile_s": cs}
            for col, b in (("vs_xla", "dpa-xla"), ("vs_cudnn", "dpa-cudnn")):
                if (b, mode) in base:
                    row[col] = base[(b, mode)] / sec
            if mode == "fwd":
                ref_out = out if ref_out is None else ref_out
                row["err"] = _rel(out, ref_out)
            rows.append(row)
            print(row, flush=True)
    return rows


# --------------------------------------------------------------------------------------
# gmm

def _group_sizes(key, m: int, e: int):
    ids = jax.random.randint(key, (m,), 0, e)
    return jnp.bincount(ids, length=e).astype(jnp.int32)


def gmm_rows(s: Shapes, gpu: bool, repeats: int) -> list[dict]:
    from pallas_kernels import gmm

    dt = jnp.dtype(s.dtype)
    m, d, f = s.tokens * s.topk, s.d_model, s.hidden
    rows = []
    for e in s.experts:
        ks = jax.random.split(jax.random.key(e), 4)
        lhs = jax.random.normal(ks[0], (m, d), dt)
        rhs = jax.random.normal(ks[1], (e, d, f), dt) * d ** -0.5
        sizes = _group_sizes(ks[2], m, e)
        cot = jax.random.normal(ks[3], (m, f), dt)
        cap = int(np.ceil(1.25 * m / e))
        buf = jax.random.normal(ks[0], (e, cap, d), dt)
        cap_cot = jax.random.normal(ks[3], (e, cap, f), dt)
        flops = 2 * m * d * f
        shape = f"M{m} D{d} F{f} E{e} k{s.topk} {s.dtype}"
        paths = {  # the baseline first: later rows compare with it
            "ragged_dot": lambda x, w: jax.lax.ragged_dot(x, w, sizes),
            "gmm-pallas": (lambda x, w: gmm(x, w, sizes, impl="pallas")) if gpu else None,
            "gmm-xla": lambda x, w: gmm(x, w, sizes, impl="xla"),
            "capacity-einsum": lambda x, w: jnp.einsum("ecd,edf->ecf", x, w),
        }
        base, ref_out, block = {}, None, []
        for name, fn in paths.items():
            if fn is None:
                block.append({"op": "gmm", "path": name, "shape": shape, "note": NEEDS_GPU})
                continue
            x, c = (buf, cap_cot) if name == "capacity-einsum" else (lhs, cot)
            for mode, g, fl in (("fwd", fn, flops), ("fwd+bwd", _fwd_bwd(fn, c), 3 * flops)):
                sec, cs, out = _time(g, (x, rhs), repeats)
                base[(name, mode)] = sec
                row = {"op": "gmm", "path": name, "mode": mode, "shape": shape,
                       "ms": sec * 1e3, "tflops": fl / sec / 1e12, "compile_s": cs,
                       "vs_ragged": base[("ragged_dot", mode)] / sec}
                if mode == "fwd" and name != "capacity-einsum":
                    ref_out = out if ref_out is None else ref_out
                    row["err"] = _rel(out, ref_out)
                block.append(row)
                print(row, flush=True)
        rows += block
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="archlab bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small fp32 shapes for a 2-core CPU (default: the issue's GPU shapes)")
    p.add_argument("--only", choices=("attention", "gmm"), default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats={args.repeats} must be >= 1")
    s = QUICK if args.quick else DEFAULT
    gpu = jax.default_backend() == "gpu"
    if not gpu and not args.quick:
        raise ValueError(f"archlab bench kernels: the default shapes are the GPU shapes "
                         f"(T={DEFAULT.t}, gmm M={DEFAULT.tokens * DEFAULT.topk}); on backend "
                         f"{jax.default_backend()!r} use --quick")
    print_header(f"kernels: {'quick' if args.quick else 'default'} shapes {dataclasses.asdict(s)}")
    if not gpu:
        print(f"backend {jax.default_backend()}: Pallas rows {NEEDS_GPU}; XLA paths timed.")
    rows = []
    if args.only in (None, "attention"):
        rows += attention_rows(s, gpu, args.repeats)
    if args.only in (None, "gmm"):
        rows += gmm_rows(s, gpu, args.repeats)
    for op, ratios in (("attention", ["vs_xla", "vs_cudnn"] if gpu else ["vs_xla"]),
                       ("gmm", ["vs_ragged"])):
        part = [r for r in rows if r["op"] == op]
        if part:
            cols = ["path", "mode", "shape", "ms", "tflops", *ratios, "err", "compile_s", "note"]
            print(f"\n## {op}\n")
            print(markdown_table(part, cols))
    print("\nms: median wall time; tflops: model FLOPs / time; vs_*: baseline time / row time "
          "(same run); err: relative RMS error vs dpa-xla (attention) or ragged_dot (gmm)")
    print("wrote", write_results("kernels", rows, args.out,
                                 extra={"args": vars(args), "shapes": dataclasses.asdict(s)}))
    return 0
