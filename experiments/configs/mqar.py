"""MQAR comparison sweep over every causal preset in the registry (Zoology-style).

    archlab run experiments/configs/mqar.py --out runs/mqar           # full sweep (GPU-sized)
    archlab run experiments/configs/mqar.py --smoke --out runs/mqar-smoke   # CPU smoke test

Multi-query associative recall (Arora et al. 2023) at sequence lengths 64/128/256
with 4/8/16 key-value pairs, vocabulary 8192 (Zoology's setting), 2-layer models at
widths 64/128/256, learning rates {1e-3, 3e-3, 1e-2}; every model uses the width-4
short convolution before its mixer (the "BASED recipe"). Each (architecture, width,
length) is one ``cell``; ``archlab report`` shows the best learning rate per
cell, as Zoology does. New presets join automatically once registered in
``archs.PRESETS`` (non-causal ones are left out: they would see the answers).
Expected: attention solves every cell at width >= 64; fixed-state recurrent mixers
degrade as the number of pairs grows relative to their state (Zoology's finding).
"""

import archs
from experiments.config import EvalConfig, ExperimentConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from experiments.tasks import make_task

LENGTHS = {64: 4, 128: 8, 256: 16}  # sequence length -> kv pairs
WIDTHS = (64, 128, 256)
LRS = (1e-3, 3e-3, 1e-2)


def causal_presets() -> list[str]:
    return [n for n in archs.names() if archs.preset(n, archs.sizes(n)[0]).causal]


def get_sweep(smoke: bool = False):
    lengths = {64: 4} if smoke else LENGTHS
    widths = (64,) if smoke else WIDTHS
    lrs = (1e-2,) if smoke else LRS
    vocab = 256 if smoke else 8192
    steps = 20 if smoke else 4000
    runs = []
    for name in causal_presets():
        base = archs.preset(name, "tiny")
        n_layers = max(2, len(base.pattern))
        for length, kv in lengths.items():
            task = make_task("mqar", seq_len=length, vocab_size=vocab, num_kv_pairs=kv)
            for width in widths:
                model = archs.preset(name, "tiny", vocab_size=vocab, d_model=width, n_layers=n_layers,
                                     max_len=max(lengths), short_conv=4)
                for lr in lrs:
                    runs.append(ExperimentConfig(
                        name=f"{name}-d{width}-L{length}-lr{lr:g}", arch=name, cell=f"{name}-d{width}-L{length}",
                        model=model, task=task, optimizer=OptimizerConfig(lr=lr),
                        schedule=ScheduleConfig(warmup_steps=min(100, steps // 10)),
                        train=TrainConfig(steps=steps, batch_size=8 if smoke else 64, log_every=10 if smoke else 100),
                        eval=EvalConfig(every=steps, batches=1 if smoke else 8, batch_size=8 if smoke else 128)))
    return runs
