"""Hardware the planner and the ahead-of-time compiler know: TPU slices (devices from libtpu's topology
description, usable on a machine without a TPU) and GPU nodes (HBM capacity for the analytic plan).

    t = topology.parse("v6e-16")            # or "2xv6e-256", "v5p-128", "h100x8", "v6e:4x4"
    t.chips, t.hbm_bytes, t.kind           # 16, 33550237696, "tpu"
    devices = t.devices()                  # 16 compile-only TPU devices (libtpu, no TPU needed)

Naming follows Cloud TPU: v6e-N and v5e-N count chips; v5p-N and v4-N count TensorCores (2 per chip,
so v5p-8 is 4 chips). A multi-slice job is `KxNAME` (slices joined over the data-center network).
GPU nodes are `h100xN`, `h200xN`, `a100xN` (N GPUs, 8 per node).

FAMILIES is the one table of per-chip HBM and peak FLOP/s; `peak_flops(device.device_kind)` looks a
running chip up in it (MFU).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

from jax._src import hardware_utils
from jax.experimental import topologies


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "tpu" | "gpu"
    hbm_bytes: int  # usable device memory per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s
    sizes: tuple[int, ...]  # valid slice sizes, in the family's naming unit
    cores_per_chip: int = 1  # the naming unit: v5p-8 counts TensorCores (2 per chip)
    chips_per_host: int = 4
    device_kind: str = ""  # what jax reports as device.device_kind for this chip
    device_kinds: tuple[str, ...] = ()  # device_kind prefixes of this family (runtime lookups)
    source: str = ""

    def chips(self, size: int) -> int:
        return size // self.cores_per_chip


GiB = 1 << 30

# The one table of per-chip HBM and dense bf16 peak FLOP/s (the planner, MFU in train/, bench/).
# HBM per chip. TPU v6e: the bytes_limit its runtime reports (memory_stats, 31.25 GiB of 32 GB);
# the others: nominal capacities from the Cloud TPU / NVIDIA spec sheets (nvidia-smi MiB for GPUs).
# device_kinds: v5p reports "TPU v5" and v5e "TPU v5 lite" (older runtimes: "TPU v5p" / "TPU v5e"); the
# longest matching prefix wins, so "TPU v5 lite" is never taken for a v5p.
FAMILIES: dict[str, Family] = {
    "v6e": Family("v6e", "tpu", 33_550_237_696, 918e12, 1.64e12, (1, 4, 8, 16, 32, 64, 128, 256),
                  device_kind="TPU v6 lite", device_kinds=("TPU v6",), source="memory_stats() bytes_limit on v6e"),
    "v5e": Family("v5e", "tpu", 16 * GiB, 197e12, 0.82e12, (1, 4, 8, 16, 32, 64, 128, 256),
                  device_kind="TPU v5 lite", device_kinds=("TPU v5 lite", "TPU v5e"),
                  source="Cloud TPU v5e spec, 16 GiB"),
    "v5p": Family("v5p", "tpu", 95 * GiB, 459e12, 2.77e12,
                  (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
                  cores_per_chip=2, device_kind="TPU v5", device_kinds=("TPU v5", "TPU v5p"),
                  source="Cloud TPU v5p spec, 95 GiB"),
    "v4": Family("v4", "tpu", 32 * GiB, 275e12, 1.2e12, (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
                 cores_per_chip=2, device_kind="TPU v4", device_kinds=("TPU v4",), source="Cloud TPU v4 spec, 32 GiB"),
    "h100": Family("h100", "gpu", 81_559 << 20, 989e12, 3.35e12, (1, 2, 4, 8, 16, 32, 64, 128, 256),
                   chips_per_host=8, device_kind="NVIDIA H100 80GB HBM3", device_kinds=("NVIDIA H100",),
                   source="nvidia-smi: 81559 MiB"),
    "h200": Family("h200", "gpu", 143_771 << 20, 989e12, 4.8e12, (1, 2, 4, 8, 16, 32, 64, 128, 256),
                   chips_per_host=8, device_kind="NVIDIA H200", device_kinds=("NVIDIA H200",),
                   source="nvidia-smi: 143771 MiB"),
    "a100": Family("a100", "gpu", 81_920 << 20, 312e12, 2.0e12, (1, 2, 4, 8, 16, 32, 64, 128, 256),
                   chips_per_host=8, device_kind="NVIDIA A100-SXM4-80GB", device_kinds=("NVIDIA A100",),
                   source="nvidia-smi: 81920 MiB"),
}


def family_of(device_kind: str) -> Family | None:
    """The family of a runtime device (jax `device.device_kind`) by the longest matching prefix; None
    for CPUs and chips not in the table."""
    best = None
    for fam in FAMILIES.values():
        for prefix in fam.device_kinds:
            if device_kind.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
                best = (prefix, fam)
    return best[1] if best else None


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s per chip of a runtime device (None when unknown)."""
    fam = family_of(device_kind)
    return fam.peak_flops if fam else None


