"""The engine: every device program of the model at fixed shapes, over `max_batch` slots.

After the manner of JetStream's engine API, a request is prefilled into a free slot, inserted (its first
token sampled and the slot's state set), and then decoded together with every other live slot; slots
join and leave between decode calls. Every shape comes from a small set chosen when the engine is built,
so that after `warmup()` no request compiles or traces anything:

- encode: the vision tower and projector over a chunk of a prompt's tiles (`TILE_CHUNKS` tiles; a
  partial chunk is padded), writing their tokens into a feature table of fixed size; a tile whose
  tokens are kept from before (`prefix_cache.TileFeatures`) is written in from there instead (put),
  and a newly encoded one is taken out to be kept (take);
- embed: the prompt's token embeddings with the image features gathered from that table, into a buffer
  of `capacity` rows;
- prefill: the first chunks of N prompts (a length from `Runtime.prefill_chunks`, the longest's; N from
  `rows_for` it), each into its slot, causally among its own tokens: waiting prompts whose first chunks
  have one length go through the model together (`pick_together`; shorter ones only in padded rows);
- extend: a later chunk (past the first, or past a cached prefix) of N prompts, each into its slot,
  attending to the slot's first `keys` cache entries (a key-length bucket: `key_buckets`); N is 1 or
  `EXTEND_ROWS` (`extend_rows`): prompts whose next chunks have one length go together (`pick_later`);
- insert: the first token of N prompts sampled from their last chunk's logits, their slots' state set;
- decode: `decode_steps(n)` steps for the first `n` slots (a live-slot bucket: `slot_buckets`) in one
  on-device loop of a fixed trip count, attention reading `keys` entries (a bucket: `decode_key_buckets`;
  one, the capacity, where the decode attention kernel reads each slot's own), with an all-greedy
  variant that skips the sort.

Sampling settings, lengths, limits and done flags are per-slot arrays of the state, so no setting
changes a shape. The state is donated to every program and comes back updated.

Dimension letters as in `vl2_jax.modules`: B slots (`max_batch`), L cache capacity (`capacity`: the
slot's `max_seq_len` rounded up to a multiple of the smallest prefill chunk), R feature-table rows,
N live-slot or prompt-row bucket, C prefill chunk, S key-length bucket, I tile chunk, V vocabulary.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding

from vl2_jax.cache import KVCache
from vl2_jax.config import Runtime, VL2Config
from vl2_jax.errors import ConfigError, InputError, PromptTooLong
from vl2_jax.executables import ExecutableStore, fingerprint, loading_pool
from vl2_jax.modules.attention import ragged_decode
from vl2_jax.modules.language import LanguageModel
from vl2_jax.modules.vision import normalize_pixels
from vl2_jax.modules.vl2 import VL2
from vl2_jax.prefetch import available_memory
from vl2_jax.prefix_cache import TileFeatures
from vl2_jax.processor import NEWLINE_SOURCE, SEPARATOR_SOURCE, TILE_SOURCES, PixelNorm, image_token_sources
from vl2_jax.sampling import RowSampling, sample_rows
from vl2_jax.sharding import Layout

STEPS = Runtime.decode_steps  # (the default: 16) the host reads tokens (streaming, stop strings) between calls
CONTINUED_CHUNK_MAX = 1024  # the longest chunk of a prompt continued past a cached prefix
EXTEND_ROWS = 4  # later chunks of up to this many prompts go through the model in one call
TILE_CHUNKS = (2, 5)  # tiles per vision-tower call: 5 is a 768 px image's global view and 2x2 tiles
NO_TOKEN = -1  # in decode outputs: the slot produced nothing at that step


def powers_of_two(low: int, high: int) -> tuple[int, ...]:
    """low, 2*low, ... up to and including `high` (which ends the list even if not a power of two)."""
    out, n = [], low
    while n < high:
        out.append(n)
        n *= 2
    return (*out, high)


def decode_steps(n: int, steps: int = STEPS) -> int:
    """Tokens per decode call over a live-slot bucket of `n`: `steps` (`Runtime.decode_steps`) up to 8
    slots, half as many at 16, a quarter beyond, at least 1. A call runs to its end before anything else
    does, so a prompt that arrives waits for the call under way and the one queued behind it; a step
    takes longer the more slots decode, so calls over many slots are kept short to bound that wait (the
    step times behind it: BENCHMARKS.md, Serving). Up to 8 slots a call keeps `steps`, so that the host's
    time between calls weighs little. The answers do not depend on it (each token's sampling key is
    folded with its position in the answer)."""
    return max(1, steps if n <= 8 else steps // 2 if n <= 16 else steps // 4)


def smallest_at_least(n: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= n)


def tile_chunks(n: int) -> list[int]:
    """The sizes of the vision-tower calls over `n` tiles: TILE_CHUNKS[-1] tiles each, then the smallest
    chunk that holds the rest."""
    full, rest = divmod(n, TILE_CHUNKS[-1])
    return [TILE_CHUNKS[-1]] * full + ([smallest_at_least(rest, TILE_CHUNKS)] if rest else [])


class CompileWatch:
    """Counts and times JAX's tracing, lowering and compiling (its monitoring events) while a `with`
    block runs: how the benchmark shows that a warm engine compiles nothing, and how the command line
    reports the one-time cost of programs of new shapes. One listener serves every watch."""

    EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration")
    _open: list[CompileWatch] = []
    _listening = False

    def __init__(self):
        self.ended: list[tuple[float, float]] = []  # (perf_counter when it ended, seconds) of each event

    @property
    def count(self) -> int:
        return len(self.ended)

    @property
    def seconds(self) -> float:
        return sum(seconds for _, seconds in self.ended)

    def seconds_after(self, t: float) -> float:
        """Seconds of tracing, lowering and compiling that ended after perf_counter time `t`."""
        return sum(seconds for end, seconds in self.ended if end > t)

    def __enter__(self) -> CompileWatch:
        if not CompileWatch._listening:
            jax.monitoring.register_event_duration_secs_listener(CompileWatch._event)
            CompileWatch._listening = True
        CompileWatch._open.append(self)
        return self

    def __exit__(self, *exc) -> None:
        CompileWatch._open.remove(self)

    @staticmethod
    def _event(event: str, duration: float, **kwargs) -> None:
        if event in CompileWatch.EVENTS:
            now = time.perf_counter()
            for watch in CompileWatch._open:
                watch.ended.append((now, duration))


@struct.dataclass
class Slots:
    """The engine's state, per slot [B]: cache rows [B, L, ...]; lengths (tokens in the cache); token
    (the last sampled, fed next); done; remaining (tokens still allowed); generated (tokens produced,
    also each row's sampling step); seen [B, V] (prompt and answer tokens, for the repetition penalty);
    eos (-1: never stop at EOS); sampling (per-row settings)."""

    cache: KVCache
    lengths: jax.Array
    token: jax.Array
    done: jax.Array
    remaining: jax.Array
    generated: jax.Array
    seen: jax.Array
    eos: jax.Array
    sampling: RowSampling


@dataclasses.dataclass(frozen=True)
class Request:
    """One conversation, ready for the device (host numpy): ids [P] int32, src [P] int32 and image_mask
    [P] bool (the image-token layout, row-local), tiles [I, S, S, 3] uint8 or None."""

    ids: np.ndarray
    src: np.ndarray
    image_mask: np.ndarray
    tiles: np.ndarray | None

    @classmethod
    def from_output(cls, output, side: int) -> Request:
        """A `processor.ProcessorOutput` -> Request (`side`: image tokens per tile side). Ids that int32
        cannot hold are refused (InputError), not wrapped into the vocabulary."""
        given = np.asarray(output.input_ids)
        ids = given.astype(np.int32)
        if not np.array_equal(ids, given):
            raise InputError(f"the prompt's token ids must be int32 values; got {given[ids != given][:5].tolist()}.")
        mask = np.asarray(output.images_seq_mask, bool)
        tiles, src = image_token_sources(np.asarray(output.images_spatial_crop)[None], mask[None], side)
        used = output.pixels[tiles[:, 1]] if len(tiles) else None
        return cls(ids, src[0], mask, used)


@dataclasses.dataclass
class Prefill:
    """A prompt on its way into a slot (`Engine.plan`): its request, length and chunk plan
    (`Engine.chunk_plan`, from `start`: past a cached prefix); once begun (`Engine.begin`), its ids [L]
    and embeddings [L, D] on the device; the next chunk to run."""

    request: Request
    length: int
    plan: list[tuple[int, int, int, bool]]
    start: int = 0
    ids: jax.Array | None = None
    x: jax.Array | None = None
    next: int = 0

    @property
    def begun(self) -> bool:
        return self.x is not None

    @property
    def finished(self) -> bool:
        return self.next == len(self.plan)

    def next_chunk(self) -> int:
        """Tokens of the next chunk (its padded size)."""
        return self.plan[self.next][1]

    @property
    def at_first_chunk(self) -> bool:
        """Whether the next chunk is the prompt's first (a fresh chunk: `Engine.prefill_first` runs it)."""
        return not self.finished and self.plan[self.next][3]


def copy_row(v: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """`v` [B, ...] with row b a copy of row a (a != b)."""
    return v.at[b[None]].set(v[a[None]], unique_indices=True)


def swap_rows(v: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """`v` [B, ...] with rows a and b traded (a != b)."""
    pair = lambda i, j: jnp.stack([i, j])  # noqa: E731
    return v.at[pair(a, b)].set(v[pair(b, a)], unique_indices=True)


# A slot's cache rows moved as rows gathered, then scattered (distinct slots: `SlotPrefixes.choose`
# never moves a slot onto itself): in place, and under a mesh that splits the slots only the moved rows
# travel. (A swap as two row writes, the second reading the row the first overwrote, made XLA copy every
# cache array twice; a copy as a row write gathered the whole cache across a data-split mesh;
# `benchmarks/slot_moves.py` times the forms.)
SLOT_MOVES = {"copy": copy_row, "swap": swap_rows}


def slot_shapes(cfg: VL2Config, runtime: Runtime) -> tuple[int, tuple[int, ...]]:
    """(max_seq_len, prefill chunks) of an engine of `runtime` for a model of `cfg`: the runtime's
    max_seq_len (None: the model's context) and its chunks that fit it. Raises ConfigError where the
    two do not go together (checked as a model loads, before its weights)."""
    context = cfg.language.max_position_embeddings
    max_seq_len = runtime.max_seq_len or context
    if max_seq_len > context:
        raise ConfigError(f"max_seq_len {max_seq_len} is longer than the model's context ({context} tokens, "
                          "max_position_embeddings); leave it out to use the whole context.")
    chunks = tuple(sorted(c for c in runtime.prefill_chunks if c <= max_seq_len)) or (max_seq_len,)
    if any(c % chunks[0] for c in chunks):
        raise ConfigError(f"prefill_chunks {chunks} must all be multiples of the smallest, {chunks[0]}.")
    return max_seq_len, chunks


def check_token_ids(ids, vocab: int) -> None:
    """Raises InputError unless every token id (a sequence of ints, or an int array) is in [0, vocab)."""
    if len(ids) == 0:
        return
    low, high = (ids.min(), ids.max()) if isinstance(ids, np.ndarray) else (min(ids), max(ids))
    if low < 0 or high >= vocab:
        outside = [int(i) for i in ids if not 0 <= i < vocab]
        raise InputError(f"the prompt's token ids must be in [0, {vocab}); got {outside[:5]}.")


class Engine:
    """Fixed-shape programs of one model; see the module docstring. `params` are passed to each call."""

    def __init__(self, cfg: VL2Config, dtype, runtime: Runtime, pixel_norm: PixelNorm, pad_id: int, mesh=None):
        lc = cfg.language
        self.cfg, self.dtype, self.runtime, self.mesh = cfg, jnp.dtype(dtype), runtime, mesh
        self.layout = Layout(mesh) if mesh is not None else None
        self.pad_id, self.pixel_norm = pad_id, pixel_norm
        self.max_batch = runtime.max_batch
        self.max_seq_len, self.chunks = slot_shapes(cfg, runtime)
        # Room for the last chunk's padding past max_seq_len (the cache rows and the embedding buffer):
        # chunks start at multiples of the smallest, and each fits below the capacity (chunk_plan).
        self.capacity = -(-self.max_seq_len // self.chunks[0]) * self.chunks[0]
        self.key_buckets = powers_of_two(min(256, self.capacity), self.capacity)
        self.slot_buckets = powers_of_two(1, self.max_batch)  # (also the row counts of prompts prefilled together)
        self.side = cfg.tokens_per_tile_side
        # the most tiles a slot's image tokens can use (each tile brings at least side * side tokens)
        self.max_tiles = max(1, self.max_seq_len // self.side**2)
        self.table_rows = TILE_SOURCES + (self.max_tiles + TILE_CHUNKS[-1]) * self.side**2
        self.language = LanguageModel(lc, self.dtype.type, runtime)
        self.vl2 = VL2(cfg, self.dtype.type, runtime)
        self.executables: ExecutableStore | None = None  # see keep_executables
        self._loaded: dict[str, jax.stages.Compiled] = {}
        self._loading: dict[str, concurrent.futures.Future] = {}  # programs loads were started for
        self._absent: set[str] = set()  # programs `preload` found not in the store
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # (`preload`'s threads)

    @classmethod
    def of(cls, cfg: VL2Config, dtype, runtime: Runtime, processor, mesh=None) -> Engine:
        """The engine of a model of `cfg` in `dtype` with `processor` (for its pad id and pixel
        normalisation; None for a model without one: pad id 0), run as `runtime` says."""
        pad_id = processor.pad_id if processor is not None else 0
        norm = processor.pixel_norm if processor is not None else None
        return cls(cfg, dtype, runtime, norm, pad_id, mesh)

    def keep_executables(self, directory) -> ExecutableStore:
        """Keeps every program this engine compiles under `directory` and loads it from there in later
        processes, which then neither trace nor compile it (`vl2_jax.executables`). One device only:
        under a mesh, programs are compiled in each process (JAX's compilation cache still applies).
        The state's program, which every request runs first, starts loading at once (`preload`), then
        the rest of the folder's, those a first token needs first (`ExecutableStore.prefetch`). Keeping
        the same folder again returns the same store."""
        if self.mesh is not None:
            raise ConfigError("compiled programs are kept on disk for one device only, not under a mesh.")
        store = self.executables
        if store is not None and store.root == Path(directory).expanduser():
            return store  # (kept already, e.g. while the weights loaded)
        self.executables = ExecutableStore(directory, fingerprint(self.cfg, self.dtype, self.runtime,
                                                                  self.pixel_norm, self.pad_id))
        self.executables.prefetch(first=("state", "table", "encode", "embed", "prefill", "extend", "insert"))
        self._start("state()", self._new_state, (), ())  # (the first program a request runs: not queued)
        return self.executables

    def _call(self, name: str, jitted, args: tuple, static: tuple = ()):
        """`jitted(*args, *static)`; with `keep_executables`, through the program compiled (or loaded)
        once for `name`, the program's variant (its static arguments, and any shape they do not fix)."""
        if self.executables is None:
            return jitted(*args, *static)
        compiled = self._loaded.get(name)
        if compiled is None:
            loading = self._loading.get(name)
            try:
                compiled = loading.result() if loading is not None else None
            except Exception:  # noqa: BLE001 - a load that failed on its thread is tried again here
                compiled = None
            if compiled is None:
                compiled = self.executables.load_or_compile(name, jitted, args, static)
            compiled = self._loaded.setdefault(name, compiled)
        return compiled(*args)

    @functools.cached_property
    def ragged_decode(self) -> bool:
        """Whether decoding attends through the decode attention kernel (`attention.ragged_decode`), asked
        under the engine's mesh on first use (its self-check compiles a small kernel, once a process)."""
        with self._context():
            return ragged_decode(self.cfg.language, self.dtype, self.runtime, self.capacity)

    @functools.cached_property
    def decode_key_buckets(self) -> tuple[int, ...]:
        """The key lengths decode programs read: every live slot's keys up to a bucket, lengths at most
        1.5x apart from 512; where the decode attention kernel reads each slot's own keys in place, one
        (the capacity) serves them all."""
        if self.ragged_decode:
            return (self.capacity,)
        return (*sorted({b << i for b in (512, 768) for i in range(16) if b << i < self.capacity}), self.capacity)

    # -- memory ---------------------------------------------------------------------------------------
    def cache_bytes(self) -> int:
        """Bytes of the KV cache: max_batch x capacity tokens."""
        return KVCache.bytes_per_token(self.cfg.language, self.dtype) * self.max_batch * self.capacity

    def cache_bytes_per_device(self) -> int:
        """Bytes of the KV cache one device holds: its shard of each cache array under a mesh (a copy
        where the partition rules leave an array unsplit), all of it without one."""
        if self.mesh is None:
            return self.cache_bytes()
        shapes = self._state_shapes.cache
        return sum(math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                   for leaf, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(self.state_shardings.cache)))

    # -- placement ------------------------------------------------------------------------------------
    def _context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _put(self, *arrays: np.ndarray) -> list[jax.Array]:
        """Host arrays -> device arrays, replicated under a mesh, in one transfer call without one."""
        if self.mesh is None:
            return jax.device_put(list(arrays))
        replicated = NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return [jax.device_put(a, replicated) for a in arrays]

    # -- programs -------------------------------------------------------------------------------------
    def _make_state(self) -> Slots:
        """Every slot free (done), the cache zeroed (traced: the body of `_new_state`)."""
        lc, b = self.cfg.language, self.max_batch
        zeros = lambda dtype: jnp.zeros((b,), dtype)
        return Slots(
            KVCache.zeros(lc, b, self.capacity, self.dtype), zeros(jnp.int32), zeros(jnp.int32), jnp.ones((b,), bool),
            zeros(jnp.int32), zeros(jnp.int32), jnp.zeros((b, lc.vocab_size), bool), jnp.full((b,), -1, jnp.int32),
            RowSampling(zeros(jnp.float32), zeros(jnp.int32), jnp.ones((b,), jnp.float32),
                        jnp.ones((b,), jnp.float32), zeros(jnp.uint32)))

    @functools.cached_property
    def _state_shapes(self) -> Slots:
        """The state's shapes and dtypes (ShapeDtypeStructs), traced once."""
        return jax.eval_shape(self._make_state)

    @functools.cached_property
    def state_shardings(self) -> Slots | None:
        """Under a mesh: the cache by the partition rules, everything else replicated. Every program that
        returns the state pins it to these, so that its next call sees the shardings warmup compiled for."""
        if self.layout is None:
            return None
        shapes = self._state_shapes
        specs = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), shapes).replace(
            cache=self.layout.cache_specs(shapes.cache))
        return jax.tree.map(lambda p: NamedSharding(self.mesh, p), specs)

    @functools.cached_property
    def _replicated(self):
        return None if self.mesh is None else NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def _jit(self, fn, outputs, **kwargs):
        """jax.jit with the outputs' shardings pinned under a mesh (`outputs`: "state" alone, "first" of a
        (state, array) pair, or one replicated "array"), so that every call sees the inputs warmup saw."""
        if self.mesh is None:
            return jax.jit(fn, **kwargs)
        out = {"state": self.state_shardings, "first": (self.state_shardings, self._replicated),
               "array": self._replicated}[outputs]
        return jax.jit(fn, out_shardings=out, **kwargs)

    @functools.cached_property
    def _new_state(self):
        return self._jit(self._make_state, "state")

    @functools.cached_property
    def _release(self):
        """(state (donated), slots [B] bool) -> the state with those slots done; nothing decoded."""
        return self._jit(lambda state, slots: state.replace(done=state.done | slots), "state", donate_argnums=(0,))

    @functools.cached_property
    def _moves(self) -> dict:
        """{"copy": (state (donated), a, b) -> the state with slot b's cache rows a copy of slot a's,
        "swap": ... with the cache rows of slots a and b traded}: how the prefix cache brings a prefix
        down to a slot that keeps the decode program small and moves what that slot held up
        (`prefix_cache.SlotPrefixes.choose`)."""
        def program(move):
            def run(state: Slots, a, b):
                layers = tuple({k: move(v, a, b) for k, v in layer.items()} for layer in state.cache.layers)
                return state.replace(cache=state.cache.replace(layers=layers))

            return self._jit(run, "state", donate_argnums=(0,))

        return {kind: program(move) for kind, move in SLOT_MOVES.items()}

    def move_slots(self, state: Slots, kind: str, a: int, b: int) -> Slots:
        """Slot `b`'s cache rows become a copy of slot `a`'s (`kind` "copy"), or the two trade their rows
        ("swap"); `b` free, and `a` free or (a copy) decoding: its rows are only read (dispatched, not
        awaited)."""
        with self._context():
            return self._call(f"{kind}()", self._moves[kind], (state, np.int32(a), np.int32(b)))

    def new_state(self) -> Slots:
        """Every slot free (done), the cache zeroed. Refuses, before compiling anything, a cache that the
        device's free memory cannot hold (where the device reports its memory)."""
        self.check_memory()
        with self._context():
            return self._call("state()", self._new_state, ())

    def check_memory(self) -> None:
        """Refuses a cache that cannot fit, before anything is compiled: beside what the device holds
        (its `memory_stats`), or, on a CPU, in the memory the system has available, which this process's
        devices share: there their shards add up."""
        need = self.cache_bytes_per_device()
        device = jax.local_devices()[0]  # (a device of this process: others' can't be asked)
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            free, where = stats["bytes_limit"] - stats.get("bytes_in_use", 0), "per device but {} GB is free"
        elif device.platform == "cpu" and (free := available_memory()) is not None:
            local = 1 if self.mesh is None else sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
            need, where = need * local, "but the system has {} GB of memory available"
        else:
            return
        if need > free:
            raise ConfigError(
                f"the KV cache of max_batch={self.max_batch} x max_seq_len={self.max_seq_len} needs "
                f"{need / 1e9:.2f} GB {where.format(f'{free / 1e9:.2f}')}; load the model with a smaller "
                "Runtime(max_batch=..., max_seq_len=...) (--max-batch, --max-seq-len on the command line).")

    @functools.cached_property
    def _new_table(self):
        """(newline [D], separator [D]) -> a feature table [R, D]: the two layout rows, then zeros where
        the tiles' tokens go."""

        def table(newline, separator):
            out = jnp.zeros((self.table_rows, self.cfg.language.hidden_size), self.dtype)
            return out.at[NEWLINE_SOURCE].set(newline.astype(self.dtype)).at[SEPARATOR_SOURCE].set(separator.astype(self.dtype))

        return self._jit(table, "array")

    @functools.cached_property
    def _encode(self):
        """(params, table [R, D] (donated), tiles [I, S, S, 3] uint8, places [I] int32) -> the table with
        each tile's projected tokens written at its place (the tile's index in the prompt; padding tiles
        at `max_tiles` and after, rows never read)."""
        norm, hw = self.pixel_norm, self.side**2

        def encode(params, table, tiles, places):
            feats = self.vl2.apply(params, normalize_pixels(tiles, norm), method=VL2.image_features)
            rows = feats.reshape(tiles.shape[0], hw, feats.shape[-1]).astype(table.dtype)
            for i in range(tiles.shape[0]):
                table = jax.lax.dynamic_update_slice_in_dim(table, rows[i], TILE_SOURCES + places[i] * hw, 0)
            return table

        return self._jit(encode, "array", donate_argnums=(1,))

    @functools.cached_property
    def _take_tile(self):
        """(table [R, D], place) -> the tile's tokens [side * side, D] (a copy, to keep)."""
        hw = self.side**2
        return self._jit(lambda table, place: jax.lax.dynamic_slice_in_dim(table, TILE_SOURCES + place * hw, hw, 0),
                         "array")

    @functools.cached_property
    def _put_tile(self):
        """(table [R, D] (donated), tokens [side * side, D], place) -> the table with them at the place."""
        hw = self.side**2
        return self._jit(lambda table, rows, place: jax.lax.dynamic_update_slice_in_dim(
            table, rows, TILE_SOURCES + place * hw, 0), "array", donate_argnums=(0,))

    @functools.cached_property
    def _embed(self):
        """(params, ids [L], src [L], image mask [L], table [R, D]) -> x [L, D]: token embeddings, image
        positions taken from the table."""

        def embed(params, ids, src, mask, table):
            x = self.language.apply({"params": params["params"]["language"]}, ids[None],
                                    method=LanguageModel.embed)[0]
            return jnp.where(mask[:, None], table[src].astype(x.dtype), x)

        return self._jit(embed, "array")

    @functools.cached_property
    def _prefill(self):
        """(language params, state (donated), xs: N embeddings [L, D], slots [N], lasts [N], C) -> (state,
        logits [N, V]): the first C tokens of N prompts, each into its slot (slot B: a padding row)."""

        def prefill(params, state: Slots, xs, slot_N, last_N, chunk):
            x_NCD = jnp.stack([x_LD[:chunk] for x_LD in xs])
            logits, cache = self.language.apply(params, x_NCD, last_N, state.cache, slot_N,
                                                method=LanguageModel.prefill)
            return state.replace(cache=cache), logits

        return self._jit(prefill, "first", donate_argnums=(1,), static_argnums=(5,))

    @functools.cached_property
    def _extend(self):
        """(language params, state (donated), xs: N embeddings [L, D], slots [N], starts [N], lasts [N], C, S)
        -> (state, logits [N, V]): a later chunk of C tokens of N prompts, each from its start into its slot
        (slot B: a padding row), attending to the first S entries of the slot."""

        def extend(params, state: Slots, xs, slot_N, start_N, last_N, chunk, keys):
            x_NCD = jnp.stack([jax.lax.dynamic_slice_in_dim(x_LD, start_N[i], chunk, 0) for i, x_LD in enumerate(xs)])
            logits, cache = self.language.apply(params, x_NCD, start_N, last_N, state.cache, slot_N, keys,
                                                method=LanguageModel.extend)
            return state.replace(cache=cache), logits

        return self._jit(extend, "first", donate_argnums=(1,), static_argnums=(6, 7))

    @functools.cached_property
    def _insert(self):
        """(state (donated), logits [N, V], ids: N [L], lengths [N], slots [N], max_new [N], eos [N],
        settings [N], greedy) -> (state, first [N, 2] int32: each row's first token sampled, then 1 if its
        slot is already done): the rows' slots live (slot B: a padding row, written nowhere)."""

        def insert(state: Slots, logits_NV, ids, length_N, slot_N, max_new_N, eos_N, settings: RowSampling, greedy):
            n, v = logits_NV.shape
            ids_NL = jnp.stack(ids)
            prompt_NL = jnp.arange(ids_NL.shape[1])[None, :] < length_N[:, None]
            seen_NV = jnp.zeros((n, v), bool).at[jnp.arange(n)[:, None], ids_NL].max(prompt_NL)
            first = sample_rows(logits_NV, seen_NV, settings, jnp.zeros((n,), jnp.int32), greedy)
            remaining = jnp.minimum(max_new_N, self.max_seq_len - length_N) - 1
            done = (first == eos_N) | (remaining <= 0)
            put = lambda per_slot, rows: per_slot.at[slot_N].set(rows, mode="drop")
            state = state.replace(
                lengths=put(state.lengths, length_N), token=put(state.token, first), done=put(state.done, done),
                remaining=put(state.remaining, remaining), generated=put(state.generated, jnp.ones((n,), jnp.int32)),
                seen=put(state.seen, seen_NV.at[jnp.arange(n), first].set(True)), eos=put(state.eos, eos_N),
                sampling=jax.tree.map(put, state.sampling, settings))
            return state, jnp.stack([first, done.astype(jnp.int32)], axis=1)

        return self._jit(insert, "first", donate_argnums=(0,), static_argnums=(8,))

    @functools.cached_property
    def _decode(self):
        """(language params, state (donated), stop [B] bool, N, S, greedy) -> (state, out [N, T + 1]), T =
        `decode_steps(N)`: up to T tokens for slots 0..N-1 (NO_TOKEN where a slot produced none), then 1
        where the slot is done; `stop` ends slots before the first step (stop strings found by the host)."""
        language = self.language

        def decode(params, state: Slots, stop_B, n, keys, greedy):
            state = state.replace(done=state.done | stop_B)
            steps = self.steps(n)
            out = jnp.full((n, steps), NO_TOKEN, jnp.int32)

            def body(i, carry):
                s, out = carry
                live = ~s.done[:n]
                x = language.apply(params, s.token[:n, None], method=LanguageModel.embed)
                logits, cache = language.apply(params, x, s.lengths[:n], s.cache, keys, live,
                                               method=LanguageModel.decode)
                rows = jax.tree.map(lambda a: a[:n], s.sampling)
                tok = sample_rows(logits, s.seen[:n], rows, s.generated[:n], greedy)
                step = live.astype(jnp.int32)
                remaining = s.remaining[:n] - step
                done = s.done[:n] | (live & ((tok == s.eos[:n]) | (remaining <= 0)))
                idx = jnp.arange(n)
                s = s.replace(
                    cache=cache, lengths=s.lengths.at[:n].add(step), token=s.token.at[:n].set(jnp.where(live, tok, s.token[:n])),
                    done=s.done.at[:n].set(done), remaining=s.remaining.at[:n].set(remaining),
                    generated=s.generated.at[:n].add(step), seen=s.seen.at[idx, tok].max(live))
                return s, out.at[:, i].set(jnp.where(live, tok, NO_TOKEN))

            # A fixed trip count, with no early exit when every slot is done: a data-dependent loop
            # condition makes the GPU runtime read it back to the host at each step, which blocks the
            # host's dispatch until the loop ends (no overlap of host work with the next call).
            state, out = jax.lax.fori_loop(0, steps, body, (state, out))
            return state, jnp.concatenate([out, state.done[:n, None].astype(jnp.int32)], axis=1)

        return self._jit(decode, "first", donate_argnums=(1,), static_argnums=(3, 4, 5))

    # -- host side ------------------------------------------------------------------------------------
    @staticmethod
    def embed_params(params) -> dict:
        """What embedding reads (each leaf passed to a jitted call costs host time): the token embedding
        table, and the LM head, which the language model's setup declares."""
        language = params["params"]["language"]
        return {"params": {"language": {k: language[k] for k in ("embed", "lm_head")}}}

    @staticmethod
    def vision_params(params) -> dict:
        """What encoding tiles reads: the vision tower and the projector (and the two layout rows, which
        the model's setup declares)."""
        p = params["params"]
        return {"params": {k: p[k] for k in ("vision", "projector", "image_newline", "view_separator")}}

    @staticmethod
    def layout_rows(params) -> tuple:
        """The image newline and view separator embeddings [D], the feature table's first rows."""
        return params["params"]["image_newline"], params["params"]["view_separator"]

    @staticmethod
    def language_params(params) -> dict:
        return {"params": params["params"]["language"]}

    def check(self, request: Request) -> None:
        """Refuses a request that cannot run: token ids outside the vocabulary, a prompt that leaves no
        room for an answer in a slot, more image tiles than a slot holds."""
        check_token_ids(request.ids, self.cfg.language.vocab_size)
        p, context = len(request.ids), self.cfg.language.max_position_embeddings
        if p > self.max_seq_len - 1:
            holds = (f"the model's context is {context} tokens (max_position_embeddings)" if self.max_seq_len == context
                     else f"a slot holds {self.max_seq_len} tokens (max_seq_len)")
            raise PromptTooLong(f"the prompt has {p} tokens but {holds}, leaving no room for an answer; shorten the "
                                "prompt or use fewer images" + ("." if self.max_seq_len == context else
                                                                ", or load the model with a larger max_seq_len (--max-seq-len on the command line)."),
                                p, self.max_seq_len - 1)
        tiles = 0 if request.tiles is None else len(request.tiles)
        if tiles > self.max_tiles:
            raise InputError(f"the prompt has {tiles} image tiles, more than the {self.max_tiles} a "
                             f"{self.max_seq_len}-token slot can hold; use fewer images.")

    def tile_plan(self, tiles: np.ndarray | None, todo: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(places [I] int32, tiles [I, S, S, 3]) of each vision-tower call over the tiles numbered in
        `todo`, in chunks of `tile_chunks` (zero tiles pad a partial one, placed at `max_tiles` and after:
        their tokens are never read)."""
        out = []
        for at, size in zip(range(0, len(todo), TILE_CHUNKS[-1]), tile_chunks(len(todo))):
            part = todo[at:at + TILE_CHUNKS[-1]]
            chunk = np.zeros((size, *tiles.shape[1:]), np.uint8)
            chunk[: len(part)] = tiles[part]
            places = np.array([*part, *range(self.max_tiles, self.max_tiles + size - len(part))], np.int32)
            out.append((places, chunk))
        return out

    def chunk_plan(self, length: int, start: int = 0) -> list[tuple[int, int, int, bool]]:
        """(start, chunk, keys, fresh) of each prefill program a prompt of `length` tokens runs from
        `start` (0, or past a cached prefix: a multiple of the smallest chunk): the smallest chunk that
        holds the rest, else the largest, of those that end within the capacity (past a prefix, of those
        up to CONTINUED_CHUNK_MAX)."""
        plan, continued = [], start > 0
        if start % self.chunks[0] or not 0 <= start < length:
            raise ValueError(f"a plan starts at a multiple of {self.chunks[0]} before the prompt's end (got {start})")
        while start < length:
            rest = length - start
            fits = [c for c in self.chunks if start + c <= self.capacity
                    and not (continued and c > max(self.chunks[0], CONTINUED_CHUNK_MAX))]
            chunk = next((c for c in fits if c >= rest), fits[-1])
            fresh = start == 0
            plan.append((start, chunk, chunk if fresh else smallest_at_least(start + chunk, self.key_buckets), fresh))
            start += chunk
        return plan

    def plan(self, request: Request, start: int = 0) -> Prefill:
        """Checks `request` -> the `Prefill` whose chunks `prefill_first` (its first, with other prompts')
        and `prefill_later` (the later ones, with other prompts') write into a slot, once `begin` has put
        it on the device.
        `start` > 0 (a multiple of the smallest chunk; `runtime.prefix_cache`): the slot already holds
        the prompt's first `start` tokens. Host work only."""
        self.check(request)
        if start and not self.runtime.prefix_cache:
            raise ValueError("continuing past a cached prefix needs Runtime(prefix_cache=True)")
        return Prefill(request, len(request.ids), self.chunk_plan(len(request.ids), start), start)

    def begin(self, params, prefill: Prefill, features: TileFeatures | None = None,
              digests: list[int] | None = None) -> None:
        """Puts `prefill`'s prompt on the device and dispatches its tile encoding and embedding (its
        `ids` and `x`). Tiles whose tokens all lie before its `start` are not encoded; with `features`
        (and the tiles' `digests`, `prefix_cache.tile_digests`), neither are those found there, and those
        encoded are kept there. Called just before the prompt's first chunk runs, so that a prompt
        admitted later than others does not put its tiles' encoding ahead of their prefill."""
        request, start = prefill.request, prefill.start
        p, length = prefill.length, self.capacity
        pad = lambda a, value: np.pad(a, (0, length - p), constant_values=value)
        n = 0 if request.tiles is None else len(request.tiles)
        todo = list(range(self.tiles_before(request, start), n))
        kept = {}
        if features is not None:
            kept = {i: found for i in todo if (found := features.get(digests[i])) is not None}
            todo = [i for i in todo if i not in kept]
        chunks = self.tile_plan(request.tiles, todo)
        host = [pad(request.ids, self.pad_id).astype(np.int32), pad(request.src, 0).astype(np.int32),
                pad(request.image_mask, False), *(c for _, c in chunks)]
        with self._context():
            ids, src, mask, *tiles = self._put(*host)
            table = self._call("table()", self._new_table, self.layout_rows(params))
            for (places, _), chunk in zip(chunks, tiles):
                table = self._call(f"encode({len(chunk)},)", self._encode,
                                   (self.vision_params(params), table, chunk, places))
            for i, rows in kept.items():
                table = self._call("put()", self._put_tile, (table, rows, np.int32(i)))
            if features is not None:
                for i in todo:
                    features.put(digests[i], self._call("take()", self._take_tile, (table, np.int32(i))))
            prefill.x = self._call("embed()", self._embed, (self.embed_params(params), ids, src, mask, table))
            prefill.ids = ids

    def tiles_before(self, request: Request, start: int) -> int:
        """How many of the request's tiles have no token at or after position `start`."""
        later = request.src[start:][request.image_mask[start:]] - TILE_SOURCES
        later = later[later >= 0] // self.side**2
        return int(later.min()) if len(later) else (0 if request.tiles is None else len(request.tiles))

    def rows_for(self, chunk: int) -> tuple[int, ...]:
        """The row counts of prefill calls whose longest first chunk is `chunk` tokens: one, and those
        that fit `Runtime.prefill_tokens` (rows x chunk)."""
        return tuple(n for n in self.slot_buckets if n == 1 or n * chunk <= self.runtime.prefill_tokens)

    def pick_together(self, prefills: list[Prefill], budget: int | None = None) -> list[int]:
        """Which of `prefills` (indices, in order) one `prefill_first` call takes: the first, if it is at
        its first chunk, with the others at their first chunk of the same length while a row count of
        `rows_for` that length holds them, and then shorter first chunks in the rows that count pads
        anyway (so no prompt is padded to a longer one's chunk at a cost). With `budget`, the call's
        rows x chunk stays within it ([]: the first alone does not fit, or is past its first chunk)."""
        if not prefills or not prefills[0].at_first_chunk:
            return []
        chunk = prefills[0].next_chunk()
        rows = [n for n in self.rows_for(chunk) if budget is None or n * chunk <= budget]
        if not rows:
            return []
        firsts = [i for i, p in enumerate(prefills) if p.at_first_chunk]
        same = [i for i in firsts if prefills[i].next_chunk() == chunk][: rows[-1]]
        spare = smallest_at_least(len(same), tuple(rows)) - len(same)
        shorter = [i for i in firsts if prefills[i].next_chunk() < chunk][:spare]
        return sorted(same + shorter)

    def prefill_first(self, params, state: Slots, entries: list[tuple[int, Prefill]]) -> tuple[Slots, jax.Array]:
        """The first chunk of each (slot, prompt) in `entries` into its slot, in one call padded to the
        longest's chunk and to a row count of `rows_for` it (`pick_together` picks them) -> (state,
        logits [N, V] on the device: row i for entries[i]'s last token in the chunk, rows past the
        entries padding). Dispatched, not awaited."""
        if not all(p.at_first_chunk and p.begun for _, p in entries):
            raise ValueError("prefill_first runs begun prompts at their first chunk; later ones go through prefill_later")
        chunk = max(p.next_chunk() for _, p in entries)
        n = smallest_at_least(len(entries), self.rows_for(chunk))
        xs, slots, pad = self._padded(entries, n)
        lasts = np.array([min(p.length, chunk) - 1 for _, p in entries] + [0] * pad, np.int32)
        with self._context():
            state, logits = self._call(f"prefill{(n, chunk)}", self._prefill,
                                       (self.language_params(params), state, xs, slots, lasts), (chunk,))
        for _, p in entries:
            p.next += 1
        return state, logits

    def _padded(self, entries: list[tuple[int, Prefill]], n: int) -> tuple[tuple, np.ndarray, int]:
        """(embeddings, slots int32 [n], padding rows) of a prefill call's `entries` (slot, prompt) padded
        to `n` rows: a padding row repeats the first prompt's embeddings for slot `max_batch`, past the
        cache's rows (written nowhere, routed nowhere)."""
        pad = n - len(entries)
        xs = tuple(p.x for _, p in entries) + (entries[0][1].x,) * pad
        return xs, np.array([slot for slot, _ in entries] + [self.max_batch] * pad, np.int32), pad

    def extend_rows(self, chunk: int) -> tuple[int, ...]:
        """The row counts of calls that write later chunks of `chunk` tokens: one, and EXTEND_ROWS where
        `rows_for` holds it (a few programs more, not one per row count)."""
        return tuple(n for n in self.rows_for(chunk) if n in (1, EXTEND_ROWS))

    def pick_later(self, prefills: list[Prefill], budget: int | None = None) -> list[int]:
        """Which of `prefills` (indices, in order) one `prefill_later` call takes: the first, if it is past
        its first chunk (or continues past a cached prefix), with the others there whose next chunk has
        the same length, up to the largest row count of `extend_rows` and, with `budget`, while the call's
        rows x chunk stays within it ([]: the first is at its first chunk, or alone does not fit)."""
        if not prefills or prefills[0].at_first_chunk or prefills[0].finished:
            return []
        chunk = prefills[0].next_chunk()
        rows = [n for n in self.extend_rows(chunk) if budget is None or n * chunk <= budget]
        if not rows:
            return []
        same = [i for i, p in enumerate(prefills)
                if not p.finished and not p.at_first_chunk and p.next_chunk() == chunk]
        return same[: rows[-1]]

    def prefill_later(self, params, state: Slots, entries: list[tuple[int, Prefill]]) -> tuple[Slots, jax.Array]:
        """The next chunk of each (slot, prompt) in `entries`, one past its first (`prefill_first` writes
        those) or past a cached prefix, all of one chunk length (`pick_later` picks them), in one call
        padded to a row count of `extend_rows` -> (state, logits [N, V] on the device: row i for
        entries[i]'s last token in the chunk, rows past the entries padding). Dispatched, not awaited."""
        steps = [p.plan[p.next] for _, p in entries]
        if (any(fresh for *_, fresh in steps) or len({chunk for _, chunk, _, _ in steps}) != 1
                or not all(p.begun for _, p in entries)):
            raise ValueError("prefill_later runs begun prompts' later chunks of one length; a prompt's first chunk "
                             "goes through prefill_first")
        chunk, keys = steps[0][1], max(k for _, _, k, _ in steps)
        n = smallest_at_least(len(entries), self.extend_rows(chunk))
        xs, slots, pad = self._padded(entries, n)
        as_int32 = lambda values: np.array(values, np.int32)
        starts = as_int32([start for start, *_ in steps] + [0] * pad)
        lasts = as_int32([min(p.length - 1 - start, chunk - 1) for (_, p), (start, *_) in zip(entries, steps)] + [0] * pad)
        with self._context():
            state, logits = self._call(f"extend{(n, chunk, keys)}", self._extend,
                                       (self.language_params(params), state, xs, slots, starts, lasts), (chunk, keys))
        for _, p in entries:
            p.next += 1
        return state, logits

    def insert(self, state: Slots, logits: jax.Array, rows: list[tuple[int, Prefill, int, RowSampling, int] | None]
               ) -> tuple[Slots, jax.Array]:
        """Samples the first token of each prompt in `rows` ((slot, prefill, max_new, settings, eos), the
        prefill finished; None: a row of `logits` [N, V] with nothing to insert) from its row of `logits`
        and makes its slot live -> (state, first [N, 2] int32 on the device: row i's token, then 1 if
        its answer already ended). Rows past `rows` pad."""
        n = logits.shape[0]
        real = [row for row in rows if row is not None]
        if not real or any(not prefill.finished for _, prefill, *_ in real):
            raise ValueError("insert needs at least one prompt, each with every chunk prefilled")
        blank = (self.max_batch, real[0][1], 1, RowSampling.make(), -1)
        rows = [row or blank for row in rows] + [blank] * (n - len(rows))
        settings = jax.tree.map(lambda *v: np.stack(v), *(row[3] for row in rows))
        greedy = all(bool(row[3].temperature == 0) for row in real)
        as_int32 = lambda i: np.array([row[i] for row in rows], np.int32)
        with self._context():
            return self._call(f"insert{(n, greedy)}", self._insert, (
                state, logits, tuple(p.ids for _, p, *_ in rows), np.array([p.length for _, p, *_ in rows], np.int32),
                as_int32(0), as_int32(2), as_int32(4), settings), (greedy,))

    def steps(self, n: int) -> int:
        """Tokens per decode call over the live-slot bucket `n`: `decode_steps` at this runtime's steps,
        at most a slot's tokens (a call runs all its steps: more could only produce past a full slot)."""
        return decode_steps(n, min(self.runtime.decode_steps, self.max_seq_len))

    def decode(self, params, state: Slots, live: int, longest: int, greedy: bool, stop: np.ndarray | None = None):
        """Up to T = `decode_steps(N)` tokens for slots 0..live-1 -> (state, out [N, T + 1] on the device,
        N the bucket of `live`: each slot's tokens, NO_TOKEN where it produced none, then 1 if it is
        done). `longest`: an upper bound of the live slots' cached lengths (picks the key bucket)."""
        n = smallest_at_least(live, self.slot_buckets)
        keys = smallest_at_least(min(longest + self.steps(n), self.capacity), self.decode_key_buckets)
        stop = np.zeros((self.max_batch,), bool) if stop is None else stop
        with self._context():
            return self._call(f"decode{(n, keys, greedy)}", self._decode, (self.language_params(params), state, stop),
                              (n, keys, greedy))

    # -- warmup ---------------------------------------------------------------------------------------
    def programs(self) -> list[tuple[str, tuple]]:
        """Every program variant the engine can run, as (kind, static arguments)."""
        out = [("table", ()), *(("encode", (c,)) for c in TILE_CHUNKS), ("take", ()), ("put", ()), ("embed", ())]
        # first chunks, N prompts together; then every later (chunk, keys) that some prompt length's plan
        # runs (and, with the prefix cache, from every start past a prefix)
        out += [("prefill", (n, c)) for c in self.chunks for n in self.rows_for(c)]
        c0 = self.chunks[0]
        starts = range(0, self.max_seq_len - 1, c0) if self.runtime.prefix_cache else (0,)
        later = {step[1:3] for start in starts for length in range(start + 1, self.max_seq_len)
                 for step in self.chunk_plan(length, start) if not step[3]}
        out += [("extend", (n, chunk, keys)) for chunk, keys in sorted(later) for n in self.extend_rows(chunk)]
        out += [("insert", (n, g)) for n in self.rows_for(c0) for g in (True, False)] + [("release", ())]
        out += [("copy", ()), ("swap", ())] if self.runtime.prefix_cache else []
        out += [("decode", (n, k, g)) for n in self.slot_buckets for k in self.decode_key_buckets for g in (True, False)]
        return out

    def forecast(self, prefills: list[Prefill], greedy: list[bool], live: int, longest: int, max_new: int,
                 decode_greedy: bool) -> list[tuple[str, tuple]]:
        """The programs (entries of `programs()`) that prefilling the just admitted `prefills` (`greedy`:
        whether each samples greedily) and then decoding up to `max_new` tokens over the first `live`
        slots (`longest`: the live slots' longest cached length, 0 if none; `decode_greedy`: all of
        them greedy) will likely run: what `preload` loads ahead. First chunks are grouped as
        `pick_together` groups them (without a prefill budget, and without prompts admitted earlier)."""
        out = [("table", ()), ("embed", ()), ("release", ())]
        out += [("copy", ()), ("swap", ()), ("take", ()), ("put", ())] if self.runtime.prefix_cache else []
        for p, g in zip(prefills, greedy):
            out += [("encode", (size,)) for size in tile_chunks(0 if p.request.tiles is None else len(p.request.tiles))]
            later = [("extend", (n, chunk, keys)) for _, chunk, keys, fresh in p.plan if not fresh
                     for n in self.extend_rows(chunk)]
            if later:  # (its first token after its last chunk, alone or with others')
                out += later + [("insert", (n, g)) for n in self.extend_rows(p.plan[-1][1])]
        waiting = [i for i, p in enumerate(prefills) if p.at_first_chunk]
        while waiting:  # (the first chunks' calls, as `Batcher._prefill` makes them)
            group = [waiting[i] for i in self.pick_together([prefills[i] for i in waiting])]
            chunk = max(prefills[i].next_chunk() for i in group)
            n = smallest_at_least(len(group), self.rows_for(chunk))
            out.append(("prefill", (n, chunk)))
            if any(len(prefills[i].plan) == 1 for i in group):
                out.append(("insert", (n, all(greedy[i] for i in group if len(prefills[i].plan) == 1))))
            waiting = [i for i in waiting if i not in group]
        n = smallest_at_least(live, self.slot_buckets)
        steps = self.steps(n)
        # from the first call after the first tokens to the call that fills the longest answer (the host
        # sends no call past the answers' ends: `Batcher.step`)
        low = max([longest, *(p.length + 1 for p in prefills)]) + steps
        high = max([longest, *(p.length for p in prefills)]) + max_new + steps
        first, last = (smallest_at_least(min(x, self.capacity), self.decode_key_buckets) for x in (low, high))
        out += [("decode", (n, k, decode_greedy)) for k in self.decode_key_buckets if first <= k <= last]
        return list(dict.fromkeys(out))

    def preload(self, params, state: Slots, programs: list[tuple[str, tuple]]) -> int:
        """Starts loading, side by side on background threads, those of `programs` (entries of
        `programs()`) that `keep_executables`' store holds and this process has not loaded, so that a
        request's programs load together rather than one by one as its calls reach them (a decode
        program would otherwise load in the middle of an answer). A call that needs one waits for it.
        Programs not in the store are left to compile at their first call. -> how many it started."""
        store = self.executables
        if store is None:
            return 0
        todo = [(kind, static) for kind, static in programs if f"{kind}{static}" not in
                self._loaded.keys() | self._loading.keys() | self._absent]
        if not todo:
            return 0
        abstract = lambda x: (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=x.weak_type)
                              if isinstance(x, jax.Array) else x)
        placed = abstract(jax.tree.leaves(state)[0]).sharding  # (where the engine's arrays live)
        like = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=placed)
        length, s = self.capacity, self.cfg.vision.image_size
        host = (like((length,), np.int32), like((length,), np.int32), like((length,), np.bool_))
        stand_ins = {**self._stand_ins(like), **{("tiles", c): like((c, s, s, 3), np.uint8) for c in TILE_CHUNKS}}
        started = 0
        for kind, static in todo:
            fn, args, static_args = self._warmup_call(kind, static, params, state, host, stand_ins)
            # (shapes and placements only: the calls may donate `state` meanwhile)
            started += self._start(f"{kind}{static}", fn, jax.tree.map(abstract, args), static_args)
        return started

    def _start(self, name: str, fn, args: tuple, static: tuple) -> bool:
        """Starts loading program `name` on `preload`'s threads, if the store holds it -> whether it did.
        One it does not hold is not looked for again (it is compiled at its first call, and kept)."""
        if not self.executables.holds(name, args, static):
            self._absent.add(name)
            return False
        if self._pool is None:
            self._pool = loading_pool(8, "vl2-preload")

        def load():
            with self._context():
                return self.executables.load_or_compile(name, fn, args, static)

        self._loading[name] = self._pool.submit(load)
        return True

    def _stand_ins(self, make: Callable) -> dict:
        """Stand-ins for what earlier programs make (the feature table, embeddings, a tile's tokens, the
        logits of each prefill row count), each `make(shape, dtype)`: for `_warmup_call`'s `made`."""
        d, vocab = self.cfg.language.hidden_size, self.cfg.language.vocab_size
        return {"table": make((self.table_rows, d), self.dtype), "x": make((self.capacity, d), self.dtype),
                "tile": make((self.side**2, d), self.dtype),
                **{("logits", n): make((n, vocab), jnp.float32) for n in self.rows_for(self.chunks[0])}}

    def _warmup_call(self, kind: str, static: tuple, params, state: Slots, host: tuple, made: dict):
        """(jitted program, its dynamic arguments, its static ones) for one entry of `programs()`; `host`: ids, src, mask on the
        device; `made`: the feature table, embeddings and logits that earlier programs made (or arrays of
        their shape and placement)."""
        lc, s, lm = self.cfg.language, self.cfg.vision.image_size, self.language_params(params)
        ids, src, mask = host
        if kind == "table":
            return self._new_table, self.layout_rows(params), ()
        if kind == "encode":  # (the tile count is a shape, not a static argument)
            tiles = made.get(("tiles", static[0]))
            if tiles is None:
                tiles = self._put(np.zeros((static[0], s, s, 3), np.uint8))[0]
            return self._encode, (self.vision_params(params), made["table"], tiles, np.arange(static[0], dtype=np.int32)), ()
        if kind == "take":
            return self._take_tile, (made["table"], np.int32(0)), ()
        if kind == "put":
            return self._put_tile, (made["table"], made["tile"], np.int32(0)), ()
        if kind == "embed":
            return self._embed, (self.embed_params(params), ids, src, mask, made["table"]), ()
        if kind == "prefill":
            n, chunk = static
            zeros = np.zeros((n,), np.int32)
            return self._prefill, (lm, state, (made["x"],) * n, zeros, zeros), (chunk,)
        if kind == "extend":
            n, chunk, keys = static
            rows = lambda value: np.full((n,), value, np.int32)
            return self._extend, (lm, state, (made["x"],) * n, rows(0), rows(keys - chunk), rows(0)), (chunk, keys)
        if kind == "release":
            return self._release, (state, np.zeros((self.max_batch,), bool)), ()
        if kind in ("copy", "swap"):  # (two distinct slots where there are two)
            return self._moves[kind], (state, np.int32(0), np.int32(min(1, self.max_batch - 1))), ()
        if kind == "insert":
            n, greedy = static
            settings = jax.tree.map(lambda v: np.stack([v] * n), RowSampling.make())
            rows = lambda value: np.full((n,), value, np.int32)
            return self._insert, (state, made[("logits", n)], (ids,) * n, rows(1), rows(0), rows(2),
                                  rows(lc.eos_token_id), settings), (greedy,)
        return self._decode, (lm, state, np.zeros((self.max_batch,), bool)), static

    def warmup(self, params, progress: Callable[[int, int, str], None] | None = None,
               state: Slots | None = None, threads: int | None = None) -> dict:
        """Compiles every program in `programs()`, so that no request compiles or traces later: first all
        of them ahead of time on `threads` threads (default: one per CPU core, up to 16; XLA compiles in
        parallel), then runs each once. `progress(done, total, name)` after each compile. `state`
        (donated) is used as scratch and freed: every slot is done afterwards. Returns (the state,
        {"programs": n, "seconds": s, "compile_seconds": the part spent compiling or loading them})."""
        t0 = time.perf_counter()
        programs = self.programs()
        state = self.new_state() if state is None else state
        length = self.capacity
        with self._context():
            host = tuple(self._put(np.full((length,), self.pad_id, np.int32), np.zeros((length,), np.int32),
                                   np.zeros((length,), bool)))
            # placed as program outputs are (a different placement would be a different program below)
            stand_ins = self._stand_ins(lambda shape, dtype: self._jit(lambda: jnp.zeros(shape, dtype), "array")())
            calls = [self._warmup_call(kind, static, params, state, host, stand_ins) for kind, static in programs]
        lock, done = threading.Lock(), [0]

        def compile_one(i: int) -> None:
            fn, args, static = calls[i]
            name = "{}{}".format(*programs[i])
            with self._context():
                if self.executables is None:
                    fn.lower(*args, *static).compile()
                else:
                    self._loaded[name] = self.executables.load_or_compile(name, fn, args, static)
            with lock:
                done[0] += 1
                if progress:
                    progress(done[0], len(programs), "{}{}".format(*programs[i]))

        workers = threads or min(16, os.cpu_count() or 1)
        pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="vl2-warmup")
        try:
            list(pool.map(compile_one, range(len(programs))))
        except KeyboardInterrupt:  # (the compiles not begun are dropped, those under way not waited for)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        compiled_s = time.perf_counter() - t0
        made: dict = {}
        with self._context():  # each program once (compiled above: no tracing or compiling here)
            for kind, static in programs:
                fn, args, static_args = self._warmup_call(kind, static, params, state, host, made)
                out = self._call(f"{kind}{static}", fn, args, static_args)
                if kind in ("table", "encode", "put"):
                    made["table"] = out
                elif kind == "take":
                    made["tile"] = out
                elif kind == "embed":
                    made["x"] = out
                elif kind in ("prefill", "extend"):
                    state, made[("logits", static[0])] = out
                elif kind in ("release", "copy", "swap"):
                    state = out
                else:
                    state = out[0]
            state = self._call("release()", self._release, (state, np.ones((self.max_batch,), bool)))
        jax.block_until_ready(state)
        return state, {"programs": len(programs), "seconds": time.perf_counter() - t0, "compile_seconds": compiled_s}

    def release(self, state: Slots, slots: np.ndarray) -> Slots:
        """Marks `slots` ([B] bool) done, with no decoding (slots freed by the host, e.g. at a stop string)."""
        with self._context():
            return self._call("release()", self._release, (state, np.asarray(slots, bool)))
