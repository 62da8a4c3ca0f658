"""Data parallelism: the batch sharded over 8 simulated CPU devices gives the same
training as 1 device. Runs in a subprocess so XLA_FLAGS is set before jax imports."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import os, json, sys
    import jax, numpy as np
    assert jax.device_count() == 8, jax.device_count()
    import archs
    from experiments import train
    from experiments.config import EvalConfig, ExperimentConfig, MeshConfig, TrainConfig
    from experiments.tasks import make_task
    out = sys.argv[1]
    def cfg(mesh):
        return ExperimentConfig(
            name="dp", model=archs.preset("llama", "tiny", vocab_size=32, d_model=32, max_len=32),
            task=make_task("mqar", seq_len=16, vocab_size=32, num_kv_pairs=2),
            train=TrainConfig(steps=4, batch_size=8, log_every=1), mesh=mesh,
            eval=EvalConfig(every=4, batches=1, batch_size=8))
    a = train.run(cfg(MeshConfig(data=-1)), out + "/eight", progress=False, write_report=False)
    b = train.run(cfg(MeshConfig(data=1)), out + "/one", progress=False, write_report=False,
                  devices=jax.devices()[:1])
    c = train.run(cfg(MeshConfig(data=2, fsdp=2, tensor=2)), out + "/mixed", progress=False,
                  write_report=False)
    rows = lambda d: [json.loads(l) for l in open(out + "/" + d + "/metrics.jsonl") if '"train"' in l]
    for other in ("one", "mixed"):
        for r8, r1 in zip(rows("eight"), rows(other)):
            assert abs(r8["loss"] - r1["loss"]) < 1e-5 * max(1, abs(r1["loss"])), (other, r8, r1)
            assert abs(r8["grad_norm"] - r1["grad_norm"]) < 1e-4 * max(1, r1["grad_norm"]), (other, r8, r1)
    print("OK", [r["loss"] for r in rows("eight")])
''')


def test_eight_device_data_parallel_equals_single_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OK" in proc.stdout
