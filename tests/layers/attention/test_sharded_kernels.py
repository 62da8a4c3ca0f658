"""Kernel attention under a sharded mesh: the layer runs the kernel per (batch shard, head
shard) in shard_map (GSPMD cannot partition Pallas custom calls), and the result equals
the unsharded call in values and gradients. 8 simulated CPU devices, in a child process
(XLA_FLAGS must be set before jax is imported)."""

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
    from layers.attention import AttentionConfig

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    D, B, T = 32, 4, 24
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.concatenate([jnp.zeros((B, 10), jnp.int32), jnp.ones((B, T - 10), jnp.int32)], 1)
    cot = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30)

    for impl in ("tokamax", "pallas_triton"):
        cfg = AttentionConfig(n_heads=4, n_kv_heads=2, attn_impl=impl, window=9)
        m = cfg.make(D, jnp.float32, jnp.float32)
        v = m.init(jax.random.PRNGKey(2), x, positions=pos)

        def loss(v, x):
            y, _, _ = m.apply(v, x, positions=pos, segment_ids=seg)
            return jnp.sum(y * cot), y

        step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (l1, y1), g1 = jax.jit(step)(v, x)
        with jax.set_mesh(mesh):
            sharded = jax.jit(step)
            text = sharded.lower(v, x).as_text()
            assert "shard_map" in text or "manual_computation" in text, impl
            (l2, y2), g2 = sharded(v, x)
        assert rel(y2, y1) < 1e-5, (impl, rel(y2, y1))
        for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
            assert rel(a, b) < 1e-5, (impl, rel(a, b))
        print(impl, "ok")
''')


def test_kernel_attention_under_a_mesh_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    root = str(pathlib.Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.stdout.count(" ok") == 2, proc.stdout
