"""Model specs -> a `VL2Model` on the devices: the one place that loads models.

A spec is what a user types as a model:
- `random:tiny|small|base|test`: random weights at that preset's size with a byte-level tokenizer
  (offline; `test` is a few MB, the others the real sizes);
- a local folder: a Hugging Face DeepSeek-VL2 checkpoint or a `python -m convert` output;
- a Hugging Face hub id (`deepseek-ai/deepseek-vl2-tiny`): downloaded once through `huggingface_hub`
  into its cache, converted once into `$VL2_JAX_CACHE` (default `~/.cache/vl2_jax`, under
  `$XDG_CACHE_HOME` where set), then loaded from the converted copy.

Every leaf goes straight to its device (or, under a mesh, into its shards); no host holds the whole
model. The formats themselves are read by `vl2_jax.checkpoint` (safetensors) and `vl2_jax.orbax_io`;
the weight files are read ahead into the page cache from the start, while JAX's backend starts
(`vl2_jax.prefetch`; one process only: across hosts each reads what it needs).

Progress comes two ways: `progress(line)` gets a line of text at each stage, and
`bytes_progress(done, total)` the bytes of weights on their devices so far, for a bar
(`progress_bar()` draws one with tqdm on stderr).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vl2_jax import executables, prefetch
from vl2_jax.checkpoint import SafetensorsFolder, load_hf, param_shapes, set_path, source_dtype
from vl2_jax.config import PRESETS, Runtime, VL2Config, check_runtime_type, dtype_of
from vl2_jax.engine import Engine, slot_shapes
from vl2_jax.errors import CheckpointError, ConfigError, out_of_memory_as
from vl2_jax.model import VL2Model
from vl2_jax.modules.attention import check_attention
from vl2_jax.modules.vl2 import VL2
from vl2_jax.processor import (
    BOS_TOKEN,
    EOS_TOKEN,
    EXTRA_SPECIAL_TOKENS,
    IMAGE_TOKEN,
    PAD_TOKEN,
    Processor,
)
from vl2_jax.quant import check_quant, quantize_params, quantized_shapes, weight_bytes
from vl2_jax.sharding import Layout, make_mesh, parse_mesh_spec, place
from vl2_jax.specs import DOWNLOAD_PATTERNS, hub_folder, is_hub_id


def default_dtype() -> str:
    """The compute dtype when none is asked for: bfloat16 on accelerators, float32 on the CPU (where
    bfloat16 matmuls are emulated and slower, and float32 matches the official outputs)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def resolve_dtype(dtype):
    """None, a name ("bfloat16", "float32", "float16") or a dtype -> a jnp scalar type (or None)."""
    resolved = dtype_of(dtype)
    return None if resolved is None else jnp.dtype(resolved).type


BytesProgress = Callable[[int, int], None]


def load_model(
    spec: str, dtype=None, *, runtime: Runtime = Runtime(), mesh=None, seed: int = 0,
    progress: Callable[[str], None] | None = None, bytes_progress: BytesProgress | None = None,
    quant: str | None = None, programs: str | None = None,
) -> VL2Model:
    """Any spec (see the module docstring) -> a `VL2Model`.

    Args:
      spec: `random:<preset>`, a local folder, or a hub id.
      dtype: "bfloat16", "float32", "float16", or None for `default_dtype()`.
      runtime: how the model runs (`vl2_jax.Runtime`: MoE dispatch, attention form, kernels).
      mesh: None (one device), "auto" (all visible devices, laid out for the model), a spec such as
        "expert=4,tensor=2" (axes data, expert, tensor), or a `jax.sharding.Mesh` with those axis names.
      seed: the random weights' seed (`random:*` only).
      progress: called with a line of text at each stage (default: silent).
      bytes_progress: called as `bytes_progress(done, total)` with the bytes of weights on their devices
        so far each time some land, while a checkpoint is read (e.g. `progress_bar()`'s callback).
      quant: the language model's weights as "int8" or "fp8" values with float32 scales, quantized
        here leaf by leaf as they load (`vl2_jax.quant`), or "none"; None: as the checkpoint holds them
        (a `python -m convert --quant` output is quantized already; asking it for another is an error).
      programs: a folder (the entry points' --compile-cache) where the engine keeps its compiled programs
        (`vl2_jax.executables.keep`; one device only); those an earlier process kept there start loading
        while the weights do, so that the first answer finds them ready.
    """
    spec = _spec(spec, runtime)
    several = getattr(jax.distributed, "is_initialized", lambda: False)()
    reading = None if several else prefetch.start(spec)  # read ahead while JAX's backend starts
    try:
        return _load(spec, default_dtype() if dtype is None else dtype, runtime, mesh, seed,
                     progress or (lambda line: None), bytes_progress, quant, programs)
    finally:
        if reading is not None:
            reading.stop()


