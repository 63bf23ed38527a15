"""Device meshes and partition rules.

Mesh axes (names fixed, sizes chosen by the user or by `auto_mesh_shape`):
    data    splits the batch (independent conversations)
    expert  splits the routed experts of every MoE layer
    tensor  splits attention heads, MLP width and the vocabulary

The model code names *logical* axes; `LOGICAL_TO_MESH` maps them to mesh axes. Parameters get their
logical axes from `PARAM_RULES`, ordered regular expressions over the parameter path
(`language/layers_3/attn/q_w`); the first match wins and an unmatched parameter is an error. Where a
dimension does not divide by its mesh axis (deepseek-vl2-tiny has 10 heads: on tensor=4 they cannot be
split), that dimension is replicated instead and the choice is recorded in `Layout.notes`; the other
dimensions stay split. The vision tower and projector (~0.4B parameters) are replicated. Quantized
weights' values and scales (`vl2_jax.quant`) follow their weight's rule (`param_logical_axes`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vl2_jax.config import VL2Config
from vl2_jax.errors import ConfigError
from vl2_jax.quant import SCALES, VALUES, quantized_axes

MESH_AXES = ("data", "expert", "tensor")

LOGICAL_TO_MESH = {
    "batch": "data",
    "experts": "expert",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}

# (regex over the parameter path, logical axes by rank). An empty tuple means replicated.
PARAM_RULES: tuple[tuple[str, dict[int, tuple]], ...] = (
    (r"^(vision|projector)/", {1: (None,), 2: (None, None), 3: (None,) * 3, 4: (None,) * 4}),
    (r"^(image_newline|view_separator)$", {1: (None,)}),
    (r"^language/embed$", {2: ("vocab", None)}),
    (r"^language/lm_head$", {2: (None, "vocab")}),
    (r"/scale$", {1: (None,)}),  # every RMSNorm
    (r"/attn/(q_w|q_b_w)$", {3: (None, "heads", None)}),
    (r"/attn/kv_w$", {4: (None, None, "kv_heads", None)}),
    (r"/attn/(wk_b|wv_b|o_w)$", {3: ("heads", None, None)}),
    (r"/attn/(q_a_w|kv_a_w)$", {2: (None, None)}),
    (r"/mlp/router_w$", {2: (None, None)}),
    (r"/mlp/router_bias$", {1: (None,)}),
    (r"/mlp/(shared/)?gate_up_w$", {3: (None, None, "mlp"), 4: ("experts", None, None, "mlp")}),
    (r"/mlp/(shared/)?down_w$", {2: ("mlp", None), 3: ("experts", "mlp", None)}),
)

# KV cache leaves by name: MHA caches per-head keys and values; MLA's latent is shared by all heads.
CACHE_RULES = {
    "k": ("batch", None, "kv_heads", None),
    "v": ("batch", None, "kv_heads", None),
    "latent": ("batch", None, None),
    "k_rope": ("batch", None, None),
}


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """"data=2,expert=4" -> {"data": 2, "expert": 4, "tensor": 1}; raises ConfigError on a bad spec."""
    sizes, named = dict.fromkeys(MESH_AXES, 1), set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name in named:
            raise ConfigError(f"bad mesh spec {spec!r}: axis {name} is given twice; name each axis once.")
        named.add(name)
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ConfigError(
                f"bad mesh spec {spec!r}: expected comma-separated AXIS=SIZE with AXIS in {', '.join(MESH_AXES)} "
                "and SIZE >= 1 (e.g. expert=4,tensor=2), or 'auto'."
            )
        sizes[name] = int(value)
    return sizes


def auto_mesh_shape(cfg: VL2Config, num_devices: int) -> dict[str, int]:
    """All devices, laid out for one model: experts first (the bulk of the weights), then tensor."""
    lc = cfg.language
    experts = lc.n_routed_experts or 1
    expert = max(d for d in range(1, num_devices + 1) if num_devices % d == 0 and experts % d == 0)
    return {"data": 1, "expert": expert, "tensor": num_devices // expert}


def make_mesh(spec: str | dict | Mesh | None, cfg: VL2Config, devices: Sequence | None = None) -> Mesh | None:
    """A mesh over `devices` (default: all) from "auto", "data=..,expert=..,tensor=..", a dict or a Mesh."""
    if spec is None or isinstance(spec, Mesh):
        return spec
    devices = list(jax.devices() if devices is None else devices)
    sizes = auto_mesh_shape(cfg, len(devices)) if spec == "auto" else (
        parse_mesh_spec(spec) if isinstance(spec, str) else {**dict.fromkeys(MESH_AXES, 1), **spec}
    )
    total = math.prod(sizes.values())
    if total != len(devices):
        shape = ",".join(f"{k}={v}" for k, v in sizes.items())
        raise ConfigError(f"mesh {shape} needs {total} devices but {len(devices)} are visible; make the sizes multiply to {len(devices)}.")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass
class Layout:
    """Resolves logical axes to PartitionSpecs on one mesh, replicating dimensions that do not divide."""

    mesh: Mesh
    # (logical name, size, mesh axis, axis size) -> what was replicated for it
    replicated: dict = dataclasses.field(default_factory=dict)

    @property
    def notes(self) -> set[str]:
        """One note per replicated dimension: "WHAT: NAME (SIZE) does not divide by AXIS=N; replicated"."""
        return {f"{what}: {name} ({size}) does not divide by {axis}={n}; replicated"
                for (name, size, axis, n), whats in self.replicated.items() for what in whats}

    def summary(self, most: int = 6) -> list[str]:
        """The replication notes grouped by cause, one line each, with the layers' paths folded
        (layers_0, layers_1, ... -> layers_*): what the command lines print under a mesh."""
        lines = []
        for (name, size, axis, n), whats in sorted(self.replicated.items()):
            paths = sorted({re.sub(r"layers_\d+", "layers_*", w) for w in whats})
            more = f" and {len(paths) - most} more" if len(paths) > most else ""
            lines.append(f"{name} ({size}) does not divide by {axis}={n}, so these stay whole on every device: "
                         f"{', '.join(paths[:most])}{more}")
        return lines

    def spec(self, logical: Sequence[str | None], shape: Sequence[int], what: str = "") -> PartitionSpec:
        axes = []
        for name, size in zip(logical, shape, strict=True):
            axis = LOGICAL_TO_MESH.get(name) if name else None
            n = self.mesh.shape[axis] if axis else 1
            if axis and size % n:
                self.replicated.setdefault((name, size, axis, n), set()).add(what or name)
                axis = None
            axes.append(axis if n > 1 else None)
        return PartitionSpec(*axes)

    def sharding(self, logical, shape, what: str = "") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape, what))

    def param_specs(self, shapes: dict) -> dict:
        """A tree like `shapes` (leaves with `.shape`, e.g. ShapeDtypeStructs) of PartitionSpecs."""
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: self.spec(param_logical_axes(_path_str(path), leaf.ndim), leaf.shape,
                                         _path_str(path)), shapes)

    def param_shardings(self, shapes: dict) -> dict:
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.param_specs(shapes))

    def cache_specs(self, cache) -> object:
        """PartitionSpecs for a KVCache (same tree structure)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: self.spec(CACHE_RULES[_leaf_name(path)], leaf.shape, "cache " + _leaf_name(path)),
            cache)


