"""Hugging Face safetensors checkpoint -> our parameter tree.

`conversion_plan(cfg)` lists every rule: which PyTorch tensors (`[out, in]` layout) make which of our
parameters (einsum-natural layout) and how. It is the only place that knows both layouts, and it serves
both `load_hf` (load into memory) and `python -m convert` (stream to Orbax). Accounts are strict: every
source tensor is used exactly once, except `vision.attn_pool.*` (the unused SigLIP pooling head), which
is dropped and reported; every target must come out with its expected shape.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vl2_jax.config import VL2Config, dtype_of
from vl2_jax.errors import CheckpointError, some

UNUSED_PREFIXES = ("vision.attn_pool.",)
_FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")  # safetensors' names of the dtypes a weight may have
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}  # safetensors' name -> ours

Path_ = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """`build(*source arrays) -> target arrays`.

    `sources` are (checkpoint name, PyTorch shape); `targets` are (our path, our shape), one per output.
    """

    sources: tuple[tuple[str, tuple[int, ...]], ...]
    targets: tuple[tuple[Path_, tuple[int, ...]], ...]
    build: Callable[..., Sequence[np.ndarray]]

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.sources)


def _t(w):  # [out, in] -> [in, out]
    return w.T


def _one(src: str, dst: Path_, shape, fn=lambda w: w, src_shape=None) -> Rule:
    """One tensor to one parameter. `src_shape` defaults to the flattened target ([out, in] for `_t`)."""
    if src_shape is None:
        n = int(np.prod(shape))
        src_shape = (n,) if len(shape) == 1 else (n // shape[0], shape[0]) if fn is _t else shape
    return Rule(((src, tuple(src_shape)),), ((dst, tuple(shape)),), lambda w: (fn(w).reshape(shape),))


def _vision_rules(cfg: VL2Config) -> Iterator[Rule]:
    v = cfg.vision
    c, p, h, k, f = v.width, v.patch_size, v.heads, v.head_dim, v.mlp_dim
    yield _one("vision.patch_embed.proj.weight", ("vision", "patch_w"), (3, p, p, c), lambda w: w.transpose(1, 2, 3, 0), (c, 3, p, p))
    yield _one("vision.patch_embed.proj.bias", ("vision", "patch_b"), (c,))
    yield _one("vision.pos_embed", ("vision", "pos_embed"), (v.num_patches, c), src_shape=(1, v.num_patches, c))
    for i in range(v.layers):
        s, d = f"vision.blocks.{i}.", ("vision", f"block_{i}")
        for norm in ("norm1", "norm2"):
            yield _one(s + norm + ".weight", d + (norm, "scale"), (c,))
            yield _one(s + norm + ".bias", d + (norm, "bias"), (c,))
        # qkv rows are (q|k|v, head, head_dim).
        yield _one(s + "attn.qkv.weight", d + ("qkv_w",), (c, 3, h, k), lambda w: w.reshape(3, h, k, c).transpose(3, 0, 1, 2), (3 * h * k, c))
        yield _one(s + "attn.qkv.bias", d + ("qkv_b",), (3, h, k), src_shape=(3 * h * k,))
        yield _one(s + "attn.proj.weight", d + ("out_w",), (h, k, c), _t, (c, h * k))
        yield _one(s + "attn.proj.bias", d + ("out_b",), (c,))
        yield _one(s + "mlp.fc1.weight", d + ("fc1_w",), (c, f), _t)
        yield _one(s + "mlp.fc1.bias", d + ("fc1_b",), (f,))
        yield _one(s + "mlp.fc2.weight", d + ("fc2_w",), (f, c), _t)
        yield _one(s + "mlp.fc2.bias", d + ("fc2_b",), (c,))
    yield _one("vision.norm.weight", ("vision", "norm", "scale"), (c,))
    yield _one("vision.norm.bias", ("vision", "norm", "bias"), (c,))


def _projector_rules(cfg: VL2Config) -> Iterator[Rule]:
    pr = cfg.projector
    c4, m, d = pr.input_dim * pr.downsample_ratio**2, pr.hidden_dim, pr.n_embed
    yield _one("projector.layers.0.weight", ("projector", "w0"), (c4, m), _t)
    yield _one("projector.layers.0.bias", ("projector", "b0"), (m,))
    yield _one("projector.layers.2.weight", ("projector", "w1"), (m, d), _t)
    yield _one("projector.layers.2.bias", ("projector", "b1"), (d,))
    yield _one("image_newline", ("image_newline",), (d,))
    yield _one("view_seperator", ("view_separator",), (d,))  # sic: the checkpoint's spelling


def _mlp_rules(src: str, dst: Path_, d: int, f: int) -> Iterator[Rule]:
    yield Rule(
        ((src + "gate_proj.weight", (f, d)), (src + "up_proj.weight", (f, d))),
        ((dst + ("gate_up_w",), (d, 2, f)),),
        lambda gate, up: (np.stack([gate.T, up.T], axis=1),),
    )
    yield _one(src + "down_proj.weight", dst + ("down_w",), (f, d), _t)


def _attention_rules(cfg: VL2Config, s: str, d_: Path_) -> Iterator[Rule]:
    lc = cfg.language
    d, h = lc.hidden_size, lc.num_attention_heads
    if not lc.use_mla:
        g, k = lc.num_key_value_heads, lc.head_dim
        yield _one(s + "q_proj.weight", d_ + ("q_w",), (d, h, k), _t)
        yield Rule(
            ((s + "k_proj.weight", (g * k, d)), (s + "v_proj.weight", (g * k, d))),
            ((d_ + ("kv_w",), (d, 2, g, k)),),
            lambda wk, wv: (np.stack([wk.T, wv.T], axis=1).reshape(d, 2, g, k),),
        )
        yield _one(s + "o_proj.weight", d_ + ("o_w",), (h, k, d), _t, (d, h * k))
        return
    r, j, kn, u, kq = lc.kv_lora_rank, lc.qk_rope_head_dim, lc.qk_nope_head_dim, lc.v_head_dim, lc.q_head_dim
    if lc.q_lora_rank is None:
        yield _one(s + "q_proj.weight", d_ + ("q_w",), (d, h, kq), _t)
    else:
        q = lc.q_lora_rank
        yield _one(s + "q_a_proj.weight", d_ + ("q_a_w",), (d, q), _t)
        yield _one(s + "q_a_layernorm.weight", d_ + ("q_a_norm", "scale"), (q,))
        yield _one(s + "q_b_proj.weight", d_ + ("q_b_w",), (q, h, kq), _t)
    yield _one(s + "kv_a_proj_with_mqa.weight", d_ + ("kv_a_w",), (d, r + j), _t)  # rows: latent | rope key
    yield _one(s + "kv_a_layernorm.weight", d_ + ("kv_a_norm", "scale"), (r,))
    yield Rule(
        ((s + "kv_b_proj.weight", (h * (kn + u), r)),),
        ((d_ + ("wk_b",), (h, kn, r)), (d_ + ("wv_b",), (h, u, r))),
        lambda w: (w.reshape(h, kn + u, r)[:, :kn], w.reshape(h, kn + u, r)[:, kn:]),  # per head: nope | v
    )
    yield _one(s + "o_proj.weight", d_ + ("o_w",), (h, u, d), _t, (d, h * u))


def _stack_experts_gate_up(*ws: np.ndarray) -> tuple[np.ndarray]:
    """gate_proj, up_proj of expert 0, of expert 1, ... ([F, D] each) -> [E, D, 2, F], filled in place
    (no per-expert intermediate stacks: the peak is the sources plus the result)."""
    f, d = ws[0].shape
    out = np.empty((len(ws) // 2, d, 2, f), ws[0].dtype)
    for i, w in enumerate(ws):
        out[i // 2, :, i % 2] = w.T
    return (out,)


def _language_rules(cfg: VL2Config) -> Iterator[Rule]:
    lc = cfg.language
    d, v = lc.hidden_size, lc.vocab_size
    yield _one("language.model.embed_tokens.weight", ("language", "embed"), (v, d))
    for i in range(lc.num_hidden_layers):
        s, d_ = f"language.model.layers.{i}.", ("language", f"layers_{i}")
        yield _one(s + "input_layernorm.weight", d_ + ("attn_norm", "scale"), (d,))
        yield _one(s + "post_attention_layernorm.weight", d_ + ("mlp_norm", "scale"), (d,))
        yield from _attention_rules(cfg, s + "self_attn.", d_ + ("attn",))
        m, dm = s + "mlp.", d_ + ("mlp",)
        if not lc.is_moe_layer(i):
            yield from _mlp_rules(m, dm, d, lc.intermediate_size)
            continue
        e, f = lc.n_routed_experts, lc.moe_intermediate_size
        yield _one(m + "gate.weight", dm + ("router_w",), (d, e), _t)
        if lc.topk_method == "noaux_tc":
            yield _one(m + "gate.e_score_correction_bias", dm + ("router_bias",), (e,))
        yield Rule(  # sources: gate_proj and up_proj of expert 0, of expert 1, ...
            tuple((f"{m}experts.{x}.{name}.weight", (f, d)) for x in range(e) for name in ("gate_proj", "up_proj")),
            ((dm + ("gate_up_w",), (e, d, 2, f)),),
            _stack_experts_gate_up,
        )
        yield Rule(
            tuple((f"{m}experts.{x}.down_proj.weight", (d, f)) for x in range(e)),
            ((dm + ("down_w",), (e, f, d)),),
            lambda *ws: (np.stack([w.T for w in ws]),),
        )
        if lc.n_shared_experts:
            yield from _mlp_rules(m + "shared_experts.", dm + ("shared",), d, f * lc.n_shared_experts)
    yield _one("language.model.norm.weight", ("language", "norm", "scale"), (d,))
    yield _one("language.lm_head.weight", ("language", "lm_head"), (d, v), _t)


def conversion_plan(cfg: VL2Config) -> list[Rule]:
    """Every rule, in checkpoint order (vision, projector, language by layer)."""
    return [*_vision_rules(cfg), *_projector_rules(cfg), *_language_rules(cfg)]


def element_map(rule: Rule) -> np.ndarray:
    """Where each target element of `rule` comes from: int [total elements], for every target element
    (targets raveled and concatenated in order) its index into the sources raveled and concatenated.

    Every rule of the plan only moves elements (transposes, reshapes, stacks, splits), so running it on
    the sources' element indices gives this map, and the map is a permutation: `to_hf` inverts it.
    """
    sizes = [int(np.prod(shape)) for _, shape in rule.sources]
    total = sum(sizes)
    index = np.arange(total, dtype=np.int32 if total < 2**31 else np.int64)
    starts = np.cumsum([0, *sizes[:-1]])
    outs = rule.build(*(index[a:a + n].reshape(shape) for a, n, (_, shape) in zip(starts, sizes, rule.sources)))
    flat = np.concatenate([np.asarray(o).reshape(-1) for o in outs])
    seen = np.zeros(total, bool)
    seen[flat] = True
    if flat.shape != (total,) or not seen.all():  # as many elements as the sources, each of them: a permutation
        raise CheckpointError(f"the rule for {', '.join(rule.source_names[:2])} does not only move elements; "
                              f"it cannot be inverted.")
    return flat


def get_path(tree: dict, path: Path_):
    for key in path:
        tree = tree[key]
    return tree


def to_hf(cfg: VL2Config, tree: dict, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Our tree (`{"params": ...}` or its inner dict) of parameters, or of anything laid out like them
    (gradients, optimizer moments) -> {checkpoint name: host array in the PyTorch name's layout}, by
    inverting the conversion plan. `names`: only these tensors (default: every one the plan reads)."""
    inner = tree.get("params", tree)
    wanted = None if names is None else set(names)
    out = {}
    for rule in conversion_plan(cfg):
        if wanted is not None and not wanted & set(rule.source_names):
            continue
        leaves = [np.asarray(get_path(inner, path)) for path, _ in rule.targets]
        flat = np.empty(sum(a.size for a in leaves), leaves[0].dtype)
        flat[element_map(rule)] = np.concatenate([a.reshape(-1) for a in leaves])
        start = 0
        for name, shape in rule.sources:
            n = int(np.prod(shape))
            if wanted is None or name in wanted:
                out[name] = flat[start:start + n].reshape(shape)
            start += n
    if wanted is not None and wanted - set(out):
        raise CheckpointError(f"no rule of the conversion plan reads {some(sorted(wanted - set(out)))}.")
    return out