def load_pretrained(spec, dtype="float32", runtime: Runtime = Runtime(), mesh=None) -> VL2Model:
    """`load_model` with float32 as the default, for parity work; `dtype=None` keeps a checkpoint's dtype."""
    return _load(_spec(spec, runtime), dtype, runtime, mesh, 0, lambda line: None)


def _spec(spec, runtime) -> str:
    """The model spec as a str (a path given as one), refused with one error where it is no spec or
    `runtime` is no `Runtime`."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise TypeError(f"the model spec must be a str (random:SIZE, a checkpoint folder or a hub id) or a path, "
                        f"not {type(spec).__name__}")
    if not spec.strip():
        raise CheckpointError("the model spec is empty; pass random:SIZE, a checkpoint folder or a hub id.")
    check_runtime_type(runtime)
    return spec


def _load(spec: str, dtype, runtime: Runtime, mesh, seed: int, progress: Callable[[str], None],
          bytes_progress: BytesProgress | None = None, quant: str | None = None,
          programs: str | None = None) -> VL2Model:
    start = time.perf_counter()
    read = [0]
    if isinstance(mesh, str) and mesh != "auto":
        parse_mesh_spec(mesh)  # a malformed spec is refused before anything loads

    def count(done: int, total: int) -> None:
        read[0] = done
        if bytes_progress is not None:
            bytes_progress(done, total)

    dtype_of(dtype)  # (an unknown name, "" included, is refused before anything loads)
    if dtype is not None or spec.startswith("random:"):
        check_attention(runtime, dtype or "float32")  # (as VL2Model checks it, before the weights load)
    if spec.startswith("random:"):
        preset(spec[7:])  # an unknown size is refused before the line that announces it
        progress(f"initialising random {spec[7:]} weights ...")
        model = random_model(spec[7:], dtype or "float32", seed, runtime, mesh, quant=quant or "none",
                             programs=programs, log=progress)
    elif not is_hub_id(spec):
        progress(f"loading {spec} ...")
        model = load_folder(spec, dtype, runtime, mesh, bytes_progress=count, quant=quant, programs=programs,
                            log=progress)
    else:
        model = load_folder(_converted_from_hub(spec, progress), dtype, runtime, mesh, bytes_progress=count,
                            quant=quant, programs=programs, log=progress)
    seconds = time.perf_counter() - start
    from vl2_jax.orbax_io import format_bytes

    notes = [f"{format_bytes(read[0])} of weights, {format_bytes(read[0] / seconds)}/s"] if read[0] else []
    held = weight_bytes(model.params)
    if model.quant != "none" and held != read[0]:  # (a float checkpoint quantized as it loaded: less than was read)
        notes.append(f"{format_bytes(held)} on the devices, the language model's in {model.quant}")
    progress(f"model ready in {seconds:.1f} s" + (f" ({'; '.join(notes)})" if notes else ""))
    return model


@contextlib.contextmanager
def progress_bar(enabled: bool = True, file=None) -> Iterator[BytesProgress]:
    """A `bytes_progress` callback that draws a tqdm bar of the weights read (bytes, rate, time left) on
    `file` (default: stderr), from the first bytes reported until the last (or the `with` block's end).

    The bar shows only where `file` is a terminal (and `enabled`), so piped output keeps its lines.
    """
    from tqdm import tqdm

    file = sys.stderr if file is None else file
    bars = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="weights", file=file,
                             disable=None if enabled else True, dynamic_ncols=True))
        bars[0].update(done - bars[0].n)
        if done >= total:  # ends the line before the loader's next line of text
            bars[0].close()

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def load_folder(path: str | Path, dtype=None, runtime: Runtime = Runtime(), mesh=None, *,
                bytes_progress: BytesProgress | None = None, quant: str | None = None,
                programs: str | None = None, log: Callable[[str], None] = lambda line: None) -> VL2Model:
    """A Hugging Face DeepSeek-VL2 folder or a `python -m convert` output -> a `VL2Model`.

    The folder holds config.json, the tokenizer and processor files, and either safetensors weights or
    an Orbax checkpoint written by `python -m convert`. `dtype=None` keeps the checkpoint's dtype.
    `bytes_progress(done, total)` is called as the weights land (see `load_model`). `quant` (see
    `load_model`): a float checkpoint is quantized as it loads; a quantized one loads only as itself.
    `programs` (see `load_model`): kept programs load beside the weights; `log` tells why they cannot.
    """
    from vl2_jax import orbax_io

    if not Path(path).exists():
        raise CheckpointError(f"{path} does not exist; pass a DeepSeek-VL2 checkpoint folder, a hub id or random:SIZE.")
    if not Path(path).is_dir():
        raise CheckpointError(f"{path} is not a folder; pass a DeepSeek-VL2 checkpoint folder.")
    path = Path(path)
    cfg = VL2Config.from_pretrained(path)
    slot_shapes(cfg, runtime)  # (a max_seq_len or prefill chunks the model cannot take: before the weights)
    # The processor (its tokenizer: ~0.2 s for a 100k vocabulary) loads on a thread of its own while the
    # weights are read, then the engine (with `programs`: its kept programs start loading); an error in
    # either ends the load when the next leaf lands.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vl2-processor") as pool:
        processor_loaded = pool.submit(_checked_processor, path, cfg)
        early = [processor_loaded]  # (and the engine's, below)

        def landed(done: int, total: int) -> None:
            for future in early:
                if future.done():
                    future.result()  # raises the processor's or the engine's error, if any
            if bytes_progress is not None:
                bytes_progress(done, total)

        want = resolve_dtype(dtype)
        mesh = make_mesh(mesh, cfg)
        converted = orbax_io.is_conversion(path)
        if converted:
            orbax_io.check_converted(path)  # (one that does not load says why: another format version, a missing group)
        else:
            folder = SafetensorsFolder(path)
        saved_quant = orbax_io.saved_quant(path) if converted else "none"
        quant = saved_quant if quant is None else check_quant(quant)
        if saved_quant != "none" and quant != saved_quant:
            instead = "without --quant for float weights" if quant == "none" else f"with --quant {quant}"
            raise ConfigError(f"{path} holds {saved_quant} weights, which load only as they are: leave --quant (in "
                              f"Python, quant=) out or set it to {saved_quant}, or convert the Hugging Face checkpoint "
                              f"again {instead} (python -m convert).")
        dtype_ = want or (orbax_io.saved_dtype(path) if converted else source_dtype(folder))
        shapes = param_shapes(cfg, dtype_)
        check_host_memory(shapes, dtype_, quant, str(path), "or a machine with more memory")
        # the shardings of what is read: a quantized checkpoint's leaves as saved, else the float leaves
        read = quantized_shapes(shapes, saved_quant)
        shardings = Layout(mesh).param_shardings(read) if mesh is not None else None
        quantize = quant if saved_quant == "none" else "none"  # what to quantize while loading
        # (after the processor, on its thread: the engine's fingerprint reads the processor's settings)
        engine = pool.submit(lambda: _engine_ahead(cfg, dtype_, runtime, processor_loaded.result(), mesh, programs,
                                                   log))
        early.append(engine)
        with out_of_memory_as(f"while loading the {jnp.dtype(dtype_).name} weights"):
            if converted:
                after = (lambda p, leaf: _quantize_leaf(p, leaf, quantize, mesh)) if quantize != "none" else None
                params, _ = orbax_io.restore(path, cfg, dtype_, shardings, bytes_progress=landed, after=after)
            else:
                total = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))
                params = load_hf(folder, cfg, dtype_, place=_placer(shardings, landed, total, quant))
        processor = processor_loaded.result()
    return VL2Model(cfg, params, processor, dtype_, runtime, mesh, quant=quant, engine=engine.result())


def _engine_ahead(cfg: VL2Config, dtype, runtime: Runtime, processor: Processor, mesh, programs: str | None,
                  log: Callable[[str], None], ask_kernels: bool = True) -> Engine | None:
    """The engine of a model still loading, its programs kept in folder `programs` and those kept there
    already loading (`executables.keep`) -> the engine, or None (no folder, or a mesh: `VL2Model` makes
    its engine when first asked). `ask_kernels`: whether decoding takes the decode attention kernel is
    asked now (its self-check compiles a kernel: on the loader's thread, beside the weights' read)."""
    if not programs or mesh is not None:
        return None
    engine = Engine.of(cfg, dtype, runtime, processor, mesh)
    executables.keep(engine, programs, log)
    if ask_kernels:
        engine.ragged_decode  # noqa: B018
    return engine


def _checked_processor(path: Path, cfg: VL2Config) -> Processor:
    """The folder's processor, its candidate resolutions checked against the config."""
    processor = Processor.from_pretrained(path)
    cfg.check_candidate_resolutions(processor.candidate_resolutions,
                                    f"{path / 'processor_config.json'} candidate_resolutions")
    return processor


def _placer(shardings, bytes_progress: BytesProgress | None = None, total: int = 0, quant: str = "none"):
    """`place(path, host_array)` for `load_hf`: straight into the leaf's shards, or the default device;
    each leaf's bytes reported to `bytes_progress` once it is there. With `quant`, each leaf that
    `vl2_jax.quant` covers is quantized as soon as it is placed, so the float copy of one leaf at a time
    is on the devices."""
    if shardings is None and bytes_progress is None and quant == "none":
        return None
    done = [0]

    def put_leaf(path, array):
        sharding = None if shardings is None else functools.reduce(lambda tree, key: tree[key], ("params", *path),
                                                                  shardings)
        placed = place(array, sharding)
        if bytes_progress is not None:
            done[0] += placed.nbytes
            bytes_progress(done[0], total)
        return _quantize_leaf(path, placed, quant, None if shardings is None else sharding.mesh)

    return put_leaf


def _converted_from_hub(repo_id: str, progress) -> Path:
    from vl2_jax.orbax_io import convert_checkpoint, is_converted

    target = hub_folder(repo_id)
    if is_converted(target):
        return target
    progress(f"downloading {repo_id} from the Hugging Face hub (once) ...")
    try:
        from huggingface_hub import snapshot_download

        source = snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS)
    except Exception as e:  # network, auth and not-found errors all come as different types
        raise CheckpointError(
            f"{repo_id} is not a local folder, and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); check the path or the hub id and your "
            "connection, or try random:test (small random weights, no download) offline."
        ) from None
    progress(f"converting {repo_id} to {target} (once) ...")
    target.parent.mkdir(parents=True, exist_ok=True)  # the first hub model of this machine
    convert_checkpoint(source, target, None, force=True, progress=progress)
    progress(download_note(repo_id, Path(source)))
    return target


