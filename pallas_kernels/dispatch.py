"""What the kernel dispatchers share: impl names, backend detection, interpret modes.

``attention.ops.flash_attention`` and ``grouped_matmul.ops.gmm``/``tgmm`` take the
same ``impl`` names with one meaning on every backend (the table is in the package
docstring). This module holds the pieces both dispatchers use:

* ``IMPLS``, ``BEST`` (what ``impl=None`` picks per backend) and ``OWN`` (what
  ``impl="pallas"`` picks per backend);
* ``current_backend``: the abstract mesh's device platform when one is set (a
  deviceless compile), else ``jax.default_backend()``;
* ``gpu_is_hopper_or_newer``: whether the GPU (or the abstract device) is sm_90+;
* ``tpu_interpret`` / ``triton_interpret``: the ``interpret`` argument resolved for
  the Mosaic TPU and Pallas Triton kernels, with the same ValueErrors for both;
* ``import_tokamax``: the optional ``tokamax`` dependency, or a ValueError naming
  the extra that provides it.

Nothing here runs a kernel; it is plain Python on static values (tested through
the dispatchers in tests/pallas_kernels).
"""

from __future__ import annotations

import re

import jax

IMPLS = ("xla", "pallas", "pallas_tpu", "pallas_gpu", "pallas_triton", "tokamax")
BEST = {"cpu": "xla", "gpu": "pallas_gpu", "tpu": "pallas_tpu"}  # impl=None
OWN = {"cpu": "pallas_triton", "gpu": "pallas_gpu", "tpu": "pallas_tpu"}  # impl="pallas"


def current_backend() -> str:
    """"cpu", "gpu" or "tpu": the abstract mesh's device platform if one is set (deviceless
    compiles), else ``jax.default_backend()``."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def gpu_is_hopper_or_newer() -> bool:
    """sm_90+: the abstract mesh's device kind when set (deviceless), else GPU 0's."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if device is not None and device.platform in ("gpu", "cuda"):
        return re.search(r"\bG?[HB]\d{3}\b", device.device_kind) is not None  # H100, GB200
    try:
        return float(jax.devices("gpu")[0].compute_capability) >= 9.0
    except (RuntimeError, AttributeError, ValueError):
        return False


def tpu_interpret(interpret, backend: str, who: str):
    """``interpret`` for a Mosaic TPU kernel: None (compile with Mosaic) or a
    ``pltpu.InterpretParams`` (TPU interpret mode).

    None means interpret on CPU only; True means default ``InterpretParams``;
    False compiles with Mosaic (on CPU this only lowers for TPU). ``who`` prefixes
    the ValueError raised for anything else.
    """
    from jax.experimental.pallas import tpu as pltpu
    if interpret is None:
        interpret = backend == "cpu"
    if interpret is True:
        return pltpu.InterpretParams()
    if interpret is False:
        return None
    if not isinstance(interpret, pltpu.InterpretParams):
        raise ValueError(f"{who}: interpret={interpret!r} must be None, a bool or "
                         "a pltpu.InterpretParams for impl='pallas_tpu'")
    return interpret


def triton_interpret(interpret, backend: str, who: str) -> bool:
    """``interpret`` for a Pallas Triton kernel: True runs the generic Pallas interpreter.

    None means interpret on CPU only. ValueError (prefixed by ``who``) for a
    non-bool, and for ``False`` on CPU, where Triton cannot run.
    """
    if interpret is None:
        interpret = backend == "cpu"
    if not isinstance(interpret, bool):
        raise ValueError(f"{who}: interpret={interpret!r} must be None or a bool for "
                         "impl='pallas_triton'")
    if backend == "cpu" and not interpret:
        raise ValueError(f"{who}: impl='pallas_triton' with interpret=False cannot run on "
                         "CPU; use interpret=None/True or impl='xla'")
    return interpret


def import_tokamax():
    """The ``tokamax`` module (the ``tokamax`` extra), or ValueError saying how to install it."""
    try:
        import tokamax
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("impl='tokamax' needs the tokamax package: "
                         "pip install -e '.[tokamax]'") from e
    return tokamax
