"""The ``archlab`` command line: run, report, bench, list, aot, convert.

Configuration errors (bad field, unknown preset, existing run directory, mismatched
checkpoint, an error in an experiment file, a damaged run file, a step too large for
memory) print ``archlab: error: ...`` and exit with code 2 before training; a run that
diverges (non-finite loss under ``train.on_nonfinite='stop'``) exits with code 3.
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def _run(args) -> int:
    if args.distributed:
        _initialize_distributed(args)
    from experiments import config as config_lib
    from experiments import report, train

    runs = config_lib.load_experiment_file(args.config, smoke=args.smoke)
    runs = [config_lib.with_overrides(r, args.set or []) for r in runs]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {r.name for r in runs}
        if unknown:
            raise ValueError(f"--only: unknown run name(s) {sorted(unknown)}; runs: {[r.name for r in runs]}")
        runs = [r for r in runs if r.name in wanted]
    if args.init_from:
        runs = _with_init_model(runs, args.init_from)
    for r in runs:  # everything is validated before the first compile
        r.validate()
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    single = len(runs) == 1 and not args.only
    dirs = []
    for r in runs:
        run_dir = out if single else os.path.join(out, r.name)
        summary = train.run(r, run_dir, resume=args.resume, overwrite=args.overwrite,
                            progress=not args.no_progress, write_report=single,
                            init_from=args.init_from)
        acc = ", ".join(f"acc@{k}={_num(v, '.3f')}" for k, v in summary["eval"].items())
        print(f"[{r.name}] {acc}  ({_num(summary['tokens_per_s'], ',.0f')} train tokens/s) -> {run_dir}")
        dirs.append(run_dir)
    from experiments import rundir
    if rundir.is_writer():   # multi-host: process 0 writes the report
        path = report.write_report(dirs, out, title=f"archlab: {os.path.basename(args.config)}")
        print(f"report: {path}")
    return 0


# --- convert / --init-from (published checkpoints; README "Loading published checkpoints")

def _with_init_model(runs, init_from):
    """Runs whose model is the converted checkpoint's (the experiment keeps its task/train)."""
    import dataclasses
    from experiments import convert
    model = convert.init_config(init_from)
    return [dataclasses.replace(r, model=dataclasses.replace(model, dtype=r.model.dtype,
                                                             param_dtype=r.model.param_dtype))
            for r in runs]


def _convert(args) -> int:
    from experiments import convert
    cfg = convert.convert_hf(args.from_hf, args.out, overwrite=args.overwrite)
    print(f"converted {args.from_hf} ({cfg.name}, {cfg.n_layers} layers, d_model {cfg.d_model}) "
          f"-> {args.out}; train from it with: archlab run EXPERIMENT --init-from {args.out}")
    return 0


def _initialize_distributed(args) -> None:
    """``jax.distributed.initialize`` from the flags, else ``JAX_COORDINATOR_ADDRESS`` /
    ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, else the cluster (SLURM, Cloud TPU, ...)."""
    import jax
    kw = {}
    env = {"coordinator_address": ("coordinator", "JAX_COORDINATOR_ADDRESS", str),
           "num_processes": ("num_processes", "JAX_NUM_PROCESSES", int),
           "process_id": ("process_id", "JAX_PROCESS_ID", int)}
    for key, (flag, var, kind) in env.items():
        value = getattr(args, flag) if getattr(args, flag) is not None else os.environ.get(var)
        if value is not None:
            try:
                kw[key] = kind(value)
            except ValueError:
                raise ValueError(f"--{flag.replace('_', '-')} / {var}={value!r} must be a {kind.__name__}")
    jax.distributed.initialize(**kw)


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _report(args) -> int:
    from experiments import report
    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else "report")
    print(f"report: {report.write_report(args.run_dirs, out)}")
    return 0


def _export(args) -> int:
    from experiments import export
    print(f"exported: {export.export(args.run_dir, args.out, args.step)}")
    return 0


def _bench(args, rest) -> int:
    from experiments.bench import BENCHES
    if args.name not in BENCHES:
        raise ValueError(f"unknown benchmark {args.name!r}; valid: {sorted(BENCHES)}")
    try:
        module = importlib.import_module(BENCHES[args.name])
    except ModuleNotFoundError as e:
        raise ValueError(f"benchmark {args.name!r} is not available ({e})") from e
    return module.main(rest)