def download_note(repo_id: str, snapshot: Path) -> str:
    """What the hub download still takes on disk once converted, and how to free it: the files of the
    `snapshot` folder (huggingface_hub's links into its blobs, counted once each)."""
    from vl2_jax.orbax_io import format_bytes

    files = {f.resolve() for f in snapshot.rglob("*") if f.is_file()}
    size = sum(f.stat().st_size for f in files)
    # huggingface_hub's layout: <cache>/models--owner--name/snapshots/<revision>
    repo = snapshot.parents[1] if snapshot.parent.name == "snapshots" else snapshot
    return (f"the download of {repo_id} ({format_bytes(size)} in {repo}) is no longer needed: the converted copy "
            f"is what loads; `hf cache rm model/{repo_id}` (or rm -r {repo}) frees the space")


# ------------------------------------------------------------------------------------ random models
def write_tokenizer(folder: Path, cfg: VL2Config) -> None:
    """tokenizer.json + tokenizer_config.json of a byte-level BPE without merges (one token per byte)
    that carries DeepSeek-VL2's special tokens, bos/eos at the config's ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    lc = cfg.language
    vocab = {BOS_TOKEN: lc.bos_token_id, EOS_TOKEN: lc.eos_token_id}
    free = (i for i in range(lc.vocab_size) if i not in vocab.values())
    special = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, *EXTRA_SPECIAL_TOKENS)
    for token in (*special[2:], *sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[token] = next(free)
    if max(vocab.values()) >= lc.vocab_size:
        raise ConfigError(f"vocab_size {lc.vocab_size} is too small for the random tokenizer ({len(vocab)} tokens).")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": None,
              "model_max_length": lc.max_position_embeddings}  # (unk_token null, as in the released configs)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))


def write_assets(folder: str | Path, cfg: VL2Config) -> Path:
    """config.json, processor_config.json and the tokenizer files of a random model, in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=1))
    processor = {
        "candidate_resolutions": [list(r) for r in cfg.candidate_resolutions],
        "patch_size": cfg.vision.patch_size,
        "downsample_ratio": cfg.projector.downsample_ratio,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "normalize": True,
        "image_token": IMAGE_TOKEN,
        "pad_token": PAD_TOKEN,
        "sft_format": "deepseek",
    }
    (folder / "processor_config.json").write_text(json.dumps(processor, ensure_ascii=False, indent=1))
    write_tokenizer(folder, cfg)
    return folder