def _tpu_shape(family: str, chips: int) -> tuple[int, ...]:
    """Physical chip grid of a single slice (the libtpu topology name's dimensions)."""
    if family in ("v6e", "v5e"):  # 2D torus
        return {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
                256: (16, 16)}[chips]
    # v5p / v4: 3D; the common shapes of Cloud TPU's table (cubes of 4 at 64 chips and above)
    dims, n, i = [1, 1, 1], chips, 0
    while n > 1:  # powers of two: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...
        dims[i % 3] *= 2
        n //= 2
        i += 1
    big = sorted(d for d in dims if d > 1)
    return tuple(big + [1] * (3 - len(big)))


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # canonical, e.g. "v6e-16", "2xv6e-256", "h100x8"
    family: Family
    chips: int  # total, over all slices
    num_slices: int = 1

    @property
    def kind(self) -> str:
        return self.family.kind

    @property
    def hbm_bytes(self) -> int:
        return self.family.hbm_bytes

    @property
    def chips_per_slice(self) -> int:
        return self.chips // self.num_slices

    @property
    def shape(self) -> tuple[int, ...]:
        """Chip grid of one slice (TPU), or (nodes, gpus per node) for GPUs."""
        if self.kind == "gpu":
            per = min(self.chips, self.family.chips_per_host)
            return (self.chips // per, per)
        return _tpu_shape(self.family.name, self.chips_per_slice)

    @property
    def libtpu_name(self) -> str:
        return f"{self.family.name}:{'x'.join(map(str, self.shape))}"

    @property
    def hosts(self) -> int:
        return max(1, self.chips // self.family.chips_per_host)

    def devices(self) -> list:
        """Compile-only devices for this topology (TPU via libtpu; works on a machine without a TPU)."""
        if self.kind != "tpu":
            raise ValueError(f"{self.name}: ahead-of-time compilation needs a TPU topology; GPU nodes "
                             f"({self.name}) get the analytic plan only (compile on the GPU machine itself)")
        return list(_tpu_devices(self.family.name, self.shape, self.num_slices))

    def describe(self) -> str:
        where = f"{self.num_slices} slices of {self.chips_per_slice} chips" if self.num_slices > 1 else \
            f"{self.chips} chips ({'x'.join(map(str, self.shape))})"
        return f"{self.name}: {where}, {self.hbm_bytes / GiB:.2f} GiB HBM per chip"


def valid_names() -> list[str]:
    out = []
    for fam in FAMILIES.values():
        sep = "x" if fam.kind == "gpu" else "-"
        out.extend(f"{fam.name}{sep}{s}" for s in fam.sizes)
    return out


def names_hint() -> str:
    parts = []
    for fam in FAMILIES.values():
        sep = "x" if fam.kind == "gpu" else "-"
        parts.append(f"{fam.name}{sep}{{{','.join(map(str, fam.sizes))}}}")
    return "; ".join(parts) + "; multi-slice TPU: <k>x<slice>, e.g. 2xv6e-256"


_NAME = re.compile(r"^(?:(\d+)x)?(v\d+[a-z]?)[-:](\S+)$")
_GPU = re.compile(r"^(h100|h200|a100)(?:x|-)(\d+)$")


def parse(name: str) -> Topology:
    """"v6e-16", "2xv6e-256", "v5p-128", "v6e:4x4" (libtpu spelling), "h100x8" -> Topology."""
    raw = name
    name = name.strip().lower().replace("v5litepod", "v5e")
    m = _GPU.match(name)
    if m:
        fam, n = FAMILIES[m.group(1)], int(m.group(2))
        if n not in fam.sizes:
            raise ValueError(f"unknown topology {raw!r}: {fam.name} nodes come as {fam.name}x"
                             f"{{{','.join(map(str, fam.sizes))}}}")
        return Topology(f"{fam.name}x{n}", fam, n)
    m = _NAME.match(name)
    if m and m.group(2) in FAMILIES and FAMILIES[m.group(2)].kind == "tpu":
        fam = FAMILIES[m.group(2)]
        slices = int(m.group(1) or 1)
        size_s = m.group(3)
        if "x" in size_s:  # libtpu spelling: v6e:4x4
            try:
                chips = math.prod(int(d) for d in size_s.split("x"))
            except ValueError:
                chips = -1
            size = chips * fam.cores_per_chip
        else:
            size = int(size_s) if size_s.isdigit() else -1
        if size in fam.sizes and slices >= 1:
            base = f"{fam.name}-{size}"
            return Topology(base if slices == 1 else f"{slices}x{base}", fam, fam.chips(size) * slices, slices)
    raise ValueError(f"unknown topology {raw!r}; valid names: {names_hint()}")


@functools.lru_cache(maxsize=None)
def _tpu_devices(family: str, shape: tuple[int, ...], num_slices: int) -> tuple:
    # Compile-only use of libtpu next to other processes that may hold it (nothing here touches a chip).
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        # No TPU here: tell libtpu not to look for a TPU VM's metadata (it would log errors), and let it
        # load beside other processes that hold it for the same compile-only purpose.
        for k, v in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                     ("TPU_ACCELERATOR_TYPE", f"{family}-{math.prod(shape)}"), ("TPU_WORKER_HOSTNAMES", "localhost")):
            os.environ.setdefault(k, v)

    grid = shape if len(shape) == 3 else (*shape, 1)
    per_host = tuple(min(g, b) for g, b in zip(grid, (2, 2, 1)))
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{family}:{'x'.join(map(str, shape))}", chip_config_name="default",
            chips_per_host_bounds=per_host, num_slices=num_slices)
    except Exception as e:  # libtpu missing or too old: say what to install
        raise RuntimeError(f"cannot describe TPU topology {family}:{'x'.join(map(str, shape))} "
                           f"(x{num_slices} slices) with libtpu: {e}. Install the TPU extra: "
                           f"pip install -e '.[tpu]'") from None
    return tuple(desc.devices)
