"""Deviceless compile checks (``make aot-test``): need the ``aot`` extra (libtpu and the
CUDA plugin), no accelerator. Compile-only devices come from the targets below."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # pytest -n 2: two processes load libtpu

import pytest  # noqa: E402

from experiments.aot import targets  # noqa: E402

# The targets every check compiles for: one v5e chip and one H100.
TPU, GPU = "tpu:v5e-1", "gpu:h100"


@pytest.fixture(scope="session")
def compile_target():
    cache = {}

    def get(spec: str):
        if spec not in cache:
            t = targets.parse_target(spec)
            cache[spec] = (t, targets.compile_only_devices(t))
        return cache[spec]
    return get
