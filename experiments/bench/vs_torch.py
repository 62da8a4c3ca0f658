"""``archlab bench vs-torch``: archlab (JAX) against HuggingFace transformers' PyTorch
reference code on CPU, the alternative a researcher prototyping on a laptop has.

What is timed (pairs and variants: experiments/bench/vs_torch_pairs.py; ``--list``):

* ``train``: forward + backward of the mean next-token cross-entropy, no optimizer. JAX:
  ``jit(value_and_grad(loss))`` w.r.t. the parameters; torch: ``loss.backward()`` with the
  gradients set to None before each call (outside its time). MoE auxiliary losses are off
  on both sides (the converted Mixtral has no load-balancing coefficient).
* ``fwd``: logits of every position, no gradient (torch under ``torch.inference_mode()``).
* ``prefill``: a B=1 prompt into a fresh cache, as ``archs.generate`` does it
  (``model.apply(params, prompt, cache=model.init_cache(1, prompt + new))``) against HF's
  forward with ``use_cache=True``.
* ``decode``: ms per generated token (greedy, B=1, 1024-token prompt), measured as
  ``(time(generate 144 tokens) - time(generate 16 tokens)) / 128`` on both sides, so the
  prefill and the per-call overheads cancel: archlab ``archs.generate`` (prefill plus a
  jit-compiled ``lax.scan`` decode loop) against HF ``model.generate`` and a hand-written
  greedy loop over the model's cache.

How: fp32 everywhere; the same weights on both sides (the HF model is built from a seeded
random init, saved, and read with ``archs.from_hf``); torch limited to ``--threads`` (2)
intra- and inter-op threads, XLA uses the machine's cores. Compilation is excluded (JAX:
``jit(...).lower(...).compile()`` and one warm-up call; torch is eager: one warm-up call).
Each pair's variants then run in ALTERNATING order (archlab A, torch X, archlab B, torch
Y, ..., repeated ``--repeats`` times) and each is reported as its median: on a shared
machine the background load drifts, and alternating lets a drift hit both sides alike, so
the ratios stay meaningful even when the absolute times do not. The 1-minute load average
before and after each pair's timing is printed beside it.

Honesty checks, printed for every pair: equal parameter counts (asserted); the max
absolute difference of the forward logits of every variant against the first torch
variant on a short B2×T64 input; and on the timed input itself the loss difference
(train), the logit difference (fwd, prefill) or how many greedy tokens agree (decode).
A difference above 1e-4 of the logit scale on a variant that computes the same function
marks the row MISMATCH and the command exits 1. The ``capacity`` MoE variant (the
``MoEConfig`` default capacity factor) drops assignments and is not exact: its dropped
fraction is printed instead (per layer: with random-init routers the deeper layers send most
tokens to a few experts, so they drop far more than a router trained with a balance loss).

Flags: ``--pairs a,b`` (default all), ``--repeats N`` (5), ``--all-variants`` (dense/eager
at T=8192, the sequential Mamba loops), ``--threads`` (2), ``--write BENCHMARKS.md``
(replaces the text between ``<!-- vs-torch:begin -->`` and ``<!-- vs-torch:end -->``,
appending a section with a heading if the markers are absent), ``--out DIR`` (JSON,
``bench_out/vs_torch.json``), ``--list``. Needs torch and transformers: run it from
``.venv-hf`` (``make hf-venv``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from typing import Callable, Hashable, Sequence

from experiments.bench import vs_torch_pairs as P
from experiments.bench.common import env_info, markdown_table, write_results

BEGIN, END = "<!-- vs-torch:begin -->", "<!-- vs-torch:end -->"
HEADING = "## archlab vs PyTorch (HF transformers) on CPU: `archlab bench vs-torch`"
MISMATCH_RTOL = 1e-4
INEXACT = {"capacity"}          # archlab variants that may legitimately differ (drops)


def require_torch() -> None:
    """ValueError (the CLI's exit 2) naming the fix when torch/transformers are missing."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ValueError(f"archlab bench vs-torch needs torch and transformers ({e}): run "
                         "`make hf-venv`, then `.venv-hf/bin/archlab bench vs-torch`") from None


