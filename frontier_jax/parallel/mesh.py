"""The device mesh, built from `MeshConfig` with `jax.make_mesh`, and the shardings of the
model's state derived from its logical axis names."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from frontier_jax.parallel.config import MeshConfig
from frontier_jax.parallel.rules import DEFAULT_RULES, MESH_AXES, logical_to_spec


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with `data=-1` resolved; the product must equal `num_devices`."""
    sizes = {axis: getattr(cfg, axis) for axis in MESH_AXES}
    others = math.prod(v for k, v in sizes.items() if k != "data")
    if sizes["data"] == -1:
        if num_devices % others:
            raise ValueError(
                f"mesh: stage*fsdp*expert*tensor = {others} does not divide the "
                f"{num_devices} devices; change the mesh.* sizes"
            )
        sizes["data"] = num_devices // others
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())}, but there "
            f"are {num_devices} devices; make the product equal the device count"
        )
    return sizes


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh over `devices` (default: all).  With DCN factors, devices are arranged so that
    each axis's DCN part spans slices (or processes)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(cfg, len(devices))
    dcn = [getattr(cfg.dcn, axis) for axis in sizes]
    axis_types = (AxisType.Auto,) * len(sizes)
    if math.prod(dcn) == 1:
        return jax.make_mesh(tuple(sizes.values()), tuple(sizes), devices=devices, axis_types=axis_types)
    ici = [size // factor for size, factor in zip(sizes.values(), dcn)]
    # DCN units are slices where devices report as many slices as DCN asks for, else processes
    # (e.g. GPU hosts, or CPU processes under jax.distributed, all of which report slice 0).
    slices = {getattr(d, "slice_index", None) for d in devices}
    grid = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=len(slices) != math.prod(dcn)
    )
    return Mesh(grid, tuple(sizes), axis_types=axis_types)


def check_batch_fits(
    global_batch: int,
    mesh: Mesh,
    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES,
    *,
    field: str = "train.global_batch",
) -> None:
    """The batch dimension is split over the mesh axes the `batch` rule names; their product
    must divide the global batch (the config field `field`)."""
    _check_split(global_batch, "batch", mesh, rules, field)


def check_seq_fits(
    seq_len: int,
    mesh: Mesh,
    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES,
    *,
    field: str = "train.seq_len",
) -> None:
    """The sequence dimension is split over the mesh axes the `seq` rule names (none in the
    shipped tables); their product must divide the sequence length (the config field `field`)."""
    _check_split(seq_len, "seq", mesh, rules, field)


def _check_split(size: int, logical: str, mesh: Mesh, rules: Mapping[str, Sequence[str]], field: str) -> None:
    axes = [a for a in rules[logical] if a in mesh.shape]
    ways = math.prod(mesh.shape[a] for a in axes)
    if size % ways:
        raise ValueError(
            f"{field}={size} is not divisible by the {ways}-way {logical} split over mesh axes "
            f"{axes} ({dict(mesh.shape)}); use a multiple of {ways} or change mesh.*"
        )


def check_divisible(state: nnx.State, mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> None:
    """Every parameter dimension must split evenly over the mesh axes its logical name maps
    to; raises naming the parameter, the logical axis, the dimension and the sizes."""
    for path, var in jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    ):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            continue
        for name, dim, mesh_axes in zip(axes, var.shape, logical_to_spec(axes, rules)):
            mesh_axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
            ways = math.prod(mesh.shape[a] for a in mesh_axes)
            if dim % ways:
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path)}: its {name!r} dimension ({dim}) does not split "
                    f"over mesh axes {list(mesh_axes)} of sizes {[mesh.shape[a] for a in mesh_axes]} "
                    f"({ways}-way); change mesh.{mesh_axes[0]} or the model size"
                )


def batch_sharding(mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of input arrays [batch, seq, ...] or [batch, ...] (an objective's per-row
    figures): the leading axis by the `batch` rule, the second by the `seq` rule where that
    splits it (the arrays then need rank >= 2)."""
    batch, seq = logical_to_spec(("batch", "seq"), rules)
    return NamedSharding(mesh, PartitionSpec(batch) if seq is None else PartitionSpec(batch, seq))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES):
    """Pure-dict pytree of NamedShardings for an nnx State whose variables carry `logical_axes`."""

    def sharding(var):
        axes = var.get_metadata().get("logical_axes")
        spec = PartitionSpec() if axes is None else logical_to_spec(axes, rules)
        return NamedSharding(mesh, spec)

    shardings = jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings
