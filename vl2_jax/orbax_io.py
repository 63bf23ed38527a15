"""Our converted checkpoints: a Hugging Face folder -> Orbax, streamed one group of parameters at a time.

Layout of a converted folder DST (what `python -m convert SRC DST` writes):

    DST/config.json, processor_config.json, tokenizer*.json, ...   copied from SRC
    DST/params/vision/          one Orbax PyTree checkpoint per group (leaves keep their full paths,
    DST/params/projector/       e.g. `language/layers_3/attn/q_w`; projector also holds image_newline
    DST/params/embed/           and view_separator, head holds language/norm and language/lm_head)
    DST/params/layers_{i}/
    DST/params/head/
    DST/vl2_jax_checkpoint.json the manifest, written last: format, version, dtype, quant, groups, counts

With `--quant int8|fp8` (`vl2_jax.quant`), each quantized weight is saved as its two leaves,
`.../gate_up_w/qvalue` (int8 or float8_e4m3fn) and `.../gate_up_w/scale` (float32), the manifest's
"quant" names the format (absent: "none"), and `restore` reads those leaves in their saved dtypes.

Host memory stays near one group (the largest is one MoE layer: ~1.1 GB for -small, ~1.7 GB for base
in bf16), because each group is read, converted, written and freed before the next. The output is
written into `DST.partial-<pid>` and renamed to DST only when complete, so an interrupted run never
leaves a folder that `is_converted` accepts.

`restore` reads it back: every leaf of every group at once through tensorstore (largest first, a few
GB in flight at most), each put on its devices as soon as it is read; Orbax's own restore stays as
the plain path (`reader="orbax"`).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import math
import mmap
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vl2_jax.checkpoint import (
    UNUSED_PREFIXES,
    Path_,
    Rule,
    SafetensorsFolder,
    apply_rule,
    check_accounts,
    check_source_shapes,
    conversion_plan,
    set_path,
    source_dtype,
)
from vl2_jax.config import DTYPE_NAMES, VL2Config, dtype_of
from vl2_jax.errors import CheckpointError, deferred_interrupt, not_writable_because, some
from vl2_jax.quant import QUANTS, SCALES, VALUES, check_quant, quantize_params, quantized_shapes
from vl2_jax.sharding import place

MANIFEST = "vl2_jax_checkpoint.json"
FORMAT = "vl2_jax-orbax-groups"
VERSION = 2  # 2: stacked projections (gate_up_w, kv_w, kv_a_w with the rope key)
# Everything `load_pretrained` and the processor may read besides the weights.
COPIED_FILES = (
    "config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "generation_config.json",
)
# Names of folders an unfinished or replacing run leaves behind; never a checkpoint.
_TEMP_NAME = re.compile(r"\.(partial|replaced)-(\d+)$")

Progress = Callable[[str], None]


# ------------------------------------------------------------------------------------------ groups
def group_of(path: Path_) -> str:
    """The group (saved together) of a parameter path such as ("language", "layers_3", "attn", "q_w")."""
    if path[0] == "vision":
        return "vision"
    if path[0] in ("projector", "image_newline", "view_separator"):
        return "projector"
    if path[1] == "embed":
        return "embed"
    if path[1].startswith("layers_"):
        return path[1]
    return "head"  # language/norm, language/lm_head


def grouped_plan(cfg: VL2Config) -> dict[str, list[Rule]]:
    """`conversion_plan(cfg)` split into groups, in checkpoint order. A rule never spans two groups."""
    groups: dict[str, list[Rule]] = {}
    for rule in conversion_plan(cfg):
        names = {group_of(p) for p, _ in rule.targets}
        assert len(names) == 1, names
        groups.setdefault(names.pop(), []).append(rule)
    return groups


def expected_shapes(cfg: VL2Config, quant: str = "none") -> dict[str, dict[Path_, tuple[int, ...]]]:
    """{group: {parameter path (without the leading "params"): shape}} implied by the config (and by
    `quant`: a quantized weight is its values and scales)."""
    out = {}
    for g, rules in grouped_plan(cfg).items():
        tree: dict = {}
        for rule in rules:
            for path, shape in rule.targets:
                set_path(tree, path, jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
        leaves = jax.tree_util.tree_flatten_with_path(quantized_shapes(tree, quant))[0]
        out[g] = {tuple(k.key for k in kp): tuple(leaf.shape) for kp, leaf in leaves}
    return out


def _keeps_saved_dtype(p: Path_, shapes: dict[Path_, tuple[int, ...]]) -> bool:
    """Whether the leaf at `p` is a quantized weight's values or scales: read in its saved dtype, never
    cast (a norm's `scale` has no `qvalue` beside it)."""
    return p[-1] == VALUES or (p[-1] == SCALES and (*p[:-1], VALUES) in shapes)


# ---------------------------------------------------------------------------------------- manifest
def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST}; it is not a finished `python -m convert` output.") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is unreadable ({e}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a vl2_jax checkpoint manifest.")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{file} has format version {manifest.get('version')!r}; this vl2_jax reads version {VERSION}. "
            "Convert the Hugging Face checkpoint again with `python -m convert`."
        )
    groups = manifest.get("groups")
    if not isinstance(groups, list) or manifest.get("dtype") not in DTYPE_NAMES or manifest.get("quant", "none") not in QUANTS:
        raise CheckpointError(f"{file} is malformed (groups, dtype or quant).")
    for g in groups:
        if not (path / "params" / str(g)).is_dir():
            raise CheckpointError(f"{path} lacks the parameter group params/{g} listed in its manifest.")
    return manifest


def is_converted(path: str | Path) -> bool:
    """True iff `path` is a finished `python -m convert` output (a valid manifest, all groups there)."""
    if not is_conversion(path):
        return False
    try:
        check_converted(path)
    except CheckpointError:
        return False
    return True


def is_conversion(path: str | Path) -> bool:
    """True iff `path` holds a `python -m convert` manifest (written last, as a conversion finishes):
    a conversion, whether or not it still loads (`is_converted`); reading it (`check_converted`) says
    what is wrong with one that does not: another format version, a missing group."""
    path = Path(path)
    return not _TEMP_NAME.search(path.name) and (path / MANIFEST).is_file()


def check_converted(path: str | Path) -> None:
    """Raises the `CheckpointError` that says why `path` is not a loadable conversion (none if it is)."""
    _read_manifest(Path(path))


def saved_dtype(path: str | Path):
    """The dtype a converted checkpoint was saved in (a jnp scalar type such as jnp.bfloat16)."""
    return dtype_of(_read_manifest(Path(path))["dtype"])


def saved_quant(path: str | Path) -> str:
    """The weight format a converted checkpoint holds: "none", "int8" or "fp8" (`vl2_jax.quant`)."""
    return _read_manifest(Path(path)).get("quant", "none")


# ----------------------------------------------------------------------------------------- restore
# Bytes of weights read but not yet on their devices, at most (tensorstore's compressed and decoded
# copies come on top): bounds the host memory a load needs beside the model.
READ_BUDGET = 4 << 30
READ_THREADS = 16  # leaves in flight; zstd decoding and file reads run on tensorstore's own thread pools
PLACE_THREADS = 2  # leaves crossing to their devices at once
# Bytes per zstd chunk that `convert` writes: tensorstore decodes a leaf's chunks on several threads, and
# buffers this small are reused by the allocator rather than mapped fresh (whose first touches cost more
# than the copies). A random tiny on an H200 machine, cold cache: 6.2-6.7 s to restore as one chunk per
# leaf, 4.2-5.1 s in 16 MB chunks, 5.0-5.3 s in 4 MB and 5.9-6.6 s in 64 MB ones (BENCHMARKS.md).
CHUNK_BYTES = 16 << 20
# The file kvstore's default mode reads through the page cache (a second load of the same checkpoint is
# served from memory); {"file_io_mode": {"mode": "direct"}} would bypass it (O_DIRECT).
READ_CONTEXT = {"file_io_concurrency": {"limit": 64}}

BytesProgress = Callable[[int, int], None]