# ----------------------------------------------------------------------------- timing

def interleave(first: Sequence, second: Sequence) -> list:
    """[a0, b0, a1, b1, ...], the longer list's tail last."""
    out = []
    for i in range(max(len(first), len(second))):
        out += [s[i] for s in (first, second) if i < len(s)]
    return out


def alternating_medians(measures: dict[Hashable, Callable[[], float]], repeats: int
                        ) -> dict[Hashable, float]:
    """Median of ``repeats`` calls of each measure (a callable returning seconds), the
    measures taking turns in their dict order within every repetition."""
    if repeats < 1:
        raise ValueError(f"--repeats={repeats} must be >= 1")
    times = {key: [] for key in measures}
    for _ in range(repeats):
        for key, measure in measures.items():
            times[key].append(measure())
    return {key: statistics.median(v) for key, v in times.items()}


def ratios(lab: dict[str, float], torch: dict[str, float], partners) -> tuple[dict, dict]:
    """(archlab / fastest torch variant, archlab / like-for-like partner) per archlab variant."""
    best = min(torch.values()) if torch else None
    vs_best = {a: t / best for a, t in lab.items()} if best else {}
    like = {f"{a}/{x}": lab[a] / torch[x] for a, x in partners if a in lab and x in torch}
    return vs_best, like


# ----------------------------------------------------------------------------- BENCHMARKS.md

def replace_section(text: str, body: str) -> str:
    """``text`` with the part between the BEGIN/END marker lines replaced by ``body``; the
    section (heading + markers) appended when both markers are absent. Anything else is
    kept byte for byte; one marker alone, or END before BEGIN, is refused."""
    block = f"{BEGIN}\n{body.strip()}\n{END}"
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 and j < 0:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return f"{text}{sep}{HEADING}\n\n{block}\n"
    if i < 0 or j < i or text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"--write: expected one {BEGIN} line followed by one {END} line")
    return text[:i] + block + text[j + len(END):]


def write_section(path: str, body: str) -> None:
    text = open(path).read() if os.path.exists(path) else ""
    with open(path, "w") as f:
        f.write(replace_section(text, body))


# ----------------------------------------------------------------------------- one pair

class Family:
    """One reference model: saved HF checkpoint, archlab config + weights, torch models."""

    def __init__(self, name: str, root: str):
        import archs
        self.name, self.dir = name, os.path.join(root, name)
        P.build_reference(name, self.dir)
        self.cfg, self.variables = archs.from_hf(self.dir)
        self.n_params = P.n_params(self.variables["params"])
        self._torch, self._logits = {}, {}

    def torch_model(self, spec: dict):
        key = tuple(sorted((k, v) for k, v in spec.items() if k != "runner"))
        if key not in self._torch:
            model = P.load_torch(self.dir, spec)
            n = sum(p.numel() for p in model.parameters())
            if n != self.n_params:
                raise RuntimeError(f"{self.name}: torch has {n} parameters, archlab {self.n_params}")
            self._torch[key] = model
        return self._torch[key]

    def lab_model(self, overrides: dict):
        import archs
        return archs.build(archs.override(self.cfg, **overrides))

    def short_logits(self, side: str, spec: dict):
        """Forward logits on the short EQ_SHAPE input, cached per variant."""
        import jax
        key = (side, tuple(sorted(spec.items())))
        if key not in self._logits:
            x = P.tokens_for(*P.EQ_SHAPE, seed=P.SEED + 1)
            if side == "torch":
                self._logits[key] = P.torch_logits(self.torch_model(spec), x)
            else:
                model = self.lab_model(spec)
                self._logits[key] = jax.device_get(
                    jax.jit(lambda v, x: model.apply(v, x)[0])(self.variables, x))
        return self._logits[key]