def init_params(cfg: VL2Config, dtype, seed: int = 0, shardings: dict | None = None, after=None) -> dict:
    """Random parameters `{"params": ...}`: normal(0.02) weights, norm scales 1, biases 0, drawn on the
    default device, or with `shardings` (a params-like tree of Shardings) directly in their shards.
    Shapes come from tracing the model (`eval_shape`), so nothing but the draws is compiled. `after`:
    see `draw_like`."""
    s, t = cfg.vision.image_size, 4
    args = (
        jnp.zeros((1, t), jnp.int32), jnp.zeros((1, 3, s, s), dtype), jnp.zeros((1, t), jnp.int32),
        jnp.zeros((1, t), bool), jnp.zeros((1, t), jnp.int32), jnp.ones((1, t), bool),
    )
    shapes = jax.eval_shape(VL2(cfg, dtype).init, jax.random.key(seed), *args)
    return draw_like(shapes, seed, shardings, after)


HOST_DRAW_ELEMENTS = 1 << 20  # leaves up to this size are drawn by numpy on the host: no program to compile


def draw_like(shapes, seed: int = 0, shardings: dict | None = None, after=None):
    """Random arrays shaped as the tree `shapes` (of `jax.ShapeDtypeStruct`s), by `init_params`' rules.
    `after(path, array)`, where given, replaces each leaf as soon as it is drawn (path: its keys below
    the tree's top level), e.g. quantizes it, so the drawn leaf can go before the next is drawn.

    Leaves of up to `HOST_DRAW_ELEMENTS` are drawn by numpy (a generator seeded with (seed mod 2**64,
    leaf index)) and placed; larger ones by one small jitted draw per distinct shape on their devices (a
    single jit over every leaf takes minutes to compile at the real sizes). Compiling a draw costs ~0.1 s
    on a CPU, so the small models' ~40 distinct shapes would take seconds to compile."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(shapes)[0])
    keys = None
    if any(math.prod(leaf.shape) > HOST_DRAW_ELEMENTS for leaf in leaves):  # RngBitGenerator: quick to compile
        keys = jax.random.split(jax.random.key(seed, impl="unsafe_rbg"), len(leaves))
    out = []
    targets = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
    for i, (path, leaf, sharding) in enumerate(zip(paths, leaves, targets)):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        bias = name.endswith(("_b", "bias")) and name not in ("wk_b", "wv_b")  # (MLA's two are weights)
        kind = "ones" if name == "scale" else "zeros" if bias else "normal"
        dtype = jnp.dtype(leaf.dtype)
        if math.prod(leaf.shape) <= HOST_DRAW_ELEMENTS:
            drawn = place(_draw_host(kind, leaf.shape, dtype, np.random.default_rng([seed % (1 << 64), i])), sharding)
        else:
            drawn = _draw(kind, leaf.shape, dtype, sharding)(keys[i])
        out.append(drawn if after is None else after(tuple(k.key for k in path[1:]), drawn))
    return jax.tree.unflatten(jax.tree.structure(shapes), out)


def _draw_host(kind: str, shape, dtype, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)
    return (np.ones if kind == "ones" else np.zeros)(shape, dtype)


@functools.cache
def _draw(kind: str, shape, dtype, sharding):
    def draw(key):
        if kind == "normal":
            return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        return (jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype)

    return jax.jit(draw, out_shardings=sharding)


def _tree(path, leaf) -> dict:
    """{path[0]: {path[1]: ... leaf}}."""
    tree: dict = {}
    set_path(tree, path, leaf)
    return tree


def _quantize_leaf(path, leaf, quant: str, mesh):
    """One placed parameter, quantized if `vl2_jax.quant` covers it (values and scales then placed by
    the partition rules on `mesh`); others unchanged."""
    if quant == "none":
        return leaf
    out = functools.reduce(lambda tree, key: tree[key], ("params", *path), quantize_params({"params": _tree(path, leaf)}, quant))
    return out if mesh is None or out is leaf else _reshard(out, path, mesh)


def _reshard(leaf, path, mesh):
    """A quantized leaf (values and scales) placed by the partition rules on `mesh`."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {"params": _tree(path, leaf)})
    shardings = Layout(mesh).param_shardings(shapes)
    return jax.device_put(leaf, functools.reduce(lambda tree, key: tree[key], ("params", *path), shardings))


def check_host_memory(shapes, dtype, quant: str, name: str, also: str) -> None:
    """On the CPU backend, where the weights live in the host's memory and running out of it ends the
    process with no message (the kernel's out-of-memory kill), a ConfigError before any weight is made
    when the `dtype` weights `shapes`, as `quant` stores them, exceed the memory the system can give
    (`prefetch.available_memory`; no check where that is unknown). The error names them as `name`'s and
    suggests bfloat16 for float32 weights, int8 for float ones, then `also`."""
    if jax.default_backend() != "cpu":
        return
    need, have = weight_bytes(quantized_shapes(shapes, quant)), prefetch.available_memory()
    if have is None or need <= have:
        return
    dtype = jnp.dtype(dtype)
    ways = ["dtype bfloat16 (--dtype bfloat16)"] if dtype == jnp.float32 else []
    ways += ["int8 weights (--quant int8)"] if quant == "none" else []
    use = f"use {' or '.join(ways)}, " if ways else ""
    raise ConfigError(f"{name}'s {dtype.name} weights{'' if quant == 'none' else ' in ' + quant} need "
                      f"{need / 1e9:.1f} GB of memory and this machine has {have / 1e9:.1f} GB available; {use}{also}.")


def preset(name: str) -> VL2Config:
    """The config of random model size `name` ("tiny", "small", "base", "test"), or a ConfigError."""
    if name not in PRESETS:
        raise ConfigError(f"unknown random model size {name!r}; use one of {', '.join(PRESETS)}.")
    return PRESETS[name]


