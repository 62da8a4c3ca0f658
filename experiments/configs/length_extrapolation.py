"""Length extrapolation of position schemes: train at L, evaluate at L, 2L, 4L and 8L.

    archlab run experiments/configs/length_extrapolation.py --out runs/length_extrapolation
    archlab run experiments/configs/length_extrapolation.py --smoke --out runs/lex-smoke

One run per (task, position scheme): the same Llama-style model (2 layers, width 64,
4 heads / 2 kv heads, SwiGLU, width-4 short conv before attention, RoPE base 10^4)
with the position scheme swapped, trained at L = ``TRAIN_LEN`` on passkey retrieval
(1 needle, 5 digits), induction heads (vocab 16, as in the Mamba paper) and MQAR
(8 pairs, vocab 256), then evaluated on the same task at L, 2L, 4L and 8L tokens.
Schemes:

* ``rope`` (Su et al. 2021); ``nope`` (no position encoding; Kazemnejad et al. 2023);
* ``alibi`` (Press et al. 2022); ``xpos`` (Sun et al. 2022, gamma = 512);
* ``rope_pi`` (linear position interpolation, Chen et al. 2023), ``rope_ntk``
  (NTK-aware base, bloc97 2023) and ``yarn`` (Peng et al. 2023, original length L):
  the zero-shot recipe -- trained with plain RoPE (same seed, so the same weights as
  ``rope``) and evaluated with the scaling switched on (``EvalConfig.model``), factor
  8 = the largest evaluation ratio. The factor is fixed for every evaluation length
  (no "dynamic" per-length factor), so at L itself the scaled variants see
  compressed/stretched rotations they were not trained on. Neither PI nor YaRN is
  fine-tuned after scaling here (their papers fine-tune for a few hundred steps).

Sizes: the defaults (``TRAIN_LEN = 64``, ``STEPS = 500``, batch 32, lr 1e-2, as the quickstart) are
CPU-sized -- 21 runs in roughly 20-25 minutes on 2 cores; the README table comes from
them. For a larger study raise ``TRAIN_LEN``/``STEPS`` here (e.g. 128 / 1500 on a GPU).

Hypotheses from the papers: every scheme solves the tasks at L; beyond L plain RoPE
collapses first on the retrieval tasks, ALiBi degrades gracefully, zero-shot NTK/YaRN
extend RoPE further than PI. Measured (README "Length extrapolation", 2026-11-23, CPU):
RoPE and xPos lose passkey beyond L; ALiBi keeps passkey/MQAR but fails induction heads
at 8L (0.52); NoPE (with the short conv) extrapolates on all three; zero-shot PI/YaRN fix
MQAR/induction but not passkey, and hurt passkey at L itself (fixed factor 8, no
fine-tune). ``archlab report`` tabulates accuracy per run (task, scheme) and length.
"""


import archs
from experiments.config import EvalConfig, ExperimentConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from experiments.tasks import make_task
from layers.positions import RopeConfig

TRAIN_LEN = 64
STEPS = 500
FACTOR = 8  # = the largest evaluation length / TRAIN_LEN
ROPE = dict(position="rope", rope=RopeConfig(base=10000.0))


def _schemes(length: int) -> dict:
    """label -> (attention overrides in training, overrides at evaluation or None)."""
    scaled = lambda kind, **kw: dict(position="rope", rope=RopeConfig(
        base=10000.0, scaling=kind, factor=FACTOR, **kw))
    return {
        "rope": (ROPE, None),
        "rope_pi": (ROPE, scaled("linear")),
        "rope_ntk": (ROPE, scaled("ntk")),
        "yarn": (ROPE, scaled("yarn", original_max_len=length)),
        "alibi": (dict(position="alibi"), None),
        "xpos": (dict(position="xpos", rope=RopeConfig(base=10000.0, xpos_scale_base=512.0)), None),
        "nope": (dict(position="none"), None),
    }


TASKS = {  # label -> (task name, knobs, vocab)
    "passkey": ("passkey", dict(num_digits=5, num_needles=1), 32),
    "induction": ("induction_heads", {}, 16),
    "mqar": ("mqar", dict(num_kv_pairs=8), 256),
}


def get_sweep(smoke: bool = False):
    length = 32 if smoke else TRAIN_LEN
    evals = (length, 2 * length) if smoke else tuple(length * r for r in (1, 2, 4, FACTOR))
    steps = 10 if smoke else STEPS
    runs = []
    for task_label, (task_name, knobs, vocab) in TASKS.items():
        task = make_task(task_name, seq_len=length, vocab_size=vocab, **knobs)
        model_for = lambda pos, vocab=vocab: archs.preset(
            "llama", "tiny", vocab_size=vocab, d_model=64, n_layers=2, max_len=max(evals),
            short_conv=4, **pos)
        for scheme, (train_pos, eval_pos) in _schemes(length).items():
            runs.append(ExperimentConfig(
                name=f"{task_label}-{scheme}", arch=f"{task_label}:{scheme}", model=model_for(train_pos),
                task=task,
                optimizer=OptimizerConfig(lr=1e-2, weight_decay=0.1),
                schedule=ScheduleConfig(warmup_steps=min(50, steps // 10)),
                train=TrainConfig(steps=steps, batch_size=8 if smoke else 32, log_every=5 if smoke else 50),
                eval=EvalConfig(every=steps, lengths=evals, batches=1 if smoke else 4,
                                batch_size=8 if smoke else 64,
                                model=None if eval_pos is None else model_for(eval_pos))))
    return runs
