"""The user-facing model object: config + parameters + processor, with jitted forwards.

    model = vl2_jax.load_pretrained(path, dtype="float32")
    batch = model.processor.batchify([model.processor(conversation, images)])
    logits = model.logits(batch)   # [B, T, V] float32
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vl2_jax.checkpoint import SafetensorsFolder, load_hf, param_shapes, source_dtype
from vl2_jax.config import VL2Config
from vl2_jax.errors import CheckpointError, ConfigError, DeviceMemoryError, InputError
from vl2_jax.modules.vl2 import VL2, image_token_sources
from vl2_jax.processor import canonical_pixel_norm, normalize_pixels
from vl2_jax.sharding import Layout, make_mesh

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype | None:
    """None, a name ("bfloat16", "float32", "float16") or a dtype -> a jnp dtype (or None)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


@contextlib.contextmanager
def out_of_memory_as(what: str):
    """Turns XLA's RESOURCE_EXHAUSTED into a `DeviceMemoryError` that says during what and what to try."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        raise DeviceMemoryError(
            f"the accelerator ran out of memory {what}; try a smaller batch or max_new_tokens, prefill_chunk=512, "
            "dtype='bfloat16', or more devices (mesh='auto')."
        ) from e


def left_pad(a_BT, length: int, value) -> np.ndarray:
    """[B, T] host array -> [B, length], `value` in the new columns on the left."""
    a_BT = np.asarray(a_BT)
    return np.pad(a_BT, ((0, 0), (length - a_BT.shape[1], 0)), constant_values=value)


def left_pad_positions(attention_mask_BT: np.ndarray) -> np.ndarray:
    """Positions of left-padded rows: `cumsum(mask) - 1`, 0 on padding (as the reference's generate)."""
    return np.maximum(np.cumsum(attention_mask_BT, axis=-1) - 1, 0).astype(np.int32)


class VL2Model:
    """DeepSeek-VL2 with its parameters and processor. All arrays in and out are batch-major."""

    def __init__(
        self, cfg: VL2Config, params: dict, processor=None, dtype=jnp.float32, moe_impl: str = "auto", mesh=None,
        attention: str = "auto",
    ):
        """`params` must already be placed for `mesh` (None: one device); see `load_pretrained`.
        `attention`: one of `vl2_jax.config.ATTENTION_IMPLS` ("plain": the reference's arithmetic)."""
        from vl2_jax.config import ATTENTION_IMPLS, MOE_IMPLS

        if moe_impl not in MOE_IMPLS:
            raise ConfigError(f"unknown moe_impl {moe_impl!r}; use one of {', '.join(MOE_IMPLS)}.")
        if attention not in ATTENTION_IMPLS:
            raise ConfigError(f"unknown attention {attention!r}; use one of {', '.join(ATTENTION_IMPLS)}.")
        self.cfg = cfg
        self.params = params
        self.processor = processor
        self.dtype = jnp.dtype(dtype)
        self.module = VL2(cfg, self.dtype.type, moe_impl, attention)
        self.mesh = mesh
        self.layout = Layout(mesh) if mesh is not None else None
        if self.layout is not None:
            self.layout.param_specs(param_shapes(cfg, self.dtype))  # records what had to stay replicated
        self._generator = None

    # -- placement ------------------------------------------------------------------------------------
    def mesh_context(self):
        """`jax.set_mesh(self.mesh)` (activation constraints refer to it), or nothing without a mesh."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def put(self, host: np.ndarray, logical: Sequence[str | None]) -> jax.Array:
        """A host array (the same on every process) -> a global array sharded by logical axes."""
        host = np.asarray(host)
        if self.mesh is None:
            return jnp.asarray(host)
        sharding = self.layout.sharding(logical, host.shape)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def put_many(self, *pairs: tuple[np.ndarray, Sequence[str | None]]) -> list[jax.Array]:
        """`put` of several (host array, logical axes) pairs; without a mesh in one transfer call (each
        call costs host time before the device can start: ~0.1-0.5 ms on a GPU host)."""
        if self.mesh is None:
            return jax.device_put([np.asarray(host) for host, _ in pairs])
        return [self.put(host, logical) for host, logical in pairs]

    def fetch(self, x: jax.Array) -> np.ndarray:
        """A (possibly sharded, possibly multi-process) array -> the whole value on this host."""
        if self.mesh is None or x.is_fully_addressable:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    @property
    def embed_params(self) -> dict:
        """The parameters that embedding a prompt reads: all but the language model's decoder layers.
        Every leaf passed into a jitted call costs host time (~3 us each on a GPU host)."""
        p = self.params["params"]
        language = {k: v for k, v in p["language"].items() if not k.startswith("layers_")}
        return {"params": {**p, "language": language}}

    # -- jitted pieces ------------------------------------------------------------------------------
    @functools.cached_property
    def _embed(self):
        """(params, ids [B, T], pixels [I, S, S, 3] uint8 or None, src [B, T], image mask [B, T], pixel
        norm (static)) -> embeddings [B, T, D]; the tiles are normalised here (`normalize_pixels`)."""

        def embed(params, ids, pixels, src, mask, norm):
            tiles = None if pixels is None else normalize_pixels(pixels, norm, jnp)
            return self.module.apply(params, ids, tiles, src, mask, method=VL2.embed)

        return jax.jit(embed, static_argnums=(5,))

    @functools.cached_property
    def _language(self):
        def forward(params, x, positions, valid):
            return self.module.apply(params, x, positions, valid, method=lambda m, *a: m.language(*a))

        return jax.jit(forward)

    # -- public API ---------------------------------------------------------------------------------
    def _image_inputs(self, batch) -> tuple[np.ndarray | None, np.ndarray]:
        """Host-side: the pixels of the tiles actually used [I, S, S, 3] uint8 (or None) and the gather
        indices [B, T], both numpy. (Sent as uint8, normalised on the device: a quarter of float32's
        bytes to copy and transfer.)"""
        crop = np.asarray(batch.images_spatial_crop)
        seq_mask = np.asarray(batch.images_seq_mask, bool)
        tiles_idx, src = image_token_sources(crop, seq_mask, self.cfg.tokens_per_tile_side)
        if len(tiles_idx) == 0:
            return None, src
        images = np.asarray(batch.pixels)
        if images.dtype != np.uint8 or images.ndim != 5 or images.shape[-1] != 3:
            raise InputError(f"batch.pixels must be uint8 [B, tiles, S, S, 3], as the processor makes them "
                             f"(got {images.dtype} {list(images.shape)}); `images` is derived from them.")
        norm = canonical_pixel_norm(batch.pixel_norm)
        if self.processor is not None and norm != canonical_pixel_norm(self.processor.pixel_norm):
            raise InputError(f"the batch's images are normalised with {batch.pixel_norm}, this model's "
                             f"processor with {self.processor.pixel_norm}; make the batch with model.processor.")
        b, n = images.shape[:2]
        every_slot = np.stack(np.divmod(np.arange(b * n), n), axis=1)
        if np.array_equal(tiles_idx, every_slot):  # every tile slot used, in order: a view, no copy
            tiles = images.reshape(b * n, *images.shape[2:])
        else:  # a copy of the used slots
            tiles = images[tiles_idx[:, 0], tiles_idx[:, 1]]
        return tiles, src

    def _embed_batch(self, batch, length: int | None = None) -> tuple[jax.Array, np.ndarray]:
        """A processor batch -> (token embeddings with the image features written in [B, length, D] in
        the model dtype, token ids [B, length] int32 on the host), left padded to `length` (default: the
        batch's) with the pad token. Call under `mesh_context()`. Without a mesh every input goes to the
        device in one transfer call, so that the vision tower starts as early as it can."""
        tiles, src = self._image_inputs(batch)
        length = length or np.shape(batch.input_ids)[1]
        pad_id = self.processor.pad_id if self.processor is not None else 0
        bt = ("batch", None)
        ids = left_pad(batch.input_ids, length, pad_id).astype(np.int32)
        arrays = [(ids, bt), (left_pad(src, length, 0), bt), (left_pad(batch.images_seq_mask, length, False).astype(bool), bt)]
        if tiles is not None:
            arrays.append((tiles, (None, None, None, None)))
        ids_d, src, mask, *tiles = self.put_many(*arrays)
        norm = canonical_pixel_norm(batch.pixel_norm)
        x = self._embed(self.embed_params, ids_d, tiles[0] if tiles else None, src, mask, norm)
        return x, ids

    def prepare_inputs_embeds(self, batch) -> jax.Array:
        """Token embeddings with the image features written in: [B, T, D] in the model dtype."""
        with self.mesh_context(), out_of_memory_as("while embedding the prompt and its images"):
            return self._embed_batch(batch)[0]

    def logits(self, batch) -> jax.Array:
        """Full forward without a cache: float32 logits [B, T, V]."""
        mask = np.asarray(batch.attention_mask, bool)
        x = self.prepare_inputs_embeds(batch)
        with self.mesh_context(), out_of_memory_as(f"in a full forward of {mask.shape[0]} x {mask.shape[1]} tokens"):
            bt = ("batch", None)
            return self._language(self.params, x, self.put(left_pad_positions(mask), bt), self.put(mask, bt))

    def generate(
        self,
        batch,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        prefill_chunk: int | None = None,
        on_text: Callable[[int, str], None] | None = None,
        ignore_eos: bool = False,
    ):
        """Generates answers for a processor batch -> `vl2_jax.generation.GenerationResult`.

        Greedy when `temperature == 0` (the default); otherwise samples with temperature, `top_k` (0 = off)
        and `top_p` (1.0 = off), reproducibly for a `seed`. `repetition_penalty` > 1 discourages tokens
        already in the prompt or answer. A row stops at EOS, at one of the `stop` strings (e.g. "User:",
        the chat template's), after `max_new_tokens`, or at the model's context limit. `prefill_chunk=N`
        writes the prompt into the cache N tokens at a time (same answers, less activation memory).
        `on_text(row, new_text)` is called with text as it is produced. `ignore_eos=True` generates
        exactly `max_new_tokens` (for benchmarks).
        """
        from vl2_jax.generation import Generator
        from vl2_jax.sampling import SamplingParams

        checks = [
            (temperature >= 0, f"temperature must be >= 0 (got {temperature})"),
            (0 < top_p <= 1, f"top_p must be in (0, 1] (got {top_p})"),
            (top_k >= 0, f"top_k must be >= 0 (got {top_k}; 0 turns it off)"),
            (repetition_penalty > 0, f"repetition_penalty must be > 0 (got {repetition_penalty})"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message + ".")
        if self._generator is None:
            self._generator = Generator(self)
        sampling = SamplingParams.make(temperature, top_k, top_p, repetition_penalty)
        return self._generator.run(
            batch, max_new_tokens, sampling, seed, stop, prefill_chunk, on_text, ignore_eos=ignore_eos
        )

    def stream(self, batch, **kwargs) -> Iterator[str]:
        """Like `generate` for a one-conversation batch, yielding the answer's text as it is produced."""
        from vl2_jax.generation import stream_text

        return stream_text(self, batch, **kwargs)


def load_pretrained(
    path: str | Path, dtype="float32", moe_impl: str = "auto", mesh=None, attention: str = "auto"
) -> VL2Model:
    """Loads a Hugging Face DeepSeek-VL2 folder or a `python -m convert` output.

    Args:
      path: folder with config.json, the tokenizer and processor files, and either safetensors weights
        or an Orbax checkpoint written by `python -m convert`.
      dtype: "float32", "bfloat16", "float16", or None to keep the checkpoint's dtype.
      moe_impl: expert dispatch, "auto" (default), "dense" (the plain reference path), "gather",
        "grouped" or "ragged" (see `modules/moe.py`).
      mesh: None (one device), "auto" (all visible devices, laid out for the model), a spec such as
        "expert=4,tensor=2" (axes data, expert, tensor), or a `jax.sharding.Mesh` with those axis names.
        Each parameter is read straight into its shards; no host holds the whole model.
      attention: "auto" (default: cuDNN flash attention for prompts and the vision tower on NVIDIA GPUs in
        bf16/f16), "plain" (the reference's arithmetic everywhere), "cudnn" or "xla" (see `modules/attention.py`).
    """
    from vl2_jax.processor import Processor

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass a DeepSeek-VL2 checkpoint folder.")
    cfg = VL2Config.from_pretrained(path)
    processor = Processor.from_pretrained(path)  # before the weights: a bad tokenizer fails in a second
    want = resolve_dtype(dtype)
    from vl2_jax import orbax_io

    mesh = make_mesh(mesh, cfg)
    converted = orbax_io.is_converted(path)
    if not converted:
        folder = SafetensorsFolder(path)
    dtype_ = want or (orbax_io.saved_dtype(path) if converted else source_dtype(folder))
    shardings = None
    if mesh is not None:
        shardings = Layout(mesh).param_shardings(param_shapes(cfg, dtype_))
    with out_of_memory_as(f"while loading the {jnp.dtype(dtype_).name} weights"):
        if converted:
            params, _ = orbax_io.restore(path, cfg, dtype_, shardings)
        else:
            params = load_hf(folder, cfg, dtype_, place=_placer(shardings))
    return VL2Model(cfg, params, processor, dtype_, moe_impl, mesh, attention)


def _placer(shardings):
    """`place(path, host_array)` for `load_hf`: straight into the leaf's shards, or the default device."""
    if shardings is None:
        return None

    def place(path, array):
        sharding = functools.reduce(lambda tree, key: tree[key], ("params", *path), shardings)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return place