def random_model(name: str, dtype="float32", seed: int = 0, runtime: Runtime = Runtime(), mesh=None,
                 quant: str = "none", programs: str | None = None,
                 log: Callable[[str], None] = lambda line: None) -> VL2Model:
    """A `VL2Model` with random weights at a preset size ("tiny", "small", "base", "test"), on one device
    or across `mesh` (see `load_model`); its tokenizer and processor files are written to a temporary
    folder, removed once they are read, and load through the same code as a real checkpoint's. `quant`:
    each float weight quantized as soon as it is drawn (`vl2_jax.quant`), so that memory holds the
    quantized model and one float leaf at most. `programs`, `log`: as for `load_folder`."""
    cfg = preset(name)
    slot_shapes(cfg, runtime)
    dtype = resolve_dtype(dtype) or jnp.float32
    quant, shapes = check_quant(quant), param_shapes(cfg, dtype)
    check_host_memory(shapes, dtype, quant, f"random:{name}", "or take a smaller model (random:tiny, random:test)")
    with tempfile.TemporaryDirectory(prefix=f"vl2-random-{name}-") as folder:  # (read once, then removed)
        processor = Processor.from_pretrained(write_assets(folder, cfg))
    mesh = make_mesh(mesh, cfg)
    shardings = Layout(mesh).param_shardings(shapes) if mesh is not None else None
    after = (lambda path, leaf: _quantize_leaf(path, leaf, quant, mesh)) if quant != "none" else None
    engine = _engine_ahead(cfg, dtype, runtime, processor, mesh, programs, log, ask_kernels=False)
    params = init_params(cfg, dtype, seed, shardings, after)
    if engine is not None:
        engine.ragged_decode  # noqa: B018 - (asked after the draws are dispatched)
    return VL2Model(cfg, params, processor, dtype, runtime, mesh, quant=quant, engine=engine)