def restore(
    path: str | Path, cfg: VL2Config, dtype=None, shardings=None, bytes_progress: BytesProgress | None = None,
    reader: str = "tensorstore", after: Callable | None = None,
) -> tuple[dict, type]:
    """Restores a converted checkpoint into the tree `load_hf` gives: `{"params": {...}}` of jax arrays.

    Args:
      path: a `python -m convert` output folder.
      cfg: the model config; every leaf's shape is checked against `conversion_plan(cfg)`, for all
        groups, before any weight is read.
      dtype: cast every leaf to this dtype while reading (None keeps the saved dtype); a quantized
        weight's values and scales keep theirs.
      shardings: None (every leaf on the default device, as `load_hf`), or a pytree like the params
        (`{"params": {...}}`) whose leaves are `jax.sharding.Sharding` (None or absent: the default
        device; a Sharding in place of a subtree covers all of it); each leaf is then read once and
        placed straight into its shards.
      bytes_progress: called as `bytes_progress(done, total)` (bytes of weights in `dtype` on their
        devices, out of all) each time a leaf (the direct reader) or a group (Orbax) lands, from the
        calling thread.
      reader: "tensorstore" (default): every leaf of every group read concurrently, largest first,
        straight from the Orbax files (OCDBT + zarr) through tensorstore; "orbax": one group at a time
        through Orbax's PyTreeCheckpointer, the plain path the tests compare against (also taken when
        some group is stored in a layout the direct reader does not know).
      after: `after(param path, array) -> leaf`, applied to each leaf once it is on its devices (e.g. to
        quantize it, so that one float leaf at a time is there); its result goes into the tree.

    Returns:
      (params, saved dtype as a jnp scalar type such as jnp.bfloat16).

    Raises CheckpointError naming the group or leaf that is missing, unexpected, mis-shaped or unreadable.
    """
    if reader not in ("tensorstore", "orbax"):
        raise ValueError(f"reader must be 'tensorstore' or 'orbax', not {reader!r}")
    path = Path(path)
    manifest = _read_manifest(path)
    saved = dtype_of(manifest["dtype"])
    want = jnp.dtype(saved if dtype is None else dtype)
    expected = expected_shapes(cfg, manifest.get("quant", "none"))
    missing = [g for g in expected if g not in manifest["groups"]]
    extra = [g for g in manifest["groups"] if g not in expected]
    if missing or extra:
        raise CheckpointError(
            f"{path} does not match its config.json: missing group(s) {missing}, unexpected group(s) {extra}."
        )
    bytes_progress = bytes_progress or (lambda done, total: None)
    stores = _open_stores(path, expected) if reader == "tensorstore" else None
    after = after or (lambda p, array: array)
    if stores is None:
        return _restore_with_orbax(path, expected, want, shardings, bytes_progress, after), saved
    return _read_concurrently(path, stores, want, shardings, bytes_progress, after), saved


def _check_leaves(path: Path, group: str, shapes: dict[Path_, tuple[int, ...]], saved: dict[Path_, tuple[int, ...]]):
    """Raises CheckpointError where the saved leaves {path: shape} of `group` differ from `shapes`."""
    for p, shape in shapes.items():
        if p not in saved:
            raise CheckpointError(f"{path}: parameter {'/'.join(p)} is missing from params/{group}.")
        if tuple(saved[p]) != shape:
            raise CheckpointError(
                f"{path}: parameter {'/'.join(p)} has shape {list(saved[p])}, but config.json implies {list(shape)}."
            )
    unexpected = sorted("/".join(p) for p in set(saved) - set(shapes))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected parameter(s) in params/{group}: {', '.join(unexpected[:5])}.")


def _lookup(tree, path: tuple[str, ...]):
    """tree[path[0]][path[1]]...; None where absent. A Sharding met on the way applies to its subtree."""
    for key in path:
        if isinstance(tree, jax.sharding.Sharding):
            return tree
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


# The direct reader. Orbax writes each group as one OCDBT database (`params/<group>/manifest.ocdbt`)
# holding one zarr array per leaf under the key `language.layers_3.attn.q_w/` (the path joined by
# dots), with its metadata at `<key>/.zarray` (zarr v2, what `convert` writes) or `<key>/zarr.json` (v3).
_ARRAY_METADATA = {".zarray": "zarr", "zarr.json": "zarr3"}


