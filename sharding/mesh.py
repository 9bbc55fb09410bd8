"""Device meshes with named axes, and multi-host start-up.

Axes, outermost first:
  data      data parallelism across slices / hosts (replicas; gradients all-reduced; over DCN)
  fsdp      fully-sharded data parallelism (parameters, gradients and optimizer state sharded,
            all-gathered one layer at a time)
  sequence  context parallelism: activations split along the sequence (long sequences); parameters
            are sharded over it too, like fsdp
  tensor    tensor (model) parallelism: heads, MLP and vocab split; innermost, so it maps to the
            fastest links (neighbouring chips on a TPU torus, NVLink within a GPU node)

A spec names sizes: "fsdp=-1,tensor=4" (-1 fills the rest; missing axes are 1). Devices are
`jax.devices()` (TPU, GPU or CPU; every process's devices in a multi-host job) or a TPU topology
described by libtpu on a machine without one (sharding/topology.py), so the same code compiles for a
pod it is not running on.
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from sharding import topology

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "sequence", "tensor")


def parse_spec(spec: str | dict | None) -> dict[str, int]:
    """`"fsdp=-1,tensor=4"` -> {"fsdp": -1, "tensor": 4}; -1 fills the rest."""
    if spec is None or spec == "":
        return {"fsdp": -1}
    if isinstance(spec, dict):
        items = spec.items()
    else:
        items = []
        for part in spec.split(","):
            if "=" not in part:
                raise ValueError(f"mesh spec {spec!r}: expected axis=size pairs such as 'fsdp=-1,tensor=4'")
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    out = {}
    for k, v in items:
        if k not in AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {k!r}; axes are {', '.join(AXES)}")
        try:
            out[k] = int(v)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {k!r} must be an integer, got {v!r}") from None
        if out[k] == 0 or out[k] < -1:
            raise ValueError(f"mesh spec {spec!r}: size of {k!r} must be positive or -1, got {out[k]}")
    return out


def axis_sizes(spec: str | dict | None, num_devices: int) -> dict[str, int]:
    """All four axis sizes for `num_devices` devices, -1 resolved; errors say what does not divide."""
    sizes = parse_spec(spec)
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(f"mesh spec {spec!r}: {num_devices} devices are not divisible by {fixed} "
                             f"(the product of the fixed axis sizes)")
        sizes[fill[0]] = num_devices // fixed
    out = {a: sizes.get(a, 1) for a in AXES}
    if math.prod(out.values()) != num_devices:
        raise ValueError(f"mesh spec {spec!r} needs {math.prod(out.values())} devices, there are {num_devices}")
    return out


def _num_slices(devices) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def _device_grid(shape: tuple[int, ...], devices: list):
    """Devices arranged as `shape` (in AXES order). TPUs: by physical position, so the inner axes
    (tensor, then sequence/fsdp) ride the fastest ICI links and, across slices, `data` spans the DCN.
    Everything else (CPU, GPU, multi-process): in `jax.devices()` order, which is process-major, so
    outer axes cross hosts and `tensor` stays within one."""
    if devices[0].platform == "tpu" and len(devices) > 1:
        slices = _num_slices(devices)
        try:
            if slices > 1:
                if shape[0] % slices:
                    raise ValueError(f"mesh {dict(zip(AXES, shape))}: {slices} slices need the 'data' axis to be "
                                     f"a multiple of {slices} (slices talk over the data-center network)")
                ici = (shape[0] // slices, *shape[1:])
                dcn = (slices, *(1,) * (len(shape) - 1))
                return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (AssertionError, NotImplementedError) as e:  # unusual shapes: fall back to plain order
            log.debug("physical mesh layout unavailable (%s); using device order", e)
    return np.asarray(devices, dtype=object).reshape(shape)


def make_mesh(spec: str | dict | None = None, devices=None) -> Mesh:
    """A Mesh with axes AXES from a spec such as "fsdp=-1,tensor=4" over `devices`: default all of
    `jax.devices()`; a list of devices; or a TPU topology name ("v6e-16", "2xv6e-256", "v5p-128"),
    whose compile-only devices libtpu describes on any machine (sharding/topology.py)."""
    if isinstance(devices, str):
        devices = topology.parse(devices).devices()
    devices = list(jax.devices() if devices is None else devices)
    sizes = axis_sizes(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    return Mesh(_device_grid(shape, devices), AXES)


def abstract_mesh(spec: str | dict | None, num_devices: int):
    """A device-less mesh of the same shape (for analytic shard sizes where no devices exist, e.g. GPUs)."""
    sizes = axis_sizes(spec, num_devices)
    return jax.sharding.AbstractMesh(tuple(sizes[a] for a in AXES), AXES)


def auto_axes(mesh: Mesh) -> Mesh:
    """The same mesh with every axis of type Auto. `jax.make_mesh` makes Explicit axes by default, under
    which each gather and dot must be told its output sharding; the model places arrays by the rules table
    and sharding constraints instead, so meshes are converted here, where they enter (load, init, Model)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def single_device_mesh() -> Mesh:
    return make_mesh({}, devices=jax.devices()[:1])


def describe(mesh) -> str:
    used = {a: n for a, n in mesh.shape.items() if n > 1} or {"fsdp": 1}
    return " × ".join(f"{a}={n}" for a, n in used.items())