def _aot(args) -> int:
    # Compile-only devices need no accelerator; keep jax off any local one.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from experiments.aot import runner, targets
    target = targets.parse_target(args.target)
    runs = runner.resolve(args.config, target.n_devices, args.set or [], smoke=args.smoke, only=args.only)
    devices = targets.compile_only_devices(target)
    rows = []
    for r in runs:
        if args.search:
            best, row = runner.search_batch(r, target, devices)
            print(f"[{r.name}] largest per-device batch that fits on {target.spec}: {best or 'none'}")
            if row is None:
                continue
        else:
            row = runner.compile_run(r, target, devices, decode=not args.no_decode)
        rows.append(row)
    print(runner.markdown(rows))
    runner.write(rows, args.json)
    if args.json:
        print(f"json: {args.json}")
    failed = [r["name"] for r in rows if "error" in r["train"] and r["train"].get("fits") is not False]
    return 1 if failed else 0


def _list(args) -> int:
    import archs
    from experiments.tasks import TASKS
    print("presets (name: sizes; causal):")
    for name in archs.names():
        sizes = archs.sizes(name)
        print(f"  {name}: {', '.join(sizes)}; {'causal' if archs.preset(name, sizes[0]).causal else 'bidirectional'}")
    print("tasks:", ", ".join(sorted(TASKS)))
    here = os.path.join(os.path.dirname(__file__), "configs")
    files = sorted(f for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_"))
    print("experiment files (experiments/configs/):")
    for f in files:
        print(f"  {f}")
    from experiments.bench import BENCHES
    print("benchmarks:", ", ".join(sorted(BENCHES)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archlab", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the run(s) of an experiment file and report")
    r.add_argument("config", help="experiment file (defines get_config or get_sweep)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, value parsed as a Python literal (repeatable)")
    r.add_argument("--out", help="output directory (default runs/<config name>)")
    r.add_argument("--smoke", action="store_true", help="the file's CPU-sized smoke variant")
    r.add_argument("--only", help="comma-separated run names of a sweep to run")
    r.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace an existing archlab run directory (anything else is refused)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (one process per host; README: "
                        "Running on several hosts)")
    r.add_argument("--init-from", metavar="RUN_DIR",
                   help="start from a checkpoint made by 'archlab convert' (its model replaces "
                        "the experiment's; ignored with --resume)")
    r.add_argument("--coordinator", metavar="HOST:PORT", help="--distributed: process 0's address")
    r.add_argument("--num-processes", type=int, help="--distributed: number of processes")
    r.add_argument("--process-id", type=int, help="--distributed: this process's index")
    r.add_argument("--debug", action="store_true", help="show the traceback of an error")
    cv = sub.add_parser("convert", help="a HuggingFace checkpoint -> an archlab init directory")
    cv.add_argument("--from-hf", required=True, metavar="DIR",
                    help="HF model directory (config.json + *.safetensors)")
    cv.add_argument("--out", required=True, metavar="RUN_DIR")
    cv.add_argument("--overwrite", action="store_true", help="replace a non-empty RUN_DIR")
    cv.add_argument("--debug", action="store_true", help="show the traceback of an error")
    rp = sub.add_parser("report", help="compare run directories")
    rp.add_argument("run_dirs", nargs="+")
    rp.add_argument("--out", help="where report.md and PNGs go")
    rp.add_argument("--debug", action="store_true", help="show the traceback of an error")
    ex = sub.add_parser("export", help="write a run's weights unsharded for one host (numpy .npz)")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True, help="directory for params.npz and export.json")
    ex.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    ex.add_argument("--debug", action="store_true", help="show the traceback of an error")
    b = sub.add_parser("bench", help="benchmarks: attention, kernels, mixers, moe, vs-torch")
    b.add_argument("name")
    sub.add_parser("list", help="presets, tasks, experiment files, benchmarks")
    a = sub.add_parser("aot", help="compile train/decode steps deviceless for a TPU/GPU target")
    a.add_argument("config", help="experiment file, or a preset NAME[:SIZE] (e.g. llama:8b)")
    a.add_argument("--target", required=True,
                   help="tpu:<v4|v5e|v5p|v6e>-N (Cloud TPU names) or gpu:[HOSTSx][Nx]<h100|h200|b200|a100>")
    a.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    a.add_argument("--smoke", action="store_true", help="the experiment file's smoke variant")
    a.add_argument("--only", help="comma-separated run names of a sweep")
    a.add_argument("--json", help="write the rows as JSON here")
    a.add_argument("--no-decode", action="store_true", help="compile the train step only")
    a.add_argument("--search", action="store_true",
                   help="find the largest power-of-two per-device batch whose train step fits")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "report":
            return _report(args)
        if args.command == "export":
            return _export(args)
        if args.command == "bench":
            return _bench(args, rest)
        if args.command == "aot":
            return _aot(args)
        if args.command == "convert":
            return _convert(args)
        return _list(args)
    except ValueError as e:   # bad input: config, experiment file, run directory, run files
        if getattr(args, "debug", False):
            raise
        print(f"archlab: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from experiments.train import NonFiniteError
        if not isinstance(e, NonFiniteError) or getattr(args, "debug", False):
            raise
        print(f"archlab: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
