"""``archlab bench mixers``: every registered sequence mixer, measured alone.

1. Forward+backward time (median) and XLA's compiled peak memory vs T for each mixer in
   ``layers.registry.MIXERS`` (one module, ``d_model=128``, B=1, default config per kind from
   ``DEFAULTS``; a kind without an entry is built with its dataclass defaults, so new
   mixers join automatically) plus softmax attention ``dense`` and ``blockwise``; and
   the ratio ``time(2T) / time(T)`` (linear-time mixers should be ~2).
2. Implementations of the same function: Mamba's associative scan over all of T vs
   chunked along T vs ``lax.scan``; Mamba-2 SSD chunked vs associative vs sequential.
3. Decoding: one-token step time (tokens/s at B=1) and decode-state bytes vs context
   length (flat for recurrent mixers, growing for attention's KV cache).

Times are medians of round-robin repeats (all lengths of a mixer, or all algorithms at
one length, take turns), so a change in background load does not skew the ratios.

Flags: ``--quick`` (T = 2k/4k/8k, 2 repeats: ~3 min for the linear-time mixers, ~8 min
with every mixer registered today on a 2-core CPU), ``--mixers mamba,retnet,...``
(registry kinds or the labels ``attention:dense`` / ``attention:blockwise``),
``--lengths 1024,4096``, ``--decode-lengths``, ``--parts fwdbwd,impls,decode``,
``--repeats``, ``--out DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from experiments.bench.common import (compile_fn, compiled_stats, fmt_bytes, markdown_table,
                                      print_header, time_compiled, write_results)

D_MODEL = 128


def _defaults():
    """label -> mixer config at D_MODEL; kinds of ``layers.registry.MIXERS`` missing here use
    their dataclass defaults."""
    from layers.registry import MIXERS
    from layers.attention import AttentionConfig

    known = {
        "attention:dense": AttentionConfig(n_heads=4, attn_impl="dense"),
        "attention:blockwise": AttentionConfig(n_heads=4, attn_impl="blockwise", block_q=256, block_k=256),
        "mamba": MIXERS["mamba"](d_state=16, expand=2) if "mamba" in MIXERS else None,
        "mamba2": MIXERS["mamba2"](d_state=64, head_dim=64) if "mamba2" in MIXERS else None,
        "rwkv6": MIXERS["rwkv6"](head_dim=64, mix_rank=32, decay_rank=64) if "rwkv6" in MIXERS else None,
        "retnet": MIXERS["retnet"](n_heads=4) if "retnet" in MIXERS else None,
        "linear_attention": MIXERS["linear_attention"](n_heads=4) if "linear_attention" in MIXERS else None,
        "performer": MIXERS["performer"](n_heads=4) if "performer" in MIXERS else None,
    }
    out = {k: v for k, v in known.items() if v is not None}
    for kind, cls in MIXERS.items():
        if kind != "attention" and kind not in out:
            out[kind] = cls()
    return out


def _module_inputs(cfg, t: int, batch: int = 1):
    module = cfg.make(D_MODEL, jnp.float32, jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, t, D_MODEL))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    variables = jax.jit(lambda x, p: module.init(jax.random.PRNGKey(1), x, positions=p))(x[:, :16], pos[:, :16])
    return module, variables, x, pos


def _compile_fwdbwd(cfg, t: int) -> tuple:
    """Compiles value_and_grad of ``mean(y^2)`` w.r.t. (params, x); runs it once (warm-up).
    Returns ``(run, row)``: ``run()`` executes it once; ``row`` has T, peak, compile and
    warm-up seconds."""
    module, variables, x, pos = _module_inputs(cfg, t)

    def loss(params, x):
        y, _, _ = module.apply({**variables, "params": params}, x, positions=pos)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))
    params = variables["params"]
    compiled, ctime = compile_fn(jax.value_and_grad(loss, argnums=(0, 1)), params, x)
    stats = compiled_stats(compiled)
    run = lambda: jax.block_until_ready(compiled(params, x))
    t0 = time.perf_counter()
    run()
    return run, {"T": t, "peak": fmt_bytes(stats["peak_bytes"]), "peak_bytes": stats["peak_bytes"],
                 "compile s": ctime, "first s": time.perf_counter() - t0}


def _interleaved(runs: dict, repeats: int) -> dict:
    """Median seconds per key, timing the runs round-robin so that a change in background
    load hits every key alike (ratios between keys are what the tables report)."""
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(v) for key, v in times.items()}


def _fwdbwd_rows(configs: dict, lengths, repeats: int, max_dense: int, budget_s: float):
    rows, ratios = [], []
    for label, cfg in configs.items():
        try:
            cfg.validate(D_MODEL, label)
        except ValueError as e:
            print(f"  skip {label}: default config invalid at d_model={D_MODEL}: {e}")
            continue
        runs, info, slow = {}, {}, False
        for t in lengths:
            if slow or (label == "attention:dense" and t > max_dense):
                info[t] = {"T": t, "fwd+bwd ms": "skipped"}
                continue
            try:
                runs[t], info[t] = _compile_fwdbwd(cfg, t)
            except Exception as e:  # one broken mixer must not end the whole benchmark
                print(f"  {label}: T={t} failed: {type(e).__name__}: {str(e)[:200]}")
                info[t] = {"T": t, "fwd+bwd ms": f"failed ({type(e).__name__})"}
                break
            slow = info[t]["first s"] > budget_s      # longer T would take too long
        med = _interleaved(runs, repeats)
        for t, row in info.items():
            if t in med:
                row["fwd+bwd ms"] = med[t] * 1e3
                print(f"  {label:24s} T={t:6d} {row['fwd+bwd ms']:10.1f} ms  peak {row['peak']}", flush=True)
            rows.append({"mixer": label, **row})
        ratio = {"mixer": label}
        for t in lengths:
            if t in med and 2 * t in med:
                ratio[f"t({2 * t})/t({t})"] = med[2 * t] / med[t]
        ratios.append(ratio)
    return rows, ratios


def _impl_rows(lengths, repeats: int, seq_max: int):
    from layers.recurrent.mamba import MambaConfig
    from layers.recurrent.mamba2 import Mamba2Config
    variants = [
        ("mamba", "associative (one scan over T)", MambaConfig(scan_chunk=0)),
        ("mamba", "chunked along T (C=128)", MambaConfig(scan_chunk=128)),
        ("mamba", "sequential (lax.scan)", MambaConfig(scan_impl="sequential")),
        ("mamba2", "chunked SSD (C=64)", Mamba2Config()),
        ("mamba2", "associative", Mamba2Config(scan_impl="associative")),
        ("mamba2", "sequential (lax.scan)", Mamba2Config(scan_impl="sequential")),
    ]
    rows = []
    for t in lengths:
        runs, info = {}, {}
        for fam, label, cfg in variants:
            if not (label.startswith("sequential") and t > seq_max):
                runs[(fam, label)], info[(fam, label)] = _compile_fwdbwd(cfg, t)
        med = _interleaved(runs, repeats)
        for (fam, label), row in info.items():
            chunked = [v for (f, lab), v in med.items() if f == fam and lab.startswith("chunked")]
            row.update({"mixer": fam, "impl": label, "fwd+bwd ms": med[(fam, label)] * 1e3,
                        "time / chunked": med[(fam, label)] / chunked[0]})
            rows.append(row)
            print(f"  {fam:7s} {label:32s} T={t:6d} {row['fwd+bwd ms']:10.1f} ms  peak {row['peak']}",
                  flush=True)
    return rows


def _filled(cache, n: int):
    """A cache whose ``index`` field (KV caches) says ``n`` tokens are already written."""
    idx = jnp.asarray(n, jnp.int32)
    if "index" in getattr(cache, "_fields", ()):
        return cache._replace(index=idx)
    if dataclasses.is_dataclass(cache) and any(f.name == "index" for f in dataclasses.fields(cache)):
        return dataclasses.replace(cache, index=idx)
    return cache


def _decode_rows(configs: dict, contexts, repeats: int):
    rows = []
    for label, cfg in configs.items():
        try:
            cfg.validate(D_MODEL, label)
        except ValueError:
            continue
        if not cfg.causal:
            print(f"  skip {label}: not causal (no decode form)")
            continue
        module, variables, x, pos = _module_inputs(cfg, 1)
        for ctx in contexts:
            try:
                cache = _filled(cfg.init_cache(D_MODEL, 1, ctx, jnp.float32), ctx - 1)
            except (ValueError, NotImplementedError) as e:  # a causal mixer must have one
                print(f"  {label}: init_cache failed: {type(e).__name__}: {str(e)[:200]}")
                rows.append({"mixer": label, "context": ctx, "step us": f"failed ({type(e).__name__})"})
                break
            step = lambda v, x, c: module.apply(v, x, positions=jnp.full((1, 1), ctx - 1, jnp.int32),
                                                cache=c)
            compiled, _ = compile_fn(step, variables, x, cache)
            sec = time_compiled(compiled, variables, x, cache, warmup=2, repeats=max(repeats, 10))
            rows.append({"mixer": label, "context": ctx, "step us": sec * 1e6, "tokens/s": 1.0 / sec,
                         "state": fmt_bytes(cfg.state_size(D_MODEL, ctx)),
                         "state_bytes": cfg.state_size(D_MODEL, ctx)})
            print(f"  {label:24s} ctx={ctx:6d} {sec * 1e6:9.1f} us/token  state {rows[-1]['state']}",
                  flush=True)
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="archlab bench mixers")
    p.add_argument("--quick", action="store_true", help="CPU-sized run (a few minutes)")
    p.add_argument("--mixers", default=None, help="comma-separated labels (default: all)")
    p.add_argument("--lengths", default=None, help="comma-separated T for forward+backward")
    p.add_argument("--impl-lengths", default=None, help="comma-separated T for the impl comparison")
    p.add_argument("--decode-lengths", default=None, help="comma-separated context lengths")
    p.add_argument("--parts", default="fwdbwd,impls,decode")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",")]
    lengths = ints(args.lengths) if args.lengths else (
        [2048, 4096, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384])
    impl_lengths = ints(args.impl_lengths) if args.impl_lengths else (
        [4096] if args.quick else [1024, 4096, 8192])
    contexts = ints(args.decode_lengths) if args.decode_lengths else (
        [1024, 8192] if args.quick else [1024, 4096, 16384])
    repeats = args.repeats or (2 if args.quick else 5)
    parts = set(args.parts.split(","))
    unknown = parts - {"fwdbwd", "impls", "decode"}
    if unknown:
        raise ValueError(f"--parts: unknown {sorted(unknown)}; choose from fwdbwd, impls, decode")
    configs = _defaults()
    if args.mixers:
        wanted = args.mixers.split(",")
        bad = [m for m in wanted if m not in configs]
        if bad:
            raise ValueError(f"--mixers: unknown {bad}; valid: {sorted(configs)}")
        configs = {k: configs[k] for k in wanted}

    print_header("archlab bench mixers")
    print(f"d_model={D_MODEL}, B=1, fp32; configs: " +
          "; ".join(f"{k}={_short(v)}" for k, v in configs.items()))
    out = {}
    if "fwdbwd" in parts:
        print("\n## Forward+backward vs T\n")
        rows, ratios = _fwdbwd_rows(configs, lengths, repeats, max_dense=4096 if args.quick else 8192,
                                    budget_s=20.0 if args.quick else 120.0)
        out["fwdbwd"], out["ratios"] = rows, ratios
        print(markdown_table(rows, ["mixer", "T", "fwd+bwd ms", "peak", "compile s"]))
        print("\n### Scaling: time(2T) / time(T) (linear time: ~2)\n")
        cols = ["mixer"] + [f"t({2 * t})/t({t})" for t in lengths if 2 * t in lengths]
        print(markdown_table(ratios, cols))
    if "impls" in parts:
        print("\n## Same function, different algorithms (Mamba, Mamba-2)\n")
        rows = _impl_rows(impl_lengths, repeats, seq_max=max(impl_lengths))
        out["impls"] = rows
        print(markdown_table(rows, ["mixer", "impl", "T", "fwd+bwd ms", "peak", "time / chunked"]))
    if "decode" in parts:
        print("\n## Decode: one-token step at B=1 vs context length\n")
        rows = _decode_rows(configs, contexts, repeats)
        out["decode"] = rows
        print(markdown_table(rows, ["mixer", "context", "step us", "tokens/s", "state"]))
    path = write_results("mixers", [r for v in out.values() for r in v], args.out, extra=out)
    print(f"\nwrote {path}")
    return 0


def _short(cfg) -> str:
    """The non-default fields of a mixer config, for the table header."""
    base = type(cfg)()
    diff = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(base, f.name)}
    return type(cfg).kind + (f"({', '.join(f'{k}={v}' for k, v in diff.items())})" if diff else "")
