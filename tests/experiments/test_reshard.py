"""Resharding: a checkpoint saved on fsdp=8 restores onto fsdp=2 x data=2 (4 devices) and
onto one device with identical parameters; ``archlab export`` writes them unsharded.
Runs in a subprocess so XLA_FLAGS is set before jax imports."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import dataclasses, sys
    import flax.linen as nn
    import jax, numpy as np
    assert jax.device_count() == 8, jax.device_count()
    import archs
    from experiments import checkpoint as ckpt_lib, export, mesh as mesh_lib, train
    from experiments.config import EvalConfig, ExperimentConfig, MeshConfig, TrainConfig
    from experiments.tasks import make_task
    out = sys.argv[1]
    cfg = ExperimentConfig(
        name="rs", model=archs.preset("llama", "tiny", vocab_size=32, d_model=32, max_len=32),
        task=make_task("mqar", seq_len=16, vocab_size=32, num_kv_pairs=2),
        train=TrainConfig(steps=2, batch_size=8, log_every=1), mesh=MeshConfig(data=1, fsdp=8),
        eval=EvalConfig(every=2, batches=1, batch_size=8))
    train.run(cfg, out + "/run", progress=False, write_report=False)

    def restore_on(mesh_cfg, devices):
        c = dataclasses.replace(cfg, mesh=mesh_cfg)
        mesh, model = mesh_lib.make_mesh(c.mesh, devices), archs.build(c.model)
        tx, _ = train.make_optimizer(c)
        with mesh_lib.mesh_context(mesh), nn.logical_axis_rules(mesh_lib.rules(c.mesh)):
            fresh = train.init_state(c, model, tx, mesh)
            ck = ckpt_lib.Checkpointer(out + "/run/checkpoints", 2)
            state = ck.restore(2, ckpt_lib.abstract_like(fresh))
            ck.close()
        return state
    saved = restore_on(cfg.mesh, jax.devices())
    embed = saved.params["embed"]["table"]
    assert len(embed.sharding.device_set) == 8 and not embed.sharding.is_fully_replicated
    moved = restore_on(MeshConfig(data=2, fsdp=2), jax.devices()[:4])
    assert moved.params["embed"]["table"].sharding.mesh.shape == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 1}
    _, one = export.restore_unsharded(out + "/run")
    flat = lambda t: {k: np.asarray(v) for k, v in export.flatten(t, "params").items()}
    a, b, c = flat(saved.params), flat(moved.params), flat(one["params"])
    assert a.keys() == b.keys() == c.keys() and len(a) > 5
    for k in a:
        assert np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k]), k
    path = export.export(out + "/run", out + "/exported")
    npz = np.load(path)
    assert {k for k in npz.files if k.startswith("params/")} == set(a)
    for k in a:
        assert np.array_equal(npz[k], a[k]), k
    print("RESHARD_OK", len(a))
''')


def test_checkpoint_restores_onto_another_mesh_and_exports_unsharded(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "RESHARD_OK" in proc.stdout