class SafetensorsFolder:
    """Read-only view of a Hugging Face checkpoint folder's tensors, one tensor at a time.

    Accepts a single `model.safetensors` or shards listed in `model.safetensors.index.json` (shards
    without their index are refused, naming the missing index).
    """

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(map(str, weight_map.values())))
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON or bad structure
                raise CheckpointError(
                    f"{index} is not a valid safetensors index ({type(e).__name__}: {e}); download it again."
                ) from None
        elif single.is_file():
            files = [single.name]
        elif shards := sorted(p.name for p in self.path.glob("model-*-of-*.safetensors")):
            raise CheckpointError(
                f"{self.path} has safetensors shards ({', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''}) "
                "but not model.safetensors.index.json, which says which tensor each one holds; download the "
                "index too."
            )
        else:
            raise CheckpointError(
                f"{self.path} has no weights (neither model.safetensors nor model.safetensors.index.json); "
                "download the checkpoint's weights into it, or pass a `python -m convert` output."
            )
        self._handles = {}
        self.tensor_file: dict[str, str] = {}
        for name in files:
            file = self.path / name
            if not file.is_file():
                raise CheckpointError(f"the shard {file} listed in the index is missing; download it again.")
            try:
                handle = safe_open(str(file), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise CheckpointError(
                    f"cannot read {file} ({e}); the file is truncated or corrupt, so download it again."
                ) from None
            self._handles[name] = handle
            for key in handle.keys():
                self.tensor_file[key] = name

    def names(self) -> list[str]:
        return list(self.tensor_file)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.tensor_file[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self.tensor_file[name]].get_slice(name).get_dtype()

    def get(self, name: str) -> np.ndarray:
        try:
            return self._handles[self.tensor_file[name]].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self.tensor_file[name]}: {e}") from None


