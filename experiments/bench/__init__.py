"""`archlab bench NAME`: benchmarks are programs, not tests (docs/conventions.md #13).

Each module here exposes ``main(argv: list[str]) -> int``; ``BENCHES`` maps the
CLI name to the module path so a typo lists the valid names.
"""

BENCHES = {
    "attention": "experiments.bench.attention",
    "kernels": "experiments.bench.kernels",
    "mixers": "experiments.bench.mixers",
    "moe": "experiments.bench.moe",
    "vs-torch": "experiments.bench.vs_torch",   # needs torch + transformers (.venv-hf)
}