def with_data_axis(spec: PartitionSpec, shape: Sequence[int], data: int) -> PartitionSpec:
    """`spec` with the data axis (of size `data`) added on the largest dimension that it leaves unsplit
    and that divides by `data` (the first of equal ones), for training's FSDP: [D, V] split (None,
    "tensor") becomes ("data", "tensor"). Unchanged where data is 1, the spec already uses it, or no
    dimension divides."""
    axes = list(spec) + [None] * (len(shape) - len(spec))
    if data <= 1 or "data" in axes:
        return spec
    free = [i for i, a in enumerate(axes) if a is None and shape[i] % data == 0]
    if not free:
        return spec
    axes[max(free, key=lambda i: (shape[i], -i))] = "data"
    return PartitionSpec(*axes)


def param_logical_axes(path: str, ndim: int) -> tuple:
    """Logical axes of the parameter at `path` (e.g. "language/layers_1/mlp/gate_up_w"): first rule wins.

    A quantized weight's values (`.../gate_up_w/qvalue`, `vl2_jax.quant`) take the weight's axes, its
    scales (`.../gate_up_w/scale`) the same but unsplit on the contracted dimensions, where they are 1.
    """
    path = path.removeprefix("params/")
    weight, _, leaf = path.rpartition("/")
    contracted = quantized_axes(weight, ndim, lm_head=True) if leaf in (VALUES, SCALES) else None
    if contracted is not None:
        axes = param_logical_axes(weight, ndim)
        return axes if leaf == VALUES else tuple(None if i in contracted else a for i, a in enumerate(axes))
    for pattern, by_rank in PARAM_RULES:
        if re.search(pattern, path):
            if ndim not in by_rank:
                raise ConfigError(f"partition rule {pattern!r} has no spec for the rank-{ndim} parameter {path}.")
            return by_rank[ndim]
    raise ConfigError(f"no partition rule matches the parameter {path}; add one to vl2_jax/sharding.")


def _path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path[-1:], simple=True)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pins an activation's sharding at a block boundary when a mesh is set (`jax.set_mesh`); else a no-op.

    Dimensions that do not divide by their mesh axis stay replicated (e.g. a batch of 1 on data=2).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, Layout(mesh).spec(logical, x.shape))


def place(host: np.ndarray, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    """A host array onto its devices (the default device where `sharding` is None), waited for: the
    host copy may go only once the devices hold it. `jax.device_put` where this process holds every
    device of the sharding; `make_array_from_callback` where other processes hold some of them (each
    fills its own)."""
    if sharding is None or sharding.is_fully_addressable:
        array = jax.device_put(host, sharding)
    else:  # each addressable device gets its slice; other processes' devices are theirs to fill
        array = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return array.block_until_ready()