def _max_diff(a, b) -> float:
    import numpy as np
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _agree(a, b) -> str:
    a, b = a.reshape(-1), b.reshape(-1)
    n = next((i for i in range(len(a)) if a[i] != b[i]), len(a))
    return f"{n}/{len(a)} greedy tokens agree"


def _setup(pair, fam: Family, all_variants: bool):
    """Compiled, warmed-up measures and first outputs of every variant; notes and failures."""
    import importlib.util
    lab_specs, torch_specs = pair.variants(all_variants)
    tokens = P.tokens_for(pair.batch, pair.seq)
    measures, outputs, notes, failed = {}, {}, [], []
    for side, specs in (("archlab", lab_specs), ("torch", torch_specs)):
        for name, spec in specs.items():
            if spec.get("use_mambapy") and importlib.util.find_spec("mambapy") is None:
                notes.append(f"torch {name}: skipped, mambapy is not installed (`make hf-venv` "
                             "installs it; without it HF silently runs its sequential loop)")
                continue
            try:
                if side == "archlab":
                    call = P.lab_call(pair.mode, fam.lab_model(spec), fam.variables, tokens)
                else:
                    call = P.torch_call(pair.mode, fam.torch_model(spec), tokens, spec.get("runner"))
            except Exception as e:  # one broken variant must not end the benchmark
                failed.append(f"{side} {name}: {type(e).__name__}: {str(e)[:300]}")
                continue
            measures[(side, name)], outputs[(side, name)] = call
    return lab_specs, torch_specs, tokens, measures, outputs, notes, failed


def _checks(pair, fam: Family, lab_specs, torch_specs, outputs, tokens) -> tuple[list, bool]:
    """Equality lines and whether an exact variant mismatches."""
    import numpy as np
    tnames = [n for n in torch_specs if ("torch", n) in outputs]
    if not tnames:
        return ["no torch variant ran: nothing to compare"], False
    load = lambda spec: {k: v for k, v in spec.items() if k != "runner"}
    ref_name, ref_spec = tnames[0], load(torch_specs[tnames[0]])
    ref = fam.short_logits("torch", ref_spec)
    scale, bad, short, bench = float(np.max(np.abs(ref))), False, [], []
    for side, specs in (("archlab", lab_specs), ("torch", torch_specs)):
        for name, spec in specs.items():
            spec = load(spec) if side == "torch" else spec
            if (side, name) not in outputs or (side == "torch" and spec == ref_spec):
                continue   # (a torch runner of the reference model computes the same logits)
            d = _max_diff(fam.short_logits(side, spec), ref)
            bad |= d > MISMATCH_RTOL * scale and name not in INEXACT
            short.append(f"{side} {name} {d:.1e}")
    ref_out = outputs[("torch", ref_name)]
    for (side, name), out in outputs.items():
        if side == "torch" and name == ref_name:
            continue
        if pair.mode == "train":
            bench.append(f"{side} {name} |Δloss| {abs(out - ref_out):.1e}")
        elif pair.mode == "decode":
            bench.append(f"{side} {name} {_agree(out, ref_out)}")
        else:
            bench.append(f"{side} {name} max|Δlogits| {_max_diff(out, ref_out):.1e}")
    lines = [f"params: {fam.n_params:,} on both sides",
             f"forward logits B{P.EQ_SHAPE[0]}×T{P.EQ_SHAPE[1]}, max|Δ| vs torch {ref_name} "
             f"(logit scale {scale:.2f}): " + ", ".join(short),
             f"timed input vs torch {ref_name}: " + ", ".join(bench)]
    moe = [spec for spec in lab_specs.values() if "dispatch" in spec]
    if moe:
        frac = {n: P.dropped_fraction(fam.lab_model(s), fam.variables, tokens)
                for n, s in lab_specs.items() if ("archlab", n) in outputs}
        cf = fam.lab_model(lab_specs.get("capacity", {})).cfg.pattern[0].ffn.capacity_factor
        fmt = lambda f: f"{np.mean(f):.3f} ({'/'.join(f'{v:.2f}' for v in f)})"
        lines.append(f"dropped assignments on the timed input (capacity factor {cf}; mean "
                     "(per layer)): " + ", ".join(f"{n} {fmt(f)}" for n, f in frac.items() if f))
    return lines, bad