def _open_stores(path: Path, expected: dict[str, dict[Path_, tuple[int, ...]]]):
    """{group: {param path: open tensorstore}} of every group, shapes checked; None if some group is not
    stored as the direct reader expects (then Orbax reads the checkpoint)."""
    import tensorstore as ts

    context = ts.Context(READ_CONTEXT)
    kvstores = {}
    for group in expected:
        directory = (path / "params" / group).resolve()
        if not (directory / "manifest.ocdbt").is_file():
            return None
        kvstores[group] = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{directory}/"}}
    try:
        opened = {g: ts.KvStore.open(spec, context=context) for g, spec in kvstores.items()}
        listings = {g: kv.result().list() for g, kv in opened.items()}
        arrays: dict[str, dict[Path_, object]] = {}
        for group, listing in listings.items():
            arrays[group] = {}
            for key in listing.result():
                name, _, leaf = key.decode().rpartition("/")
                if leaf in _ARRAY_METADATA:
                    spec = {"driver": _ARRAY_METADATA[leaf], "kvstore": {**kvstores[group], "path": name + "/"}}
                    arrays[group][tuple(name.split("."))] = ts.open(spec, context=context, open=True, read=True)
        stores = {g: {p: future.result() for p, future in leaves.items()} for g, leaves in arrays.items()}
    except ValueError as e:  # tensorstore's error for unreadable files and metadata
        raise CheckpointError(f"{path}: the checkpoint's metadata is unreadable ({_first_line(e)}).") from None
    for group, shapes in expected.items():
        _check_leaves(path, group, shapes, {p: tuple(s.shape) for p, s in stores[group].items()})
    return stores


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


class _Budget:
    """Blocks `take(n)` until fewer than `limit` bytes are taken (one request may exceed it alone), or
    until `abort()`, after which `take` raises: a failed load's readers end instead of waiting for bytes
    that read but unplaced leaves will never give back."""

    def __init__(self, limit: int):
        self.left, self.limit, self.aborted = limit, limit, False
        self.cond = threading.Condition()

    def take(self, n: int) -> int:
        n = min(n, self.limit)
        with self.cond:
            self.cond.wait_for(lambda: self.left >= n or self.aborted)
            if self.aborted:
                raise concurrent.futures.CancelledError("the load failed")
            self.left -= n
        return n

    def give(self, n: int) -> None:
        with self.cond:
            self.left += n
            self.cond.notify_all()

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify_all()


def _host_buffer(shape, dtype) -> np.ndarray:
    """An uninitialised array in memory of its own, page aligned, which the CPU backend adopts as a device
    buffer instead of copying it. Anonymous mmap memory rather than numpy's: numpy asks for transparent
    huge pages for large arrays, and zeroing those made loads slower in a VM."""
    n = math.prod(shape) * dtype.itemsize
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), np.uint8)[:n].view(dtype).reshape(shape)


def _read_host(path: Path, group: str, p: Path_, store, sharding) -> np.ndarray:
    """One leaf from its tensorstore (cast on the way if `store` is a cast view) into host memory. For a
    leaf bound for one CPU device, into a buffer that device adopts as it is (one host copy fewer)."""
    import tensorstore as ts

    try:
        if len(sharding.device_set) == 1 and next(iter(sharding.device_set)).platform == "cpu":
            host = _host_buffer(store.shape, store.dtype.numpy_dtype)
            ts.array(host, copy=False, write=True).write(store).result()
            return host
        return store.read().result()
    except ValueError as e:  # tensorstore's error for unreadable or truncated data
        raise CheckpointError(
            f"{path}: reading parameter {'/'.join(p)} from params/{group} failed ({_first_line(e)}); "
            "the checkpoint is damaged, so convert it again."
        ) from None


