"""Compile targets for ``archlab aot``: published chip figures and compile-only devices.

A target names a chip and a count: ``tpu:v5p-64`` (Cloud TPU naming: the v4/v5p
suffix counts TensorCores, two per chip, so v5p-64 is 32 chips in a 2x4x4 torus;
the v5e/v6e suffix counts chips), ``gpu:h100`` (one GPU), ``gpu:8xh100`` (one host
of 8), ``gpu:2x8xh100`` (2 hosts of 8). The devices come from
``jax.experimental.topologies.get_topology_desc``: libtpu (``jax[tpu]``) gives
compile-only TPU devices for a topology name, the CUDA plugin (``jax[cuda13]``)
gives compile-only GPUs for an XLA ``GpuTargetConfig`` (text proto built here from
the chip table), so nothing needs the hardware.

``CHIPS`` holds, per chip, the figures the roofline uses: peak dense bf16 FLOP/s,
HBM bytes and bandwidth, and interconnect bandwidth. Sources (vendor pages, read
for this table):

* TPU v4, v5e, v5p, v6e: Google Cloud TPU system architecture pages
  (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): "Peak compute per chip (bf16)",
  "HBM capacity/bandwidth per chip", "Bidirectional inter-chip interconnect (ICI)
  bandwidth (per chip)".
* H100 SXM5, H200 SXM: NVIDIA H100 / H200 Tensor Core GPU datasheets (BF16 dense
  = the sparsity figure / 2; NVLink 4: 900 GB/s bidirectional per GPU;
  HDR/NDR InfiniBand ConnectX-7 400 Gb/s per GPU between hosts).
* B200: NVIDIA DGX B200 / HGX B200 datasheet (72 PFLOP/s FP8 training per 8 GPUs
  with sparsity -> 2.25 PFLOP/s dense BF16 per GPU; 180 GB HBM3e at 8 TB/s;
  NVLink 5: 1.8 TB/s bidirectional; ConnectX-7 400 Gb/s per GPU).
* A100 SXM4 80GB: NVIDIA A100 datasheet (312 TFLOP/s BF16 dense, 2,039 GB/s,
  NVLink 3: 600 GB/s bidirectional; HDR InfiniBand 200 Gb/s per GPU).

The GPU architectural fields of the target config (SM count, shared memory per
SM and per block, L2 size, clock) are from the NVIDIA CUDA programming guide's
compute-capability tables and the Hopper / Ampere / Blackwell architecture
whitepapers.
"""

from __future__ import annotations

import dataclasses
import os
import re

GB = 1e9
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's published figures (per chip)."""
    name: str
    platform: str            # "tpu" | "cuda"
    device_kind: str         # what jax reports as device.device_kind
    peak_flops: float        # dense bf16 FLOP/s
    hbm_bytes: float
    hbm_bw: float            # bytes/s
    link_bw: float           # bytes/s, bidirectional per chip (ICI on TPU, NVLink on GPU)
    host_link_bw: float = 0.0  # bytes/s per GPU between hosts (InfiniBand); TPU slices: ICI
    tpu_topology: str = ""   # libtpu topology prefix ("v5p")
    cores_per_chip: int = 1  # TensorCores per chip (for the Cloud TPU name suffix)
    devices_per_chip: int = 1  # jax devices per chip (v4 compile-only: one per TensorCore)
    gpu: tuple = ()          # (cc major, cc minor, SMs, smem/SM, smem/block optin, L2, clock GHz)


