"""Deviceless compile of the Mosaic TPU grouped matmul (gmm, its transposed form, tgmm).

For TPU v5e and v5p: the forward and backward through the public dispatcher
(``pallas_kernels.gmm(impl="pallas_tpu")``) with a traced group offset, at an MoE
shape (M = 16384 routed rows, K = 4096, N = 1024, E = 64, bf16) must compile to
three Mosaic kernels. On v5e each kernel with the default blocks
``(256, 512, 1024)`` must fit a 6 MiB scoped-VMEM limit (pallas_tpu.py's budget:
about 4.5 MiB of buffers) and must not fit 2 MiB, so the limit is really applied.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pallas_kernels
from experiments import mesh as mesh_lib
from pallas_kernels.grouped_matmul import pallas_tpu
from pallas_kernels.grouped_matmul.reference import local_bounds

M, K, N, E = 16384, 4096, 1024, 64
MiB = 1 << 20


def _args(devices):
    mesh = Mesh(np.asarray(devices[:1]), ("x",))
    rep = NamedSharding(mesh, P())
    shapes = [((M, K), jnp.bfloat16), ((E, K, N), jnp.bfloat16), ((E,), jnp.int32),
              ((M, N), jnp.bfloat16)]
    return mesh, [jax.ShapeDtypeStruct(s, d, sharding=rep) for s, d in shapes]


def _compile(mesh, fn, args):
    with mesh_lib.mesh_context(mesh):
        return jax.jit(fn).lower(*args).compile()


@pytest.mark.parametrize("target", ["tpu:v5e-1", "tpu:v5p-2"])
def test_gmm_fwd_bwd_compiles(compile_target, target):
    _, devices = compile_target(target)
    mesh, args = _args(devices)

    def fwd_bwd(lhs, rhs, sizes, dout):
        f = lambda x, w: pallas_kernels.gmm(x, w, sizes, impl="pallas_tpu",
                                            group_offset=jnp.int32(0))
        out, vjp = jax.vjp(f, lhs, rhs)
        return out, vjp(dout)

    compiled = _compile(mesh, fwd_bwd, args)
    text = compiled.as_text()
    for name in ("archlab_gmm_tpu", "archlab_tgmm_tpu"):
        assert name in text, f"{name} missing for {target}"
    assert text.count('custom_call_target="tpu_custom_call"') == 3  # gmm, gmm(rhs^T), tgmm
    mem = compiled.memory_analysis()
    print(f"\n{target} gmm fwd+bwd: arguments {mem.argument_size_in_bytes / MiB:.0f} MiB, "
          f"outputs {mem.output_size_in_bytes / MiB:.0f} MiB, "
          f"temporaries {mem.temp_size_in_bytes / MiB:.1f} MiB")


def _kernel(name: str, limit: int):
    cfg = pallas_tpu.TpuGmmConfig(vmem_limit_bytes=limit)

    def fn(lhs, rhs, sizes, dout):
        starts, ends = local_bounds(sizes, E, M)
        if name == "gmm":
            return pallas_tpu.gmm_call(lhs, rhs, starts, ends, cfg)
        if name == "gmm_transposed":
            return pallas_tpu.gmm_call(dout, rhs, starts, ends, cfg, transpose_rhs=True)
        return pallas_tpu.tgmm_call(lhs, dout, starts, ends, cfg, jnp.bfloat16)
    return fn


@pytest.mark.parametrize("name", ["gmm", "gmm_transposed", "tgmm"])
def test_default_blocks_fit_6_mib_of_vmem_on_v5e(compile_target, name):
    _, devices = compile_target("tpu:v5e-1")
    mesh, args = _args(devices)
    _compile(mesh, _kernel(name, 6 * MiB), args)


def test_vmem_limit_is_enforced(compile_target):
    _, devices = compile_target("tpu:v5e-1")
    mesh, args = _args(devices)
    with pytest.raises(Exception, match="(?i)vmem"):
        _compile(mesh, _kernel("gmm", 2 * MiB), args)
