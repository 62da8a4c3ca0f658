"""Deviceless compile of the Mosaic TPU flash attention (forward, dQ and dK/dV kernels).

For TPU v5e and v5p, forward+backward through ``pallas_kernels.flash_attention`` at
the Llama-3-8B attention shape (T = 8192, H = 32, K = 8, Dh = 128, bf16) with a
sliding window and segment ids must compile to the three Mosaic kernels, with
``impl=None`` (which must pick "pallas_tpu" under a TPU mesh). The VMEM each kernel
reserves (``used_scoped_memory_configs`` in the compiled custom call) is printed and
must stay under 4 MiB with the default blocks (hand count for the forward at
512 x 512, Dh 128, bf16: double-buffered q/k/v/o blocks 1 MiB, m/l/acc scratch
0.75 MiB). A small fp32 case with an odd length and a padded head dim (T = 300,
Dh = 80) checks the padding paths compile too.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pallas_kernels
from experiments import mesh as mesh_lib

KERNELS = ("archlab_flash_tpu_fwd", "archlab_flash_tpu_dq", "archlab_flash_tpu_dkv")
MiB = 1 << 20


def _compile(devices, shapes, impl, **kw):
    mesh = Mesh(np.asarray(devices[:1]), ("x",))
    rep = NamedSharding(mesh, P())
    (b, t, h, k, dh), dtype = shapes
    args = [jax.ShapeDtypeStruct((b, t, h, dh), dtype, sharding=rep),
            jax.ShapeDtypeStruct((b, t, k, dh), dtype, sharding=rep),
            jax.ShapeDtypeStruct((b, t, k, dh), dtype, sharding=rep),
            jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rep)]

    def loss(q, k, v, seg):
        o = pallas_kernels.flash_attention(q, k, v, segment_ids=seg, impl=impl, **kw)
        return jnp.sum(o.astype(jnp.float32))

    with mesh_lib.mesh_context(mesh):
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()


def _vmem_per_kernel(text: str) -> dict[str, int]:
    """Kernel name -> VMEM bytes reserved (memory space 1) in its tpu_custom_call."""
    out = {}
    for m in re.finditer(r'custom_call_target="tpu_custom_call"', text):
        line = text[text.rfind("\n", 0, m.start()):text.find("\n", m.start())]
        name = re.search(r"archlab_flash_tpu_(fwd|dq|dkv)", line)
        vmem = re.search(r'used_scoped_memory_configs":\[\{"memory_space":"1",'
                         r'"offset":"\d+","size":"(\d+)"', line)
        if name and vmem:
            out[name.group(0)] = int(vmem.group(1))
    return out


@pytest.mark.parametrize("target", ["tpu:v5e-1", "tpu:v5p-2"])
def test_flash_fwd_bwd_compiles_with_default_dispatch(compile_target, target):
    _, devices = compile_target(target)
    text = _compile(devices, ((1, 8192, 32, 8, 128), jnp.bfloat16), None, causal=True,
                    window=4096)
    assert text.count('custom_call_target="tpu_custom_call"') == 3
    vmem = _vmem_per_kernel(text)
    assert set(vmem) == set(KERNELS), vmem
    print(f"\n{target} VMEM per kernel: " +
          ", ".join(f"{k[len('archlab_flash_tpu_'):]} {v / MiB:.2f} MiB" for k, v in vmem.items()))
    assert max(vmem.values()) < 4 * MiB


def test_padded_fp32_case_compiles_for_v5e(compile_target):
    _, devices = compile_target("tpu:v5e-1")
    text = _compile(devices, ((2, 300, 6, 2, 80), jnp.float32), "pallas_tpu", causal=False,
                    window=100)
    assert set(_vmem_per_kernel(text)) == set(KERNELS)