def _read_concurrently(path: Path, stores: dict, want, shardings, bytes_progress: BytesProgress, after) -> dict:
    """Reads every leaf, READ_THREADS at a time with at most READ_BUDGET bytes read but not yet on their
    devices, and hands each to PLACE_THREADS threads that put it on its devices as soon as it is read: one
    read per leaf (all of its shards come from that one host copy), cast by tensorstore as it copies out
    of the decoded chunk. Reading and placing run in threads of their own, so the file reads go on while
    earlier leaves cross to the devices. The largest leaves start first, so that none is the load's tail
    (checkpoints converted before `CHUNK_BYTES` hold each leaf as one zstd chunk, decoded by one thread)."""
    import tensorstore as ts

    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    leaves = [(g, p, s if s.dtype.numpy_dtype == want or _keeps_saved_dtype(p, ls) else ts.cast(s, want))
              for g, ls in stores.items() for p, s in ls.items()]
    size = lambda leaf: math.prod(leaf[2].shape) * leaf[2].dtype.numpy_dtype.itemsize
    sharding_of = lambda leaf: _lookup(shardings, ("params", *leaf[1])) or default
    leaves.sort(key=size, reverse=True)
    total = sum(map(size, leaves))
    budget = _Budget(READ_BUDGET)

    def read(leaf):
        taken = budget.take(size(leaf))
        try:
            return _read_host(path, leaf[0], leaf[1], leaf[2], sharding_of(leaf)), taken
        except BaseException:
            budget.give(taken)
            raise

    def land(leaf, host, taken):
        try:
            return after(leaf[1], place(host, sharding_of(leaf)))
        finally:
            budget.give(taken)

    params: dict = {}
    done = 0
    with (concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="vl2-read") as readers,
          concurrent.futures.ThreadPoolExecutor(PLACE_THREADS, thread_name_prefix="vl2-place") as placers):
        stage = {readers.submit(read, leaf): ("read", leaf) for leaf in leaves}
        pending = set(stage)
        try:
            while pending:
                finished, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    kind, leaf = stage.pop(future)
                    if kind == "read":
                        placed = placers.submit(land, leaf, *future.result())
                        stage[placed] = ("place", leaf)
                        pending.add(placed)
                    else:
                        set_path(params, leaf[1], future.result())
                        done += size(leaf)
                        bytes_progress(done, total)
        except BaseException:  # the first failure (or Ctrl-C) ends the load; leaves not started never start
            budget.abort()
            for future in stage:
                future.cancel()
            raise
    return {"params": params}


# The plain reader: Orbax's own restore, one group at a time.
def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer()


def _saved_leaves(checkpointer, directory: Path) -> dict[Path_, tuple[tuple[int, ...], str]]:
    """{path: (shape, dtype name)} of an Orbax PyTree checkpoint, read from its metadata only."""
    meta = checkpointer.metadata(directory)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)  # orbax >= 0.11 wraps the tree
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(k.key for k in kp): (tuple(m.shape), str(m.dtype)) for kp, m in leaves}


