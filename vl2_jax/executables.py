"""Compiled programs kept on disk, so that a fresh process neither traces nor compiles them again.

JAX's persistent compilation cache keeps compiled XLA programs, but it finds one by its lowered
module: every fresh process still traces and lowers each Python function first (on an H200 that was
6.3 s of a command-line answer's first token, with every program in the cache). This store keys each
program by what determines it without tracing it: the model's config and runtime (in `fingerprint`),
the program's name and static arguments, and the shapes, dtypes and placements of its inputs. A hit is
the serialized executable (`jax.experimental.serialize_executable`), loaded in milliseconds.

    store = ExecutableStore("~/.cache/vl2_jax/xla/executables", fingerprint(cfg, dtype, runtime))
    compiled = store.load_or_compile("decode(1, 512, True)", jitted, dynamic_args, static_args)
    out = compiled(*dynamic_args)

The fingerprint also covers the package's source, JAX's and jaxlib's versions, the device kind and
the XLA flags, so that a change to any of them compiles afresh (into a new folder; the oldest folders
beyond `keep` are removed). A file that does not load (truncated, from another build) is compiled
and written again.

Loading is not free: a program holding Mosaic GPU kernels (the grouped prefill matmul) compiles them
again in every process, about a second for small's prefill on an H100. `prefetch` therefore starts
loading the folder's programs (those named first, then the rest) on background threads, e.g. while the
weights load (`load_model(programs=...)`); a call then takes its program from there, or loads it
itself if no thread has started on it yet.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pickle
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from vl2_jax.errors import ConfigError
from vl2_jax.specs import cache_home

FORMAT = 1  # bump when the file layout below changes


def _source_digest() -> str:
    """The package's Python source, hashed: any edit to the model code is a different program."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint(*parts: object) -> str:
    """A digest of `parts` (e.g. the config, dtype and runtime: their reprs) and of everything else a
    compiled program depends on: this package's source, JAX and jaxlib, the devices, the XLA flags."""
    import jaxlib

    device = jax.devices()[0]
    context = (FORMAT, _source_digest(), jax.__version__, jaxlib.__version__, device.platform,
               device.device_kind, jax.device_count(), getattr(device.client, "platform_version", ""),
               os.environ.get("XLA_FLAGS", ""), jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)
    return hashlib.sha256(repr((context, parts)).encode()).hexdigest()[:24]


def _placed(x) -> bool:
    """Whether `x` is an array, or a ShapeDtypeStruct with a placement (which stands for one)."""
    return isinstance(x, jax.Array) or isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None


def describe(args: Sequence) -> str:
    """The shapes, dtypes and placements of a call's arguments (a pytree), as text (an array and a
    ShapeDtypeStruct of its shape and placement read the same)."""

    def leaf(x):
        if _placed(x):
            return f"{x.dtype}{list(x.shape)}@{x.sharding}"
        return f"{type(x).__name__}:{getattr(x, 'dtype', '')}{list(getattr(x, 'shape', ()))}"

    leaves, tree = jax.tree.flatten(args)
    return f"{tree}|{'|'.join(leaf(x) for x in leaves)}"


def jax_cache_on() -> bool:
    """Whether JAX's own persistent compilation cache is on in this process."""
    return bool(jax.config.jax_compilation_cache_dir) and jax.config.jax_enable_compilation_cache


def _device(args: Sequence):
    """The one device a call of `args` runs on: its arrays', else JAX's default device."""
    for x in jax.tree.leaves(args):
        if _placed(x):
            (device,) = x.sharding.device_set
            return device
    return jax.config.jax_default_device or jax.devices()[0]


def loading_pool(threads: int, name: str) -> concurrent.futures.ThreadPoolExecutor:
    """Background threads (at most `threads`, one per CPU core) for loading programs, whose loads not
    begun are dropped when the process exits (the interpreter would otherwise wait for every one)."""
    pool = concurrent.futures.ThreadPoolExecutor(min(threads, os.cpu_count() or 1), name)
    try:  # (runs before the interpreter waits for the pool's threads, as concurrent.futures' own hook does)
        threading._register_atexit(lambda: pool.shutdown(wait=False, cancel_futures=True))
    except (AttributeError, RuntimeError):  # (another Python; or already exiting)
        pass
    return pool


