"""`archlab bench kernels`: flash attention and grouped matmul (gmm) vs their baselines.

Attention, forward and forward+backward (``vjp`` with a fixed cotangent), causal:

* ``flash-pallas``: ``pallas_kernels.flash_attention(impl="pallas")``, the backend's
  own kernel (Mosaic TPU on TPU, the GPU kernel on GPU; timed there only);
* ``dpa-xla`` / ``dpa-cudnn``: ``jax.nn.dot_product_attention`` (cudnn on GPU only);
* ``tokamax``: ``tokamax.dot_product_attention`` with tokamax's default kernel for
  the backend (its XLA path on CPU);
* ``dense-xla``: ``flash_attention(impl="xla")`` = ``reference_attention`` (pure JAX);
* ``blockwise-xla``: ``layers.attention.blockwise.blockwise_attention`` (pure-JAX
  FlashAttention).

TFLOP/s use model FLOPs: forward ``4 B H T S Dh * f`` (``f`` the visible fraction,
``(T + 1) / 2T`` causal), forward+backward 3.5x forward (the FlashAttention-2
convention). ``vs_xla`` / ``vs_cudnn``: baseline time / row time, measured in the
same run (> 1: faster than the baseline). ``err``: relative RMS error of the
forward output vs ``dpa-xla``.

gmm (``M = tokens * k`` rows sorted into E groups of random sizes, ``[M, D] x [E, D, F]``):

* ``gmm-pallas`` (the backend's own kernel: ``impl="pallas_tpu"`` on TPU,
  ``"pallas_gpu"`` on GPU; timed there only), ``gmm-xla`` (the tiled scan of
  ``pallas_kernels.grouped_matmul``), ``ragged_dot`` (``jax.lax.ragged_dot``),
  ``tokamax`` (``tokamax.ragged_dot``, its default kernel for the backend),
  ``capacity-einsum`` (the matmul of a capacity-buffer MoE, ``[E, C, D] x [E, D, F]``
  with ``C = 1.25 M / E``; dispatch and combine are not included). TFLOP/s count
  useful work only, ``2 M D F`` forward and 3x for forward+backward;
  ``vs_ragged``: ragged_dot time / row time.

Interpret-mode rows (``mode="smoke"``, on CPU only): the Pallas kernels run once on a
small shape in their CPU interpreters (``pallas_tpu``: TPU interpret mode;
``pallas_triton``: the generic Pallas interpreter) and report only the error vs the
reference. They are a smoke check, never timed and never compared with anything
(an interpreter says nothing about speed). The default shapes are the issue's
accelerator shapes and are refused on CPU; ``--quick`` is CPU-sized.

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

NEEDS_DEVICE = "needs a GPU or TPU (Pallas interpret mode is not timed)"
SMOKE_NOTE = "interpret mode on CPU: correctness smoke check, not timed"


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


# The accelerator shapes (bf16, causal, Dh = 128, T = 8192; gmm E = 64, k = 2)
# and a CPU-sized set that finishes in a few minutes on 2 cores.
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


def _tokamax():
    """The tokamax module, or None when the optional package is not installed."""
    try:
        import tokamax
    except ImportError:
        return None
    return tokamax


def _fwd_bwd(f, cot):
    def run(*args):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(cot)
    return run


# --------------------------------------------------------------------------------------
# attention

def attention_rows(s: Shapes, backend: str, repeats: int) -> list[dict]:
    from layers.attention.blockwise import blockwise_attention
    from pallas_kernels import flash_attention

    gpu, device = backend == "gpu", backend in ("gpu", "tpu")
    tk = _tokamax()
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
        "tokamax": (lambda q, k, v: tk.dot_product_attention(q, k, v, is_causal=True))
        if tk is not None else None,
        "flash-pallas": (lambda q, k, v: flash_attention(q, k, v, impl="pallas"))
        if device else None,
        "dense-xla": lambda q, k, v: flash_attention(q, k, v, impl="xla"),
        "blockwise-xla": lambda q, k, v: blockwise_attention(q, k, v, causal=True),
    }
    shape = f"B{s.b} T{s.t} H{s.h} K{s.kh} Dh{s.dh} {s.dtype}"
    rows, base, ref_out = [], {}, None
    for name, f in paths.items():
        if f is None:
            if name == "flash-pallas":
                rows.append({"op": "attention", "path": name, "shape": shape,
                             "note": NEEDS_DEVICE})
            elif name == "tokamax":
                rows.append({"op": "attention", "path": name, "shape": shape,
                             "note": "tokamax not installed (pip install -e '.[tokamax]')"})
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


def attention_smoke_rows() -> list[dict]:
    """Pallas attention kernels once in their CPU interpreters (untimed; error vs reference)."""
    from pallas_kernels import flash_attention, reference_attention

    ks = jax.random.split(jax.random.key(1), 3)
    b, t, h, kh, dh = 1, 128, 2, 1, 64
    q = jax.random.normal(ks[0], (b, t, h, dh), jnp.float32)
    k = jax.random.normal(ks[1], (b, t, kh, dh), jnp.float32)
    v = jax.random.normal(ks[2], (b, t, kh, dh), jnp.float32)
    ref = reference_attention(q, k, v, causal=True)
    rows = []
    for impl in ("pallas_tpu", "pallas_triton"):
        row = {"op": "attention", "path": f"flash-{impl}", "mode": "smoke",
               "shape": f"B{b} T{t} H{h} K{kh} Dh{dh} float32"}
        try:
            out = jax.jit(lambda q, k, v: flash_attention(q, k, v, impl=impl))(q, k, v)
            row.update(err=_rel(out, ref), note=SMOKE_NOTE)
        except Exception as e:
            row["note"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
        rows.append(row)
        print(row, flush=True)
    return rows


# --------------------------------------------------------------------------------------
# gmm

def _group_sizes(key, m: int, e: int):
    ids = jax.random.randint(key, (m,), 0, e)
    return jnp.bincount(ids, length=e).astype(jnp.int32)


def gmm_rows(s: Shapes, backend: str, repeats: int) -> list[dict]:
    from pallas_kernels import gmm

    device = backend in ("gpu", "tpu")
    tk = _tokamax()
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
            "tokamax": (lambda x, w: tk.ragged_dot(x, w, sizes)) if tk is not None else None,
            "gmm-pallas": (lambda x, w: gmm(x, w, sizes, impl="pallas")) if device else None,
            "gmm-xla": lambda x, w: gmm(x, w, sizes, impl="xla"),
            "capacity-einsum": lambda x, w: jnp.einsum("ecd,edf->ecf", x, w),
        }
        base, ref_out, block = {}, None, []
        for name, fn in paths.items():
            if fn is None:
                note = (NEEDS_DEVICE if name == "gmm-pallas"
                        else "tokamax not installed (pip install -e '.[tokamax]')")
                block.append({"op": "gmm", "path": name, "shape": shape, "note": note})
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


def gmm_smoke_rows() -> list[dict]:
    """Pallas gmm kernels (fwd + vjp) once in their CPU interpreters (untimed; err vs reference)."""
    from pallas_kernels import gmm, gmm_reference

    m, d, f, e = 200, 128, 256, 4
    ks = jax.random.split(jax.random.key(2), 3)
    lhs = jax.random.normal(ks[0], (m, d), jnp.float32)
    rhs = jax.random.normal(ks[1], (e, d, f), jnp.float32)
    cot = jax.random.normal(ks[2], (m, f), jnp.float32)
    sizes = jnp.asarray([70, 0, 90, 30], jnp.int32)
    ref = _fwd_bwd(lambda x, w: gmm_reference(x, w, sizes), cot)(lhs, rhs)
    rows = []
    for impl in ("pallas_tpu", "pallas_triton"):
        row = {"op": "gmm", "path": f"gmm-{impl}", "mode": "smoke",
               "shape": f"M{m} D{d} F{f} E{e} float32 (fwd+bwd)"}
        try:
            fn = _fwd_bwd(lambda x, w: gmm(x, w, sizes, impl=impl), cot)
            got = jax.jit(fn)(lhs, rhs)
            row.update(err=max(_rel(a, b) for a, b in zip(jax.tree.leaves(got),
                                                         jax.tree.leaves(ref))),
                       note=SMOKE_NOTE)
        except Exception as ex:
            row["note"] = f"failed: {type(ex).__name__}: {str(ex)[:80]}"
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="archlab bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small fp32 shapes for a 2-core CPU (default: accelerator shapes)")
    p.add_argument("--only", choices=("attention", "gmm"), default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats={args.repeats} must be >= 1")
    s = QUICK if args.quick else DEFAULT
    backend = jax.default_backend()
    if backend == "cpu" and not args.quick:
        raise ValueError(f"archlab bench kernels: the default shapes are accelerator shapes "
                         f"(T={DEFAULT.t}, gmm M={DEFAULT.tokens * DEFAULT.topk}); on backend "
                         f"{backend!r} use --quick")
    print_header(f"kernels: {'quick' if args.quick else 'default'} shapes {dataclasses.asdict(s)}")
    if backend == "cpu":
        print(f"backend cpu: Pallas kernels {NEEDS_DEVICE}; XLA paths timed; "
              "interpret-mode rows are an untimed smoke check.")
    rows = []
    if args.only in (None, "attention"):
        rows += attention_rows(s, backend, args.repeats)
        if backend == "cpu":
            rows += attention_smoke_rows()
    if args.only in (None, "gmm"):
        rows += gmm_rows(s, backend, args.repeats)
        if backend == "cpu":
            rows += gmm_smoke_rows()
    gpu = backend == "gpu"
    for op, ratios in (("attention", ["vs_xla", "vs_cudnn"] if gpu else ["vs_xla"]),
                       ("gmm", ["vs_ragged"])):
        part = [r for r in rows if r["op"] == op]
        if part:
            cols = ["path", "mode", "shape", "ms", "tflops", *ratios, "err", "compile_s", "note"]
            print(f"\n## {op}\n")
            print(markdown_table(part, cols))
    print("\nms: median wall time; tflops: model FLOPs / time; vs_*: baseline time / row time "
          "(same run); err: relative RMS error vs dpa-xla (attention) or ragged_dot (gmm); "
          "smoke rows: interpret mode, err vs the fp32 reference, not timed")
    print("wrote", write_results("kernels", rows, args.out,
                                 extra={"args": vars(args), "shapes": dataclasses.asdict(s)}))
    return 0