CHIPS: dict[str, Chip] = {
    # v4 ICI: the Cloud page gives no per-chip figure; 6 links x 50 GB/s (TPU v4 paper,
    # Jouppi et al. 2023) is used. The compile-only v4 topology has one device per core.
    "v4": Chip("TPU v4", "tpu", "TPU v4", 275e12, 32 * GiB, 1200 * GB, 300 * GB,
               tpu_topology="v4", cores_per_chip=2, devices_per_chip=2),
    "v5e": Chip("TPU v5e", "tpu", "TPU v5 lite", 197e12, 16 * GB, 819 * GB, 400 * GB,
                tpu_topology="v5e"),
    "v5p": Chip("TPU v5p", "tpu", "TPU v5", 459e12, 95 * GiB, 2765 * GB, 1200 * GB,
                tpu_topology="v5p", cores_per_chip=2),
    "v6e": Chip("TPU v6e", "tpu", "TPU v6 lite", 918e12, 32 * GB, 1638 * GB, 800 * GB,
                tpu_topology="v6e"),
    "h100": Chip("NVIDIA H100 80GB HBM3", "cuda", "NVIDIA H100 80GB HBM3", 989e12, 80 * GB,
                 3350 * GB, 900 * GB, 50 * GB, gpu=(9, 0, 132, 233472, 232448, 50 * 2 ** 20, 1.98)),
    "h200": Chip("NVIDIA H200", "cuda", "NVIDIA H200", 989e12, 141 * GB, 4800 * GB, 900 * GB,
                 50 * GB, gpu=(9, 0, 132, 233472, 232448, 50 * 2 ** 20, 1.98)),
    "b200": Chip("NVIDIA B200", "cuda", "NVIDIA B200", 2250e12, 180 * GB, 8000 * GB, 1800 * GB,
                 50 * GB, gpu=(10, 0, 148, 233472, 232448, 126 * 2 ** 20, 1.965)),
    "a100": Chip("NVIDIA A100-SXM4-80GB", "cuda", "NVIDIA A100-SXM4-80GB", 312e12, 80 * GB,
                 2039 * GB, 600 * GB, 25 * GB, gpu=(8, 0, 108, 167936, 166912, 40 * 2 ** 20, 1.41)),
}