def _restore_with_orbax(path: Path, expected: dict, want, shardings, bytes_progress: BytesProgress, after) -> dict:
    import orbax.checkpoint as ocp

    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    checkpointer = _checkpointer()
    total = sum(math.prod(s) for shapes in expected.values() for s in shapes.values()) * want.itemsize
    params: dict = {}
    done = 0
    for group, shapes in expected.items():
        directory = (path / "params" / group).resolve()
        saved = _saved_leaves(checkpointer, directory)
        _check_leaves(path, group, shapes, {p: s for p, (s, _) in saved.items()})
        abstract: dict = {}
        for p, shape in shapes.items():
            sharding = _lookup(shardings, ("params", *p)) or default
            dtype = jnp.dtype(saved[p][1]) if _keeps_saved_dtype(p, shapes) else want
            set_path(abstract, p, jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
        tree = checkpointer.restore(
            directory,
            args=ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
        )
        for p, shape in shapes.items():
            set_path(params, p, after(p, _lookup(tree, p)))
            done += math.prod(shape) * want.itemsize
        bytes_progress(done, total)
    return {"params": params}


# ----------------------------------------------------------------------------------------- convert
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(dst: Path, progress: Progress) -> None:
    """Deletes `DST.partial-<pid>` / `DST.replaced-<pid>` folders whose process is gone (a killed run)."""
    if not dst.parent.is_dir():
        return
    for p in dst.parent.glob(f"{glob_escape(dst.name)}.*-*"):
        m = _TEMP_NAME.search(p.name)
        if m and p.name == dst.name + m.group(0) and not _pid_alive(int(m.group(2))):
            progress(f"removing {p}, left by an interrupted conversion")
            _remove(p)


def _remove(path: Path) -> None:
    """Deletes a folder, or only the link where `path` is a link (a replaced DST that linked elsewhere)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuses, before anything is read, a destination that this run must not replace or cannot write.

    DST must neither be, contain nor lie inside SRC. An existing DST is replaced only with `force` and only if it is
    what a conversion made (or an empty folder); an unrelated one is refused at once, with or without
    `force`. DST's parent must be an existing folder in which this process can create a folder: tried with
    the `DST.partial-<pid>` folder the run will write into, removed again at once. Raises CheckpointError
    (one sentence naming DST and the reason).
    """
    if dst.resolve() == src.resolve() or dst.resolve() in src.resolve().parents:
        raise CheckpointError(f"the destination {dst} would contain or replace the source {src}; choose another folder.")
    if src.resolve() in dst.resolve().parents:  # (a Hugging Face folder, e.g. the hub's cache, keeps its own files)
        raise CheckpointError(f"the destination {dst} is inside the source {src}; choose a folder outside it.")
    if dst.exists() or dst.is_symlink():
        # --force replaces only what a conversion made (or an empty folder), never an arbitrary folder.
        why = _not_replaceable(dst)
        if why is not None:
            raise CheckpointError(f"{dst} already exists and {why}, so it will not be replaced, even with --force; "
                                  "choose another destination.")
        if not force:
            raise CheckpointError(f"{dst} already exists; pass --force to replace it.")
    parent = dst.absolute().parent
    if not parent.is_dir():
        if parent.exists():
            raise CheckpointError(f"cannot write {dst}: its parent folder {parent} is a file, not a folder; choose "
                                  "another destination.")
        raise CheckpointError(f"cannot write {dst}: its parent folder {parent} does not exist; create it or choose "
                              "another destination.")
    probe = dst.with_name(f"{dst.name}.partial-{os.getpid()}")
    try:
        probe.mkdir()
    except FileExistsError:
        return  # a leftover of an earlier process with our pid: the folder can be written, leave it alone
    except OSError as e:
        raise CheckpointError(f"cannot write {dst}: {not_writable_because(e, parent)}; choose another destination.") from None
    probe.rmdir()


def _not_replaceable(dst: Path) -> str | None:
    """Why `dst` may not be replaced (None: an empty folder, or one that a conversion made, finished or
    not, holding nothing else: not a fine-tuning run's folder with its train state beside the weights)."""
    try:
        if not dst.is_dir():
            return "is not a vl2_jax checkpoint"
        entries = {entry.name for entry in dst.iterdir()}
        if entries and not ((dst / MANIFEST).exists() or is_converted(dst)):
            return "is not a vl2_jax checkpoint"
        other = sorted(entries - {MANIFEST, MANIFEST + ".tmp", "params", *COPIED_FILES})
    except OSError:  # unreadable: not something we can tell is ours
        return "cannot be read"
    if other:
        return f"holds files that no conversion writes ({some(other, 4)})"
    return None


def _copy_side_files(src: Path, tmp: Path) -> list[str]:
    copied = []
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
            copied.append(name)
    return copied


def format_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def convert_checkpoint(
    src: str | Path, dst: str | Path, dtype=None, force: bool = False, progress: Progress | None = None,
    quant: str = "none",
) -> dict:
    """Converts a Hugging Face DeepSeek-VL2 folder `src` into an Orbax checkpoint folder `dst`.

    The destination is checked first (see `_check_destination`: writable, not an unrelated folder), then
    every tensor (names, shapes) before anything is written. `dtype` ("bfloat16", "float32", a dtype, or
    None for the source's) is the saved dtype of the float leaves. `quant` ("none", "int8", "fp8"):
    the language model's weights saved quantized (`vl2_jax.quant`), one group at a time. `progress(line)`
    gets one line per step. Returns the manifest (plus "seconds" and "bytes"). Raises CheckpointError /
    ConfigError.
    """
    check_quant(quant)
    progress = progress or (lambda line: None)
    start = time.time()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        what = "is not a folder" if src.exists() else "does not exist"
        raise CheckpointError(f"{src} {what}; pass a Hugging Face DeepSeek-VL2 checkpoint folder.")
    if (src / MANIFEST).is_file():
        again = ("pass a Hugging Face folder: the one it came from, or for a fine-tuned model the one `python -m "
                 "vl2_jax.finetune --export-hf` writes.")
        try:
            check_converted(src)
        except CheckpointError as e:  # (an older format version, a damaged folder: why it does not load)
            raise CheckpointError(f"{src} is a `python -m convert` output that does not load: {e} To convert, "
                                  + again) from None
        raise CheckpointError(f"{src} is already a `python -m convert` output, which loads as it is (--model {src}); "
                              "to convert again, " + again)
    _check_destination(src, dst, force)  # before anything is read: a bad destination fails in a moment
    cfg = VL2Config.from_pretrained(src)
    folder = SafetensorsFolder(src)
    plan = conversion_plan(cfg)
    dropped = check_accounts(plan, folder.names(), src)
    check_source_shapes(plan, folder)
    np_dtype = np.dtype(source_dtype(folder) if dtype is None else dtype_of(dtype))
    dropped_params = sum(int(np.prod(folder.shape(n))) for n in dropped)
    del folder  # reopened per group below, so the shards' memory maps never pile up (see _convert_groups)
    if dropped:
        prefixes = ", ".join(p + "*" for p in UNUSED_PREFIXES if any(n.startswith(p) for n in dropped))
        progress(f"dropped {len(dropped)} unused tensors ({prefixes}, {dropped_params:,} parameters)")
    for name in ("processor_config.json", "tokenizer.json"):
        if not (src / name).is_file():
            progress(f"note: {src} has no {name}; copy it into {dst} before loading it (python -m generate, load_model)")

    _remove_stale(dst, progress)
    tmp = dst.with_name(f"{dst.name}.partial-{os.getpid()}")
    try:
        (tmp / "params").mkdir(parents=True)
        copied = _copy_side_files(src, tmp)
        groups, n_params, n_bytes = _convert_groups(cfg, src, tmp, np_dtype, progress, start, quant)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": np_dtype.name,
            "quant": quant,
            "groups": groups,
            "num_parameters": n_params,
            "dropped": {"tensors": dropped, "parameters": dropped_params},
            "copied_files": copied,
            "source": str(src.resolve()),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp / (MANIFEST + ".tmp"), tmp / MANIFEST)  # the manifest appears whole or not at all
        with deferred_interrupt():  # (a stop between the renames would leave neither the old DST nor the new)
            _move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest | {"seconds": time.time() - start, "bytes": n_bytes}