def run_pair(pair, fam: Family, repeats: int, all_variants: bool) -> dict:
    lab_specs, torch_specs, tokens, measures, outputs, notes, failed = _setup(pair, fam, all_variants)
    order = interleave([k for k in measures if k[0] == "archlab"],
                       [k for k in measures if k[0] == "torch"])
    load0 = os.getloadavg()
    med = alternating_medians({k: measures[k] for k in order}, repeats)
    load1 = os.getloadavg()
    checks, bad = _checks(pair, fam, lab_specs, torch_specs, outputs, tokens)
    lab = {n: med[(s, n)] * 1e3 for s, n in order if s == "archlab"}
    tor = {n: med[(s, n)] * 1e3 for s, n in order if s == "torch"}
    vs_best, like = ratios(lab, tor, pair.partners)
    return {"pair": pair.name, "family": pair.family, "mode": pair.mode, "shape": pair.shape,
            "unit": "ms/token" if pair.mode == "decode" else "ms", "archlab_ms": lab,
            "torch_ms": tor, "vs_best_torch": vs_best, "like_for_like": like,
            "load_before": load0, "load_after": load1, "checks": checks, "mismatch": bad,
            "notes": notes, "failed": failed, "repeats": repeats}


# ----------------------------------------------------------------------------- output

def _cells(d: dict, fmt: str) -> str:
    return ", ".join(f"{k} {v:{fmt}}" for k, v in d.items()) or "-"


def table(rows: list[dict]) -> str:
    cols = ["pair", "shape", "archlab", "torch", "archlab/best torch", "like-for-like", "load"]
    cells = [{"pair": r["pair"] + (" MISMATCH" if r["mismatch"] else ""),
              "shape": f"{r['shape']} ({r['unit']})",
              "archlab": _cells(r["archlab_ms"], ".1f"), "torch": _cells(r["torch_ms"], ".1f"),
              "archlab/best torch": _cells(r["vs_best_torch"], ".2f"),
              "like-for-like": _cells(r["like_for_like"], ".2f"),
              "load": f"{r['load_before'][0]:.1f}→{r['load_after'][0]:.1f}"} for r in rows]
    return markdown_table(cells, cols)