# Slice shapes libtpu accepts for the common sizes (chips -> topology); other counts
# are factored below.
_TPU_SHAPES = {
    3: {1: "1x1x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
        128: "4x4x8", 256: "4x8x8", 512: "8x8x8"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
        256: "16x16"},
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed target: ``chip`` x ``n_devices`` over ``hosts`` hosts."""
    spec: str
    chip: Chip
    n_devices: int
    hosts: int = 1
    topology: str = ""       # libtpu topology ("v5p:2x4x4") or GPU "slices x hosts x devices"

    @property
    def devices_per_host(self) -> int:
        return self.n_devices // self.hosts

    def per_device(self, figure: str) -> float:
        """A chip figure (``peak_flops``, ``hbm_bytes``, ``hbm_bw``, ``link_bw``,
        ``host_link_bw``) divided among the jax devices of one chip."""
        return getattr(self.chip, figure) / self.chip.devices_per_chip


def parse_target(spec: str) -> Target:
    """``tpu:v5p-64`` | ``gpu:h100`` | ``gpu:8xh100`` | ``gpu:2x8xh100`` -> Target.

    Raises:
      ValueError: unknown platform or chip, or a count the slice shapes do not allow.
    """
    platform, _, rest = spec.partition(":")
    tpus = sorted(k for k, c in CHIPS.items() if c.platform == "tpu")
    gpus = sorted(k for k, c in CHIPS.items() if c.platform == "cuda")
    allowed = f"tpu:<{'|'.join(tpus)}>-<N> or gpu:[HOSTSx][Nx]<{'|'.join(gpus)}>"
    if platform == "tpu":
        m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", rest)
        if not m or m.group(1) not in tpus:
            raise ValueError(f"--target {spec!r}: unknown TPU; allowed: {allowed}")
        chip, n = CHIPS[m.group(1)], int(m.group(2))
        if n % chip.cores_per_chip:
            raise ValueError(f"--target {spec!r}: {chip.name} slices count TensorCores, "
                             f"{chip.cores_per_chip} per chip; {n} is not a multiple")
        chips = n // chip.cores_per_chip
        shape = _tpu_shape(chip, chips, spec)
        hosts = max(1, chips // (4 if chip.cores_per_chip == 2 else 8))
        return Target(spec, chip, chips * chip.devices_per_chip, hosts, f"{chip.tpu_topology}:{shape}")
    if platform == "gpu":
        m = re.fullmatch(r"(?:(\d+)x)?(?:(\d+)x)?([a-z0-9]+)", rest)
        if not m or m.group(3) not in gpus:
            raise ValueError(f"--target {spec!r}: unknown GPU; allowed: {allowed}")
        a, b = m.group(1), m.group(2)
        hosts, per_host = (int(a), int(b)) if b else (1, int(a or 1))
        if hosts < 1 or per_host < 1 or per_host > 8:
            raise ValueError(f"--target {spec!r}: GPUs per host must be in 1..8, hosts >= 1")
        return Target(spec, CHIPS[m.group(3)], hosts * per_host, hosts, f"1x{hosts}x{per_host}")
    raise ValueError(f"--target {spec!r}: unknown platform {platform!r}; allowed: {allowed}")


def _tpu_shape(chip: Chip, chips: int, spec: str) -> str:
    dims = 3 if chip.cores_per_chip == 2 else 2
    shape = _TPU_SHAPES[dims].get(chips)
    if shape is None:
        raise ValueError(f"--target {spec!r}: {chips} chips is not a {chip.name} slice shape this "
                         f"tool knows; chips allowed: {sorted(_TPU_SHAPES[dims])}")
    return shape


def gpu_target_config(chip: Chip) -> str:
    """The XLA ``GpuTargetConfig`` text proto describing ``chip`` (for deviceless compile)."""
    major, minor, sms, smem_sm, smem_optin, l2, clock = chip.gpu
    return "\n".join([
        "gpu_device_info {",
        "  threads_per_block_limit: 1024", "  threads_per_warp: 32",
        "  shared_memory_per_block: 49152", f"  shared_memory_per_core: {smem_sm}",
        "  threads_per_core_limit: 2048", f"  core_count: {sms}", "  fpus_per_core: 128",
        "  block_dim_limit_x: 2147483647", "  block_dim_limit_y: 65535", "  block_dim_limit_z: 65535",
        f"  memory_bandwidth: {int(chip.hbm_bw)}", f"  l2_cache_size: {l2}",
        f"  clock_rate_ghz: {clock}", f"  device_memory_size: {int(chip.hbm_bytes)}",
        f"  shared_memory_per_block_optin: {smem_optin}",
        f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
        "  registers_per_core_limit: 65536", "  registers_per_block_limit: 65536",
        "}",
        'platform_name: "CUDA"',
        "dnn_version_info { major: 9 minor: 10 }",
        f'device_description_str: "{chip.device_kind}"',
    ])


def compile_only_devices(target: Target) -> list:
    """Compile-only devices for ``target`` (needs ``jax[tpu]`` / ``jax[cuda13]``: the aot extra)."""
    from jax.experimental import topologies
    try:
        if target.chip.platform == "tpu":
            # Compile-only use needs no exclusive hold on a chip: let several processes
            # (pytest workers, parallel compiles) load libtpu at once.
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
            desc = topologies.get_topology_desc(target.topology, platform="tpu")
        else:
            os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
            desc = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                                target_config=gpu_target_config(target.chip))
    except (RuntimeError, NotImplementedError) as e:
        extra = "jax[tpu]" if target.chip.platform == "tpu" else "jax[cuda13]"
        raise ValueError(f"--target {target.spec!r}: no compile-only devices ({e}); install the "
                         f"aot extra (pip install -e '.[aot]', which brings {extra}) or run "
                         "`make aot-venv`") from e
    devices = list(desc.devices)
    if len(devices) != target.n_devices:
        raise ValueError(f"--target {target.spec!r}: topology {target.topology!r} gave "
                         f"{len(devices)} devices, expected {target.n_devices}")
    return devices


def describe(target: Target) -> dict:
    """The target and its per-device figures, for the JSON report."""
    d = target.per_device
    return {"target": target.spec, "chip": target.chip.name, "devices": target.n_devices,
            "hosts": target.hosts, "topology": target.topology,
            "peak_tflops_bf16": d("peak_flops") / 1e12, "hbm_gb": d("hbm_bytes") / GB,
            "hbm_gbps": d("hbm_bw") / GB, "link_gbps_bidirectional": d("link_bw") / GB}
