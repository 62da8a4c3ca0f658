"""Every Pallas kernel compiles deviceless, forward and forward+backward, on realistic
shapes, through the public dispatchers (``pallas_kernels.flash_attention`` and
``pallas_kernels.gmm`` with an explicit ``impl``), for TPU v5e and H100.

The dispatchers read the platform from the abstract mesh, so each call is lowered
under a one-device mesh of the target's compile-only device. A kernel that silently
fell back to XLA would not be a kernel check: the compiled HLO must contain the
kernel's custom call.
"""

import flax.linen as nn  # noqa: F401  (imports jax config the same way as the package)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pallas_kernels
from experiments import mesh as mesh_lib
from tests_aot.conftest import GPU, TPU

# The one place that lists the kernel impls each platform must compile (extend it when
# a kernel lands): platform -> impls of the dispatchers.
KERNEL_IMPLS = {
    "tpu": ("pallas_tpu",),
    "gpu": ("pallas_triton",),
}
# What each impl leaves in the optimized HLO (its custom-call target).
CUSTOM_CALL = {"pallas_tpu": "tpu_custom_call", "pallas_triton": "triton",
               "pallas_gpu": "mosaic_gpu"}
TARGETS = {"tpu": TPU, "gpu": GPU}
CASES = [(p, impl) for p, impls in KERNEL_IMPLS.items() for impl in impls]


def _compile(fn, args, devices):
    mesh = Mesh(np.asarray(devices[:1]), ("x",))
    sharded = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())) for a in args]
    with mesh_lib.mesh_context(mesh):
        return jax.jit(fn).lower(*sharded).compile().as_text()


def _attention_args():
    b, t, h, k, dh = 1, 8192, 32, 8, 128  # Llama-3-8B attention at T = 8192
    return [jax.ShapeDtypeStruct((b, t, h, dh), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, t, k, dh), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, t, k, dh), jnp.bfloat16)]


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("platform,impl", CASES)
def test_flash_attention_compiles(compile_target, platform, impl, grad):
    _, devices = compile_target(TARGETS[platform])

    def fwd(q, k, v):
        return pallas_kernels.flash_attention(q, k, v, causal=True, impl=impl)

    def loss(q, k, v):
        return jnp.sum(fwd(q, k, v).astype(jnp.float32))

    fn = jax.grad(loss, argnums=(0, 1, 2)) if grad else fwd
    text = _compile(fn, _attention_args(), devices)
    assert CUSTOM_CALL[impl] in text, f"{impl} did not compile to its kernel for {platform}"


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("platform,impl", CASES)
def test_gmm_compiles(compile_target, platform, impl, grad):
    _, devices = compile_target(TARGETS[platform])
    m, kdim, n, g = 16384, 4096, 1024, 64  # E = 64 experts, 16k routed rows
    args = [jax.ShapeDtypeStruct((m, kdim), jnp.bfloat16), jax.ShapeDtypeStruct((g, kdim, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((g,), jnp.int32)]

    def fwd(lhs, rhs, sizes):
        return pallas_kernels.gmm(lhs, rhs, sizes, impl=impl)

    def loss(lhs, rhs, sizes):
        return jnp.sum(fwd(lhs, rhs, sizes).astype(jnp.float32))

    fn = jax.grad(loss, argnums=(0, 1)) if grad else fwd
    text = _compile(fn, args, devices)
    assert CUSTOM_CALL[impl] in text, f"{impl} did not compile to its kernel for {platform}"
