"""Train-step throughput and MFU of a ~125M-parameter Llama (GPT-3 Small shape) on one
accelerator; run by ``tools/device_check.sh``, not meant for CPU.

    archlab run experiments/configs/mfu_125m.py --out runs/mfu_125m --overwrite

D 768, 12 layers, 12 heads (GQA 12/4), SwiGLU, V 32000, T 2048, batch 16, bf16
compute, no remat; 30 steps (throughput from the steps after the first). The
task is MQAR (the batch is [16, 2048] tokens; accuracy is not the point). MFU =
tokens/s * model FLOPs per token / peak bf16 FLOP/s, with model FLOPs as in
``experiments.aot.estimate``.
"""

import archs
from experiments.config import EvalConfig, ExperimentConfig, OptimizerConfig, TrainConfig
from experiments.tasks import make_task


def get_config(smoke: bool = False):
    model = archs.preset("llama", "small", vocab_size=32000, d_model=768, n_layers=12, n_heads=12,
                         n_kv_heads=4, max_len=2048, dtype="bfloat16", tie_embeddings=True)
    seq, batch, steps = (64, 2, 3) if smoke else (2048, 16, 30)
    return ExperimentConfig(
        name="llama-125m", model=model, task=make_task("mqar", seq_len=seq, vocab_size=8192),
        optimizer=OptimizerConfig(lr=3e-4), train=TrainConfig(steps=steps, batch_size=batch, log_every=10),
        eval=EvalConfig(every=steps, batches=1, batch_size=batch))
