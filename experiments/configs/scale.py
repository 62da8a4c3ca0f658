"""The scale table: published model shapes compiled deviceless with ``archlab aot``.

    archlab aot experiments/configs/scale.py --only llama3-8b --target tpu:v5p-8 --no-decode
    archlab aot experiments/configs/scale.py --only mixtral-8x7b --target gpu:2x8xh100 \\
        --set train.batch_size=16 --no-decode

Nothing here trains (``archlab run`` on these would need the hardware); the file
gives the model shapes and the training setup the table in BENCHMARKS.md
("Deviceless compile") was compiled with: bf16 compute, fp32 parameters and AdamW
state, full rematerialization of every scanned layer, FSDP over every device
(``mesh.fsdp=-1``, ``data=1``) unless a ``--set mesh.*`` says otherwise. The
task is MQAR at the model's sequence length (the task only fixes the batch shape:
``[B, T]`` int32 tokens).

Shapes (all built from archlab presets with field overrides):

* ``llama3-8b``: the ``llama`` ``8b`` preset (Llama-3-8B: D 4096, 32 layers, GQA
  32/8, FFN 14336, V 128256), T = 8192.
* ``llama3-70b``: the ``llama`` ``70b`` preset (Llama-3-70B: D 8192, 80 layers, GQA 64/8,
  FFN 28672), T = 8192.
* ``mixtral-8x7b``: Mixtral-8x7B (D 4096, 32 layers, GQA 32/8, 8 experts of width
  14336, top-2, V 32000, untied), T = 4096 (RoPE base kept at the preset's 5e5; it
  does not change the compiled program).
* ``deepseek-v3-d4``: DeepSeek-V3 width with 4 layers instead of 61: D 7168, 256
  routed experts of width 2048 (64 coarse experts split 4-way), top-8, one shared
  expert, pool-limited routing (V3's 8 expert groups, top-4), V 129280; attention is archlab's
  GQA with 128 heads of 128 (V3 uses MLA), every layer MoE (V3's first 3 are dense).
* ``jamba-52b``: Jamba (D 4096, 32 layers = 4 groups of 8, Mamba:attention 7:1,
  MoE every other layer with 16 experts of width 14336 top-2, GQA 32/8, V 65536),
  T = 4096.
* ``mamba2-2.7b``: Mamba-2 2.7B (D 2560, 64 mixer-only layers, N = 128, head dim 64,
  V 50288, tied), T = 4096.
"""

import archs
from experiments.config import EvalConfig, ExperimentConfig, MeshConfig, TrainConfig
from experiments.tasks import make_task

_COMMON = dict(dtype="bfloat16", remat="full")

# name -> (preset, size, overrides, seq_len)
MODELS = {
    "llama3-8b": ("llama", "8b", {}, 8192),
    "llama3-70b": ("llama", "70b", {}, 8192),
    "mixtral-8x7b": ("mixtral", "small", dict(vocab_size=32000, d_model=4096, n_layers=32,
                                              n_heads=32, n_kv_heads=8, hidden=14336,
                                              tie_embeddings=False, max_len=32768), 4096),
    "deepseek-v3-d4": ("deepseek_moe", "small", dict(vocab_size=129280, d_model=7168, n_layers=4,
                                                     n_heads=128, n_kv_heads=128, n_experts=64,
                                                     granularity=4, top_k=2, hidden=8192,
                                                     n_expert_pools=8, topk_pools=4,
                                                     tie_embeddings=False, max_len=4096), 4096),
    "jamba-52b": ("jamba", "small", dict(vocab_size=65536, d_model=4096, n_layers=32, n_heads=32,
                                         n_kv_heads=8, n_experts=16, **{"moe.hidden": 14336},
                                         tie_embeddings=False, max_len=262144), 4096),
    "mamba2-2.7b": ("mamba2", "small", dict(vocab_size=50288, d_model=2560, n_layers=64,
                                            d_state=128, head_dim=64, max_len=8192), 4096),
}


def get_sweep(smoke: bool = False):
    runs = []
    for name, (preset, size, overrides, seq_len) in MODELS.items():
        model = archs.preset(preset, size, **{**_COMMON, **overrides})
        if smoke:  # same structure, tiny widths: what the aot tests compile
            model = archs.preset(preset, "tiny", remat="full")
            seq_len = 64
        task = make_task("mqar", seq_len=seq_len, vocab_size=min(model.vocab_size, 8192))
        runs.append(ExperimentConfig(
            name=name, model=model, task=task,
            train=TrainConfig(steps=1000, batch_size=32), eval=EvalConfig(batch_size=32),
            mesh=MeshConfig(data=1, fsdp=-1)))
    return runs
