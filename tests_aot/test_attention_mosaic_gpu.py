"""Deviceless compile of the Mosaic GPU flash attention for H100 (sm_90a).

Compiles the forward and the forward+backward at the H100 goal shape (B=1,
T=8192, H=32 over K=8 kv heads, Dh=128, bf16, causal) for a compile-only H100,
and reads back each kernel's shared-memory footprint as computed by the Mosaic
GPU lowering (which refuses kernels over the 227 KiB per-block limit).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.mosaic.gpu import core as mgpu_core
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels.attention import mosaic_gpu as mg
from pallas_kernels.attention import mosaic_gpu_bwd as mg_bwd

from tests_aot.conftest import GPU

B, T, H, KH, DH = 1, 8192, 32, 8, 128
SMEM_LIMIT = 227 * 1024  # sm_90 opt-in shared memory per block


@pytest.fixture(scope="module")
def h100(compile_target):
    _, devices = compile_target(GPU)
    mesh = Mesh(np.array(devices), ("x",))
    rep = NamedSharding(mesh, P())
    q = jax.ShapeDtypeStruct((B, T, H, DH), jnp.bfloat16, sharding=rep)
    kv = jax.ShapeDtypeStruct((B, T, KH, DH), jnp.bfloat16, sharding=rep)
    return mesh, q, kv


def _compile(mesh, fn, *args):
    # The Pallas GPU lowering reads the target from the ambient abstract mesh.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jax.jit(fn).trace(*args).lower().compile()


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
def test_compiles_for_h100(h100, grad):
    mesh, q, kv = h100

    def fwd(q, k, v):
        return mg.flash_attention_mosaic_gpu(q, k, v, causal=True)

    loss = lambda *a: fwd(*a).astype(jnp.float32).sum()
    fn = jax.grad(loss, argnums=(0, 1, 2)) if grad else fwd
    compiled = _compile(mesh, fn, q, kv, kv)
    assert compiled.as_text().count('custom_call_target="mosaic_gpu') == (3 if grad else 1)
    mem = compiled.memory_analysis()
    print(f"\nH100 {'fwd+bwd' if grad else 'fwd'}: arguments {mem.argument_size_in_bytes / 2**20:.0f} "
          f"MiB, outputs {mem.output_size_in_bytes / 2**20:.0f} MiB, "
          f"temporaries {mem.temp_size_in_bytes / 2**20:.0f} MiB")


def _smem_bytes(mesh, fn, *args) -> int:
    """The kernel's dynamic shared memory, from the lowering's own limit check."""
    with mgpu_core.artificial_shared_memory_limit(0), pytest.raises(ValueError) as err:
        _compile(mesh, fn, *args)
    return int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1))


def test_shared_memory_per_kernel(h100):
    mesh, q, kv = h100
    cfg = mg.MosaicFlashConfig(t=T, s=T, causal=True, window=None, scale=DH ** -0.5)
    lse = jax.ShapeDtypeStruct((B, H, T), jnp.float32, sharding=q.sharding)
    kernels = {
        "fwd": (lambda q, k, v: mg._forward(q, k, v, None, None, cfg), (q, kv, kv)),
        "dq": (lambda q, k, v, do, lse, d: mg_bwd.dq_call(q, k, v, do, lse, d, None, None, cfg),
               (q, kv, kv, q, lse, lse)),
        "dkv": (lambda q, k, v, do, lse, d: mg_bwd.dkv_call(q, k, v, do, lse, d, None, None, cfg),
                (q, kv, kv, q, lse, lse)),
    }
    used = {name: _smem_bytes(mesh, fn, *args) for name, (fn, args) in kernels.items()}
    print("\nH100 shared memory per block (KiB):",
          {name: round(b / 1024, 1) for name, b in used.items()})
    assert all(0 < b <= SMEM_LIMIT for b in used.values()), used
