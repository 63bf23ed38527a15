"""Training's sharding: the inference mesh and partition rules, with the trainable parameters and the
optimizer state also split over the data axis (FSDP).

Under a mesh (`jax.set_mesh`, as `VL2Model.mesh_context()` sets it), each trainable leaf keeps its
inference spec (`sharding.param_logical_axes`; LoRA adapters, which have no rule, start replicated) and
`sharding.with_data_axis` adds the data axis on its largest dimension that is still unsplit and divides
by it. The optimizer state's leaves that mirror a trainable leaf (Adam's moments: same path, same
shape) take its spec; the rest (step counts) stay replicated. The frozen weights keep the inference
layout. The step constrains the gradient, the new parameters and the new optimizer state to these
specs, so XLA reduce-scatters the gradient over data and gathers a weight where the forward reads it.
Without a mesh, or with data = 1, nothing changes.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from vl2_jax.sharding import Layout, param_logical_axes, with_data_axis
from vl2_jax.training import lora


def _mesh():
    """The abstract mesh in use, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def trainable_specs(trainable: dict, mesh) -> dict[str, PartitionSpec]:
    """{path: leaf with .shape} -> {path: PartitionSpec}: the inference spec plus the data axis."""
    layout, data = Layout(mesh), mesh.shape.get("data", 1)

    def spec(path, leaf):
        base = PartitionSpec() if lora.is_adapter(path) else layout.spec(
            param_logical_axes(path, len(leaf.shape)), leaf.shape, path)
        return with_data_axis(base, leaf.shape, data)

    return {path: spec(path, leaf) for path, leaf in trainable.items()}


def opt_state_specs(opt_state, trainable: dict, specs: dict[str, PartitionSpec]):
    """A tree like `opt_state` of PartitionSpecs: a leaf under the key of a trainable leaf of the same
    shape takes that leaf's spec; every other leaf is replicated."""

    def spec(path, leaf):
        key = getattr(path[-1], "key", None) if path else None
        if key in specs and getattr(leaf, "shape", None) == trainable[key].shape:
            return specs[key]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, opt_state)


def _apply(trainable: dict, opt_state, like: dict, mesh, put):
    """`put(leaf, spec)` over the trainable leaves and the optimizer state, with the FSDP specs of `like`."""
    specs = trainable_specs(like, mesh)
    trainable = {k: put(v, specs[k]) for k, v in trainable.items()}
    if opt_state is not None:
        opt_state = jax.tree.map(put, opt_state, opt_state_specs(opt_state, like, specs))
    return trainable, opt_state


def constrain(trainable: dict, opt_state, like: dict | None = None):
    """(trainable, opt_state) constrained to the FSDP specs under the current mesh (in a jitted step);
    `like`: the trainable leaves whose paths and shapes the specs come from (default: `trainable`,
    which may also be a gradient). Unchanged without a mesh."""
    mesh = _mesh()
    if mesh is None:
        return trainable, opt_state
    return _apply(trainable, opt_state, trainable if like is None else like, mesh, jax.lax.with_sharding_constraint)


def place(trainable: dict, opt_state):
    """(trainable, opt_state) moved to their FSDP shardings on the concrete mesh in use (`jax.set_mesh`);
    unchanged without one."""
    mesh = jax.sharding.get_mesh()
    if mesh is None or mesh.empty:
        return trainable, opt_state
    return _apply(trainable, opt_state, trainable, mesh, lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)))


def commit(tree):
    """`tree` with every leaf committed to where it is (one device), or replicated over the concrete mesh
    in use: a jitted step's outputs are committed, and a first call with leaves that were not (new
    adapters, the step count, random weights) beside ones that were (a checkpoint's) compiled the step a
    second time at the next call."""
    mesh = jax.sharding.get_mesh()
    on_mesh = mesh is not None and not mesh.empty

    def put(leaf):
        if not isinstance(leaf, jax.Array) or leaf.committed:
            return leaf
        return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec()) if on_mesh else leaf.sharding)

    return jax.tree.map(put, tree)