def versions() -> dict:
    import importlib.metadata as md
    info = env_info()
    out = {k: info[k] for k in ("date", "jax", "jaxlib", "flax", "python", "cpu_count")}
    for pkg in ("torch", "transformers", "mambapy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def report(rows: list[dict], env: dict, argv: list[str]) -> str:
    """The Markdown block for BENCHMARKS.md (also printed)."""
    vers = ", ".join(f"{k} {env[k]}" for k in ("jax", "jaxlib", "flax", "torch", "transformers",
                                                "mambapy", "python"))
    command = " ".join(["archlab bench vs-torch", *argv])
    lines = [f"Measured {env['date']} with `{command}`: {vers}; {env['cpu_count']} CPUs, "
             f"torch {env['torch_threads']} threads; fp32, V={P.VOCAB}, "
             f"D={P.D_MODEL}, L={P.N_LAYERS}. Medians of "
             f"{rows[0]['repeats'] if rows else '?'} alternating repetitions after compile and "
             "warm-up; decode in ms per token (generation of "
             f"{P.DECODE_NEW[1]} minus {P.DECODE_NEW[0]} tokens); load = 1-minute load average "
             "before→after the pair. Models (RMSNorm eps 1e-5): "
             + "; ".join(f"{k} {v}" for k, v in P.MODELS.items()
                         if any(r["family"] == k for r in rows)) + ".", "", table(rows), ""]
    for r in rows:
        extra = r["checks"] + r["notes"] + [f"FAILED {f}" for f in r["failed"]]
        lines.append(f"- `{r['pair']}`: " + "; ".join(extra))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archlab bench vs-torch", description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=lambda s: [v for v in s.split(",") if v], default=None,
                   help=f"comma-separated pair names (default all: {', '.join(P.PAIRS)})")
    p.add_argument("--repeats", type=int, default=5, help="alternating repetitions (median)")
    p.add_argument("--all-variants", action="store_true",
                   help="also dense/eager at T=8192 and the sequential Mamba loops (slow, large)")
    p.add_argument("--threads", type=int, default=2, help="torch intra- and inter-op threads")
    p.add_argument("--write", metavar="BENCHMARKS.md", help="write the table between the markers")
    p.add_argument("--out", default="bench_out", help="directory of vs_torch.json")
    p.add_argument("--list", action="store_true", help="print the pairs and their variants")
    return p


def _print_list() -> None:
    extra = lambda d: f" (+ {', '.join(d)} with --all-variants)" if d else ""
    for pair in P.PAIRS.values():
        print(f"{pair.name:22s} {pair.shape:26s} archlab: {', '.join(pair.lab)}{extra(pair.lab_all)}; "
              f"torch: {', '.join(pair.torch)}{extra(pair.torch_all)}")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        _print_list()
        return 0
    names = args.pairs or list(P.PAIRS)
    unknown = [n for n in names if n not in P.PAIRS]
    if unknown:
        raise ValueError(f"--pairs: unknown {unknown}; valid: {list(P.PAIRS)}")
    if args.repeats < 1 or args.threads < 1:
        raise ValueError(f"--repeats={args.repeats} and --threads={args.threads} must be >= 1")
    require_torch()
    _quiet_torch(args.threads)
    env = {**versions(), "torch_threads": _torch_threads()}
    print(f"# vs-torch: {', '.join(f'{k}={v}' for k, v in env.items())}; HF kernel packages: "
          f"{P.kernel_packages() or 'none'}", flush=True)
    rows, families = [], {}
    with tempfile.TemporaryDirectory(prefix="vs_torch_") as root:
        for name in names:
            pair = P.PAIRS[name]
            if pair.family not in families:
                families[pair.family] = Family(pair.family, root)
            row = run_pair(pair, families[pair.family], args.repeats, args.all_variants)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            for line in row["checks"] + row["notes"] + [f"FAILED {f}" for f in row["failed"]]:
                print(f"    {line}", flush=True)
    body = report(rows, env, argv)
    print("\n" + body)
    print("wrote", write_results("vs_torch", rows, args.out,
                                 extra={"versions": env, "argv": argv}))
    if args.write:
        write_section(args.write, body)
        print(f"wrote the section between {BEGIN} / {END} of {args.write}")
    return 1 if any(r["mismatch"] or r["failed"] for r in rows) else 0


def _torch_threads() -> str:
    import torch
    return f"{torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op"


def _quiet_torch(threads: int) -> None:
    """torch threads; transformers' progress bars, kernel-fallback notices and warnings off."""
    import warnings
    import torch
    import transformers
    torch.set_num_threads(threads)
    set_interop = getattr(torch, "set_num_interop_threads", None) or torch.set_interop_threads
    try:
        set_interop(threads)
    except RuntimeError:   # already set, or parallel work already ran in this process
        print(f"note: torch inter-op threads stay {torch.get_num_interop_threads()}", file=sys.stderr)
    torch.set_grad_enabled(True)
    torch.autograd.set_detect_anomaly(False)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module=r"(transformers|torch)\.")
