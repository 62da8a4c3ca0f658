"""Length extrapolation of position schemes: train at L, evaluate at L, 2L, 4L and 8L.

    archlab run experiments/configs/length_extrapolation.py --out runs/length_extrapolation
    archlab run experiments/configs/length_extrapolation.py --smoke --out runs/lex-smoke

One run per (task, position scheme): the same Llama-style model (2 layers, width 64,
4 heads / 2 kv heads, SwiGLU, width-4 short conv before attention, RoPE base 10^4)
with the position scheme swapped, trained at L = 128 on passkey retrieval (1 needle,
5 digits), induction heads (vocab 16, as in the Mamba paper) and MQAR (8 pairs,
vocab 256), then evaluated on the same task at 128, 256, 512 and 1024 tokens.
Schemes (issue 4 section 2):

* ``rope`` (Su et al. 2021); ``nope`` (no position encoding; Kazemnejad et al. 2023);
* ``alibi`` (Press et al. 2022); ``xpos`` (Sun et al. 2022, gamma = 512);
* ``rope_pi`` (linear position interpolation, Chen et al. 2023), ``rope_ntk``
  (NTK-aware base, bloc97 2023) and ``yarn`` (Peng et al. 2023, original length L),
  each with factor 8 = the largest evaluation ratio.

Caveat: one run has one model config, so the scaled RoPE variants are *trained* with
their scaled frequencies too (they test lower/interpolated frequencies, not the
usual zero-shot recipe "train plain, scale at inference", which needs an
evaluation-time model override in the train loop).

Expected (from the papers, not yet measured here): every scheme solves the tasks at
L; beyond L plain RoPE collapses first on the retrieval tasks (rotations never seen in
training), ALiBi degrades most gracefully on induction heads but its recency bias
hurts long-gap passkey/MQAR retrieval, xPos and NoPE sit in between, and the scaled
RoPE variants extrapolate at least as far as plain RoPE. ``archlab report`` tabulates
accuracy per run (task, scheme) and length, and plots accuracy vs length.
"""

import archs
from experiments.config import EvalConfig, ExperimentConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from experiments.tasks import make_task
from layers.positions import RopeConfig

FACTOR = 8
SCHEMES = {  # label -> attention overrides
    "rope": dict(position="rope", rope=RopeConfig(base=10000.0)),
    "rope_pi": dict(position="rope", rope=RopeConfig(base=10000.0, scaling="linear", factor=FACTOR)),
    "rope_ntk": dict(position="rope", rope=RopeConfig(base=10000.0, scaling="ntk", factor=FACTOR)),
    "yarn": None,  # needs the training length: built in get_sweep
    "alibi": dict(position="alibi"),
    "xpos": dict(position="xpos", rope=RopeConfig(base=10000.0, xpos_scale_base=512.0)),
    "nope": dict(position="none"),
}
TASKS = {  # label -> (task name, knobs, vocab)
    "passkey": ("passkey", dict(num_digits=5, num_needles=1), 32),
    "induction": ("induction_heads", {}, 16),
    "mqar": ("mqar", dict(num_kv_pairs=8), 256),
}


def get_sweep(smoke: bool = False):
    length = 32 if smoke else 128
    evals = (length, 2 * length) if smoke else (length, 2 * length, 4 * length, 8 * length)
    steps = 10 if smoke else 1500
    runs = []
    for task_label, (task_name, knobs, vocab) in TASKS.items():
        task = make_task(task_name, seq_len=length, vocab_size=vocab, **knobs)
        for scheme, overrides in SCHEMES.items():
            if scheme == "yarn":
                overrides = dict(position="rope", rope=RopeConfig(base=10000.0, scaling="yarn",
                                                                   factor=FACTOR, original_max_len=length))
            model = archs.preset("llama", "tiny", vocab_size=vocab, d_model=64, n_layers=2,
                                 max_len=max(evals), short_conv=4, **overrides)
            runs.append(ExperimentConfig(
                name=f"{task_label}-{scheme}", arch=f"{task_label}:{scheme}", model=model, task=task,
                optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.1),
                schedule=ScheduleConfig(warmup_steps=min(100, steps // 10)),
                train=TrainConfig(steps=steps, batch_size=8 if smoke else 32, log_every=5 if smoke else 50),
                eval=EvalConfig(every=steps, lengths=evals, batches=1 if smoke else 4,
                                batch_size=8 if smoke else 64)))
    return runs