def _convert_groups(cfg, src: Path, tmp: Path, np_dtype, progress: Progress, start: float, quant: str = "none"):
    """Converts (and quantizes, see `convert_checkpoint`) and saves one group at a time; returns (group
    names, parameter count, bytes). The parameter count counts a quantized weight's values only."""
    groups = grouped_plan(cfg)
    total = sum(int(np.prod(s)) for rules in groups.values() for r in rules for _, s in r.targets) * np_dtype.itemsize
    checkpointer = _checkpointer()
    n_params = n_bytes = done = 0
    for i, (name, rules) in enumerate(groups.items()):
        # A fresh reader per group: the safetensors files are memory-mapped, and pages read through a
        # map stay in this process's resident set until it is unmapped.
        folder = SafetensorsFolder(src)
        tree: dict = {}
        for rule in rules:
            for p, array in apply_rule(rule, [folder.get(s) for s in rule.source_names]):
                set_path(tree, p, array.astype(np_dtype, copy=False))
        del folder
        n_params += sum(a.size for a in jax.tree_util.tree_leaves(tree))
        done += sum(a.nbytes for a in jax.tree_util.tree_leaves(tree))  # (in the float dtype, as `total`)
        if quant != "none":
            tree = jax.tree.map(np.asarray, quantize_params(tree, quant))
        leaves = jax.tree_util.tree_leaves(tree)
        n_bytes += sum(a.nbytes for a in leaves)
        _save_group(checkpointer, (tmp / "params" / name).resolve(), tree)
        del tree, leaves
        tensors, elapsed = sum(len(r.sources) for r in rules), time.time() - start
        progress(
            f"[{i + 1}/{len(groups)}] {name}: {tensors} tensor{'s' if tensors != 1 else ''}, "
            f"{format_bytes(done)} of {format_bytes(total)}, {elapsed:.{1 if elapsed < 10 else 0}f} s"
        )
    return list(groups), n_params, n_bytes


def _save_group(checkpointer, directory: Path, tree: dict) -> None:
    """Writes one group (a nested dict of numpy arrays) as an Orbax PyTree checkpoint, each leaf in zstd
    chunks of about CHUNK_BYTES."""
    import orbax.checkpoint as ocp

    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)
    checkpointer.save(directory, args=ocp.args.PyTreeSave(tree, save_args=save_args))


def _move_into_place(tmp: Path, dst: Path) -> None:
    if not (dst.exists() or dst.is_symlink()):
        os.rename(tmp, dst)
        return
    old = dst.with_name(f"{dst.name}.replaced-{os.getpid()}")
    os.rename(dst, old)
    os.rename(tmp, dst)
    _remove(old)
