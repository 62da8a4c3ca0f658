"""Expert parallelism (layers/moe/expert_parallel.py) == single device, on 8 simulated CPU devices.

The check runs in a separate process: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
must be set before jax is imported, and this pytest process has already imported it
with one device. The child asserts and exits non-zero on any mismatch.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(r'''
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from layers.moe import MoEConfig

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "expert"))
    # no expert axis: dropless runs per batch shard inside shard_map (grouped-matmul kernels
    # cannot be partitioned by GSPMD), weights all-gathered from their FSDP shards
    fsdp_mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    D = 16
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 12, D))      # 8 sequences: 1 per device
    cot = jax.random.normal(jax.random.PRNGKey(1), (8, 12, D))

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30)

    CASES = {
        # capacity 1.0: some assignments overflow, so drops must match too
        "capacity": MoEConfig(n_experts=8, top_k=2, hidden=24, capacity_factor=1.0,
                              load_balance_coef=0.01),
        # dropless: capacity Cap = T buffers under expert parallelism vs gmm on one device
        "dropless": MoEConfig(n_experts=8, top_k=2, hidden=24, dispatch="dropless", n_shared=1),
        "expert_choice": MoEConfig(n_experts=8, top_k=2, hidden=24, router="expert_choice",
                                   allow_noncausal_routing=True),
        "dropless_fsdp": MoEConfig(n_experts=8, top_k=2, hidden=24, dispatch="dropless"),
    }
    for name, cfg in CASES.items():
        case_mesh, marker = (fsdp_mesh, "all_gather") if name == "dropless_fsdp" else (mesh, "all_to_all")
        cfg.validate(D)
        m = cfg.make(D, jnp.float32, jnp.float32)
        shapes = jax.eval_shape(m.init, jax.random.PRNGKey(2), x)  # numpy init: no init compile
        rng = np.random.RandomState(0)
        v = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.3, s.dtype), shapes)

        def loss(v, x):
            y, _, aux = m.apply(v, x)
            return jnp.sum(y * cot) + sum(aux["losses"].values()), (y, aux["metrics"])

        step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        single = jax.jit(step)
        assert "all_to_all" not in single.lower(v, x).as_text()
        (l1, (y1, m1)), g1 = single(v, x)
        with jax.set_mesh(case_mesh):
            sharded = jax.jit(step)
            text = sharded.lower(v, x).as_text()
            assert marker in text and "shard_map" in text or "sdy.manual_computation" in text, name
            (l2, (y2, m2)), g2 = sharded(v, x)
        assert rel(y2, y1) < 1e-5, (name, rel(y2, y1))
        assert rel(l2, l1) < 1e-5, (name, l1, l2)
        for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
            assert rel(a, b) < 1e-5, (name, rel(a, b))
        for k in m1:
            np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
        if name == "capacity":
            assert float(m1["moe_dropped"]) > 0, "the capacity case should overflow"
        print(name, "ok", float(m1["moe_dropped"]))
''')


def test_expert_parallel_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    root = str(pathlib.Path(__file__).resolve().parents[3])  # the repository root
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.stdout.count(" ok ") == 4, proc.stdout