def check_accounts(plan: list[Rule], names: list[str], where: str | Path | None = None) -> list[str]:
    """Validates that the plan uses every checkpoint tensor exactly once; returns the dropped names.

    Raises CheckpointError naming the missing and the unexpected tensors.
    """
    wanted = [s for rule in plan for s in rule.source_names]
    have = set(names)
    dropped = sorted(n for n in have if n.startswith(UNUSED_PREFIXES))
    missing = [s for s in wanted if s not in have]
    extra = sorted(have - set(wanted) - set(dropped))
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {some(missing)}")
    if extra:
        problems.append(f"unexpected tensor(s): {some(extra)}")
    if problems:
        raise CheckpointError(
            "checkpoint does not match its config.json: " + "; ".join(problems)
            + f"; download {where or 'the checkpoint'} again, or use the config.json that came with its weights."
        )
    return dropped


def check_source_shapes(plan: list[Rule], folder: SafetensorsFolder) -> None:
    """Fails before reading any data on a tensor whose shape (or non-float dtype) config.json does not imply."""
    for rule in plan:
        for name, shape in rule.sources:
            if folder.shape(name) != shape:
                raise CheckpointError(
                    f"tensor {name} has shape {list(folder.shape(name))} in {folder.path / folder.tensor_file[name]}, "
                    f"but config.json implies {list(shape)}; "
                    "use the config.json that came with these weights."
                )
            if folder.dtype(name) not in _FLOAT_DTYPES:
                raise CheckpointError(
                    f"tensor {name} in {folder.path / folder.tensor_file[name]} has dtype {folder.dtype(name)}, "
                    "not a floating-point type; these are not DeepSeek-VL2 weights, so download the checkpoint again."
                )


