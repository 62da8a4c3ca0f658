"""Multi-host for real: ``archlab run --distributed`` in 2 processes (a local coordinator,
gloo CPU collectives) x 4 simulated CPU devices each trains a tiny model on a data=2 x fsdp=4
mesh spanning both, checkpoints, dies abruptly (``os._exit``) right after the step-4
checkpoint, resumes to step 6, and matches the single-process 8-device run."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

EXPERIMENT = '''"""Tiny multi-host test run on a data=2 x fsdp=4 mesh."""
import archs
from experiments.config import EvalConfig, ExperimentConfig, MeshConfig, TrainConfig
from experiments.tasks import make_task

def get_config(smoke=False):
    return ExperimentConfig(
        name="mh", model=archs.preset("llama", "tiny", vocab_size=32, d_model=32, max_len=32),
        task=make_task("mqar", seq_len=16, vocab_size=32, num_kv_pairs=2),
        train=TrainConfig(steps=6, batch_size=8, log_every=1, checkpoint_every=2, keep_checkpoints=3),
        eval=EvalConfig(every=6, batches=1, batch_size=8), mesh=MeshConfig(data=2, fsdp=4))
'''

# One process of `archlab run`; with die_at, it dies abruptly (os._exit: no cleanup, no
# summary) right after the checkpoint of that step has been written.
WORKER = textwrap.dedent('''
    import os, sys
    die_at, args = int(sys.argv[1]), sys.argv[2:]
    from experiments import checkpoint
    from experiments.cli import main
    if die_at:
        save = checkpoint.Checkpointer.save
        def save_then_die(self, step, state):
            save(self, step, state)
            if step == die_at:
                self.wait()
                os._exit(17)
        checkpoint.Checkpointer.save = save_then_die
    code = main(args)
    import jax
    assert jax.device_count() == 8, jax.device_count()
    sys.exit(code)
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(nproc, experiment, out, resume, die_at):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // nproc}")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    port = _free_port()
    args = ["run", experiment, "--out", out, "--no-progress"] + (["--resume"] if resume else [])
    procs = []
    for i in range(nproc):
        dist = ["--distributed", "--coordinator", f"localhost:{port}", "--num-processes", str(nproc),
                "--process-id", str(i)] if nproc > 1 else []
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(die_at), *args, *dist],
                                      env=env, cwd=root, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    for p in procs:
        log, _ = p.communicate(timeout=600)
        results.append((p.returncode, log))
    return results


def _train_rows(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if r["split"] == "train"]


def test_two_processes_train_checkpoint_die_resume_and_match_one_process(tmp_path):
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    experiment = tmp_path / "mh.py"
    experiment.write_text(EXPERIMENT)
    experiment = str(experiment)
    died = _launch(2, experiment, multi, resume=False, die_at=4)
    assert [rc for rc, _ in died] == [17, 17], died[0][1][-3000:] + died[1][1][-3000:]
    assert "4" in os.listdir(os.path.join(multi, "checkpoints"))
    resumed = _launch(2, experiment, multi, resume=True, die_at=0)
    assert [rc for rc, _ in resumed] == [0, 0], resumed[0][1][-3000:] + resumed[1][1][-3000:]
    ref = _launch(1, experiment, single, resume=False, die_at=0)
    assert ref[0][0] == 0, ref[0][1][-3000:]
    got, want = _train_rows(multi), _train_rows(single)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(got, want):   # the same math; collectives may sum in another order
        np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]], rtol=1e-5)
    from experiments import export
    (_, p_multi), (_, p_single) = export.restore_unsharded(multi), export.restore_unsharded(single)
    a, b = export.flatten(p_multi["params"], "params"), export.flatten(p_single["params"], "params")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