class ExecutableStore:
    """Serialized executables under `directory/<fingerprint>/`, one file per program variant.

    Counts programs `loaded` (from disk, by a call), `compiled` (then written) and `failures` (files
    that would not load or could not be written: compiled as if missing). Safe to use from several
    threads (warmup compiles in parallel); files are written whole or not at all.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str, keep: int = 4):
        if jax_cache_on():
            # An executable that JAX loaded from its own cache serializes without the functions it calls
            # (loading it later fails with "Function ... not found"): every program kept here must come
            # from a real compile.
            raise ConfigError("compiled programs cannot be kept while JAX's persistent compilation cache is on "
                              "(jax_compilation_cache_dir); use one or the other.")
        self.root = Path(directory).expanduser()
        self.directory = self.root / fingerprint
        self.loaded = self.compiled = self.failures = 0
        self.load_s = 0.0  # seconds spent loading programs (summed over threads)
        self._lock = threading.Lock()
        self._ahead: dict[Path, tuple[object, concurrent.futures.Future]] = {}  # (`prefetch`: device, load)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        os.utime(self.directory)  # most recently used: kept by the pruning below
        self._prune(keep)

    def _prune(self, keep: int) -> None:
        """Removes all but the `keep` most recently used fingerprint folders (older code or settings)."""
        folders = sorted((p for p in self.root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in folders[keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def path(self, name: str, args: Sequence, static: tuple = ()) -> Path:
        """The file of program `name` called with `args` (dynamic) and `static`."""
        key = hashlib.sha256(f"{name}|{static!r}|{describe(args)}".encode()).hexdigest()[:16]
        return self.directory / f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}-{key}.bin"

    def holds(self, name: str, args: Sequence, static: tuple = ()) -> bool:
        """Whether program `name` called with `args` and `static` has a file here."""
        return self.path(name, args, static).exists()

    def prefetch(self, first: Sequence[str] = (), limit: int = 256, threads: int = 8) -> int:
        """Starts loading up to `limit` of the folder's programs for JAX's default device, on `threads`
        background threads: those whose names start with one of `first` first, in that order, then the
        rest; most recently used first within each. `load_or_compile` takes them from there. -> how many
        it started. Those not started when the process exits are dropped."""
        def order(path: Path) -> tuple[int, float]:
            rank = next((i for i, name in enumerate(first) if path.name.startswith(name)), len(first))
            try:
                return rank, -path.stat().st_mtime
            except OSError:  # (removed meanwhile)
                return rank, 0.0

        files = sorted(self.directory.glob("*.bin"), key=order)[:limit]
        device = _device(())
        with self._lock:
            files = [path for path in files if path not in self._ahead]
            if files and self._pool is None:
                self._pool = loading_pool(threads, "vl2-programs")
            for path in files:
                self._ahead[path] = (device, self._pool.submit(self._read, path, device))
        return len(files)

    def _read(self, path: Path, device):
        """The program in `path`, loaded onto `device` -> a `jax.stages.Compiled`, or None if the file
        does not load (counted in `failures`)."""
        from jax.experimental import serialize_executable

        t0 = time.perf_counter()
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                                 execution_devices=[device])
        except Exception:  # noqa: BLE001 - any file that does not load is compiled again
            self._count("failures")
            return None
        self._count("load_s", time.perf_counter() - t0)
        return compiled

    def _take_ahead(self, path: Path, device) -> concurrent.futures.Future | None:
        """`prefetch`'s load of `path` for `device`, if one was started (None if none was, or if it had
        not begun: the caller then loads the file itself rather than wait in the queue)."""
        with self._lock:
            device_ahead, future = self._ahead.pop(path, (None, None))
        if future is None or future.cancel() or device_ahead != device:
            return None  # (none started; or begun for another device: its result goes unused)
        return future

    def load_or_compile(self, name: str, jitted, args: Sequence, static: tuple = ()):
        """The compiled program `jitted(*args, *static)` (a `jax.stages.Compiled`, called with `args`
        only): loaded from its file (or taken from `prefetch`), else traced, compiled and written."""
        from jax.experimental import serialize_executable

        path, device = self.path(name, args, static), _device(args)
        ahead = self._take_ahead(path, device)
        if ahead is not None:
            compiled = ahead.result()
        else:
            compiled = self._read(path, device) if path.exists() else None
        if compiled is not None:
            self._count("loaded")
            try:
                os.utime(path)  # most recently used: prefetched first next time
            except OSError:
                pass
            return compiled
        compiled = jitted.lower(*args, *static).compile()
        self._count("compiled")
        try:
            data = pickle.dumps(serialize_executable.serialize(compiled))
            with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".partial", delete=False) as f:
                f.write(data)
            os.replace(f.name, path)
        except Exception:  # noqa: BLE001 - a program that cannot be kept still runs
            self._count("failures")
        return compiled

    def _count(self, what: str, seconds: float = 0.0) -> None:
        with self._lock:
            if what == "load_s":
                self.load_s += seconds
            else:
                setattr(self, what, getattr(self, what) + 1)

    def report(self) -> dict:
        """{"loaded", "compiled", "failures"}: the counts so far; "load_s": seconds spent loading (summed
        over threads, including programs prefetched and not used yet)."""
        return {"loaded": self.loaded, "compiled": self.compiled, "failures": self.failures,
                "load_s": round(self.load_s, 4)}


# -- the entry points' --compile-cache ----------------------------------------------------------------
def cache_dir(flag: str | None) -> str:
    """Where compiled programs persist between runs: the flag, else $VL2_JAX_COMPILE_CACHE, else
    ~/.cache/vl2_jax/xla (under $XDG_CACHE_HOME where set; "" = nowhere)."""
    if flag is not None:
        return flag
    return os.environ.get("VL2_JAX_COMPILE_CACHE", str(cache_home() / "vl2_jax" / "xla"))


def _see(path: str) -> str:
    """Where to change the compile-cache folder `path`, for an error about it."""
    if os.environ.get("VL2_JAX_COMPILE_CACHE") == path:
        return "it comes from $VL2_JAX_COMPILE_CACHE; see --compile-cache"
    return "see --compile-cache"


def use_compile_cache(path: str, log: Callable[[str], None], jax_cache: bool = True) -> str:
    """The entry points' --compile-cache folder, made if missing -> `path` if it is usable (for `keep`),
    else "". `jax_cache`: also turn on JAX's persistent compilation cache there (a second run with the
    same shapes then loads its programs, after tracing them), for runs whose programs `keep` cannot keep
    (under a mesh); off where `keep` will keep them (the two do not mix: `ExecutableStore`).
    JAX_COMPILATION_CACHE_DIR wins for JAX's cache."""
    if not path:
        return ""
    try:
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError("a file, not a folder")
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError("not writable")
    except OSError as e:
        log(f"compiled programs not cached: cannot use {path} ({e.strerror or e}); {_see(path)}")
        return ""
    if not jax_cache or jax.config.jax_compilation_cache_dir:
        if not jax_cache_on():
            log(f"compiled programs cached in {path}")
        return path
    jax.config.update("jax_compilation_cache_dir", path)
    # Keep every program, not only those slower than a second to compile (JAX's default): a fresh
    # process then compiles nothing that an earlier one did.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    log(f"compiled programs cached in {path}")
    return path


def keep(target, directory: str, log: Callable[[str], None]) -> ExecutableStore | None:
    """The engine programs of `target` (a `VL2Model` or an `Engine`) kept as executables in
    `directory`/executables (`use_compile_cache`'s folder), so that a fresh process loads them
    without tracing; those kept there start loading at once (`ExecutableStore.prefetch`) -> the
    store, or None (no folder, or a mesh)."""
    if not directory or target.mesh is not None:
        return None
    if jax_cache_on():
        log("compiled programs not kept as executables: JAX's own compilation cache is on "
            "(JAX_COMPILATION_CACHE_DIR); each run traces its programs")
        return None
    try:
        return target.keep_executables(os.path.join(directory, "executables"))
    except OSError as e:
        log(f"compiled programs not kept: cannot use {directory} ({e.strerror or e}); {_see(directory)}")
        return None