def apply_rule(rule: Rule, arrays: Sequence[np.ndarray]) -> list[tuple[Path_, np.ndarray]]:
    """Runs one rule and checks every output's shape."""
    for src, a in zip(rule.source_names, arrays):
        if a.ndim == 0 or not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
            raise CheckpointError(f"tensor {src} has dtype {a.dtype}; expected a floating-point tensor.")
    try:
        outs = rule.build(*arrays)
    except ValueError as e:
        raise CheckpointError(f"wrong shape for {', '.join(rule.source_names[:2])}: {e}") from None
    result = []
    for (path, shape), out in zip(rule.targets, outs):
        if tuple(out.shape) != tuple(shape):
            raise CheckpointError(f"{'/'.join(path)} came out {list(out.shape)}, expected {list(shape)}.")
        result.append((path, np.ascontiguousarray(out)))
    return result


def set_path(tree: dict, path: Path_, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def source_dtype(folder: SafetensorsFolder) -> jnp.dtype:
    """The dtype of the checkpoint's floating-point weights (the most common one)."""
    names = folder.names()
    counts: dict[str, int] = {}
    for n in names:
        counts[folder.dtype(n)] = counts.get(folder.dtype(n), 0) + 1
    name = max(counts, key=counts.get)
    return dtype_of(SAFETENSORS_DTYPES.get(name, "float32"))


def iter_converted(cfg: VL2Config, folder: SafetensorsFolder, dtype) -> Iterator[tuple[Path_, np.ndarray]]:
    """Yields (path, array in `dtype`) for every parameter, reading one rule's sources at a time."""
    plan = conversion_plan(cfg)
    check_accounts(plan, folder.names(), folder.path)
    check_source_shapes(plan, folder)
    np_dtype = np.dtype(jnp.dtype(dtype))
    for rule in plan:
        for path, array in apply_rule(rule, [folder.get(s) for s in rule.source_names]):
            yield path, array.astype(np_dtype, copy=False)


def param_shapes(cfg: VL2Config, dtype) -> dict:
    """The parameter tree `{"params": ...}` as ShapeDtypeStructs, from the plan's targets."""
    tree: dict = {}
    for rule in conversion_plan(cfg):
        for path, shape in rule.targets:
            set_path(tree, path, jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    return {"params": tree}


def load_hf(source: str | Path | SafetensorsFolder, cfg: VL2Config, dtype=None, place: Callable | None = None) -> dict:
    """Loads a Hugging Face checkpoint (a folder, or an open `SafetensorsFolder`) into a parameter tree
    `{"params": ...}` of jax arrays.

    `dtype=None` keeps the checkpoint's dtype. `place(path, host_array) -> jax.Array` puts each leaf on
    the devices as it is converted (default: the default device), so the host holds one rule's tensors
    at a time.
    """
    folder = source if isinstance(source, SafetensorsFolder) else SafetensorsFolder(source)
    dtype = source_dtype(folder) if dtype is None else dtype
    place = place or (lambda p, array: jax.device_put(array))
    params: dict = {}
    for p, array in iter_converted(cfg, folder, dtype):
        set_path(params, p, place(p, array))
    return {"params": params}
