"""The user-facing model object: config + parameters + processor, with jitted forwards.

    model = vl2_jax.load_pretrained(path, dtype="float32")
    batch = model.processor.batchify([model.processor(conversation, images)])
    logits = model.logits(batch)   # [B, T, V] float32
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vl2_jax import generation
from vl2_jax.checkpoint import param_shapes
from vl2_jax.config import Runtime, VL2Config, check_runtime_type
from vl2_jax.engine import CompileWatch, Engine, Request, Slots, check_token_ids, slot_shapes
from vl2_jax.errors import InputError, out_of_memory_as
from vl2_jax.generation import Detokenizer, GenerationResult, check_max_new_tokens, stop_strings, stream_text
from vl2_jax.modules.attention import check_attention
from vl2_jax.modules.language import LanguageModel
from vl2_jax.modules.vision import normalize_pixels
from vl2_jax.modules.vl2 import VL2
from vl2_jax.processor import Batch, ProcessorOutput, canonical_pixel_norm, left_pad, left_pad_positions
from vl2_jax.sampling import RowSampling, check_sampling
from vl2_jax.sharding import Layout


class VL2Model:
    """DeepSeek-VL2 with its parameters and processor. All arrays in and out are batch-major."""

    def __init__(self, cfg: VL2Config, params: dict, processor=None, dtype=jnp.float32, runtime: Runtime = Runtime(),
                 mesh=None, quant: str = "none", engine: Engine | None = None):
        """`params` must already be placed for `mesh` (None: one device); see `vl2_jax.load`. `runtime`:
        how the model runs (MoE dispatch, attention form, kernels; `Runtime.plain()` is the reference's
        arithmetic). `quant`: what `params` hold ("none", or "int8"/"fp8" weights; `vl2_jax.quant`).
        `engine`: its `Engine`, if made already (`Engine.of` these settings; else made when first asked)."""
        check_runtime_type(runtime)
        check_attention(runtime, dtype)
        slot_shapes(cfg, runtime)
        self.cfg = cfg
        self.params = params
        self.processor = processor
        self.dtype = jnp.dtype(dtype)
        self.runtime = runtime
        self.quant = quant
        self.module = VL2(cfg, self.dtype.type, runtime)
        self.mesh = mesh
        self.layout = Layout(mesh) if mesh is not None else None
        if self.layout is not None:
            self.layout.param_specs(param_shapes(cfg, self.dtype))  # records what had to stay replicated
        self._state = None  # the engine's slots and cache, between calls
        if engine is not None:
            self.engine = engine  # (in place of the cached property's)

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
            tiles = None if pixels is None else normalize_pixels(pixels, norm)
            return self.module.apply(params, ids, tiles, src, mask, method=VL2.embed)

        return jax.jit(embed, static_argnums=(5,))

    @functools.cached_property
    def _language(self):
        def forward(params, x, positions, valid):
            return self.module.apply(params, x, positions, valid, method=lambda m, *a: m.language(*a))

        return jax.jit(forward)

    # -- public API ---------------------------------------------------------------------------------
    def check_batch(self, batch) -> None:
        """Refuses a batch this model cannot read: anything but a processor batch or output (a list, a
        string), pixels that are not the processor's uint8 tiles, or tiles normalised otherwise than by
        this model's processor."""
        if not isinstance(batch, (Batch, ProcessorOutput)):
            raise InputError(f"expected a processor batch or one processor output, got {type(batch).__name__}; make "
                             "it with model.processor(conversation, images), and several with "
                             "model.processor.batchify([...]).")
        one = isinstance(batch, ProcessorOutput)
        if not np.asarray(batch.images_seq_mask).any():
            return
        pixels, name = np.asarray(batch.pixels), "the output's pixels" if one else "batch.pixels"
        if pixels.dtype != np.uint8 or pixels.ndim != (4 if one else 5) or pixels.shape[-1] != 3:
            shape = "[tiles, S, S, 3]" if one else "[B, tiles, S, S, 3]"
            raise InputError(f"{name} must be uint8 {shape}, as the processor makes them "
                             f"(got {pixels.dtype} {list(pixels.shape)}); `images` is derived from them.")
        norm = canonical_pixel_norm(batch.pixel_norm)
        if self.processor is not None and norm != canonical_pixel_norm(self.processor.pixel_norm):
            what = "output's" if one else "batch's"
            raise InputError(f"the {what} images are normalised with {batch.pixel_norm}, this model's "
                             f"processor with {self.processor.pixel_norm}; make the {what[:-2]} with model.processor.")

    def as_batch(self, batch) -> Batch:
        """A processor batch as it is, one processor output as a batch of one (`processor.batchify`);
        refused (InputError) where `check_batch` refuses it or a token id is outside the vocabulary."""
        self.check_batch(batch)
        if isinstance(batch, ProcessorOutput):
            if self.processor is None:
                raise InputError("this model has no processor to batch a processor output; pass a processor batch.")
            batch = self.processor.batchify([batch])
        check_token_ids(np.asarray(batch.input_ids)[np.asarray(batch.attention_mask, bool)], self.cfg.language.vocab_size)
        return batch

    def embed(self, batch: Batch, length: int | None = None) -> tuple[jax.Array, np.ndarray]:
        """A processor batch that `as_batch` passed -> (token embeddings with the image features written in
        [B, length, D] in the model dtype, token ids [B, length] int32 on the host), left padded to `length`
        (default: the batch's) with the pad token. Call under `mesh_context()`. Without a mesh every input
        goes to the device in one transfer call, so that the vision tower starts as early as it can."""
        tiles = batch.used_tiles()
        length = length or np.shape(batch.input_ids)[1]
        pad_id = self.processor.pad_id if self.processor is not None else 0
        bt = ("batch", None)
        ids = left_pad(batch.input_ids, length, pad_id).astype(np.int32)
        src = left_pad(batch.image_src, length, 0)
        arrays = [(ids, bt), (src, bt), (left_pad(batch.images_seq_mask, length, False).astype(bool), bt)]
        if tiles is not None:
            arrays.append((tiles, (None, None, None, None)))
        ids_d, src, mask, *tiles = self.put_many(*arrays)
        norm = canonical_pixel_norm(batch.pixel_norm)
        x = self._embed(self.embed_params, ids_d, tiles[0] if tiles else None, src, mask, norm)
        return x, ids

    def prepare_inputs_embeds(self, batch) -> jax.Array:
        """Token embeddings with the image features written in: [B, T, D] in the model dtype (a processor
        batch, or one processor output: B = 1)."""
        return self._embeds(self.as_batch(batch))

    def _embeds(self, batch: Batch) -> jax.Array:
        with self.mesh_context(), out_of_memory_as("while embedding the prompt and its images"):
            return self.embed(batch)[0]

    def logits(self, batch) -> jax.Array:
        """Full forward without a cache: float32 logits [B, T, V] (one processor output: B = 1)."""
        batch = self.as_batch(batch)
        mask = np.asarray(batch.attention_mask, bool)
        x = self._embeds(batch)
        with self.mesh_context(), out_of_memory_as(f"in a full forward of {mask.shape[0]} x {mask.shape[1]} tokens"):
            bt = ("batch", None)
            return self._language(self.params, x, self.put(left_pad_positions(mask), bt), self.put(mask, bt))

    def expert_load(self, batch, length: int | None = None) -> np.ndarray:
        """How many of the batch's tokens (left padded to `length`, padding included) each routed expert
        receives in a full forward, per MoE layer: int32 [MoE layers, E] (the routing balance)."""
        batch = self.as_batch(batch)
        with self.mesh_context():
            x, _ = self.embed(batch, length)
            mask = left_pad(batch.attention_mask, x.shape[1], False).astype(bool)
            bt = ("batch", None)
            counts = self._expert_load(self.params, x, self.put(left_pad_positions(mask), bt), self.put(mask, bt))
        return np.asarray(counts)

    @functools.cached_property
    def _expert_load(self):
        language = LanguageModel(self.cfg.language, self.dtype.type, self.runtime)
        return jax.jit(lambda p, *a: language.apply({"params": p["params"]["language"]}, *a,
                                                    method=LanguageModel.expert_load))

    # -- the engine -----------------------------------------------------------------------------------
    @functools.cached_property
    def engine(self) -> Engine:
        """The fixed-shape programs over `runtime.max_batch` slots of `runtime.max_seq_len` tokens."""
        return Engine.of(self.cfg, self.dtype, self.runtime, self.processor, self.mesh)

    def keep_executables(self, directory):
        """Keeps the engine's compiled programs under `directory` (`Engine.keep_executables`): a later
        process with the same model, runtime and code loads them instead of tracing and compiling.
        Returns the `vl2_jax.executables.ExecutableStore` (its `report()`: programs loaded and compiled)."""
        return self.engine.keep_executables(directory)

    def warmup(self, progress: Callable[[int, int, str], None] | None = None) -> dict:
        """Compiles every program the engine can run (`Engine.warmup`), so that no request compiles or
        traces afterwards. `progress(done, total, program)` after each. Returns {"programs", "seconds",
        "compile_seconds"} (the rest of the seconds: running each program once)."""
        with self.mesh_context(), out_of_memory_as("while compiling the engine's programs"):
            self._state, report = self.engine.warmup(self.params, progress, self.take_state())
        return report

    def take_state(self) -> Slots:
        """The engine's state (slots and cache), made on first use. The caller (generate, a server's
        scheduler) donates it to the engine's programs and hands the last one back with `give_state`;
        while it is out, the model holds none (a second user makes a new one, if memory allows)."""
        state, self._state = self._state, None
        return state if state is not None else self.engine.new_state()

    def give_state(self, state: Slots | None) -> None:
        """Hands back the state `take_state` lent (None: it was lost, e.g. to a failed program)."""
        self._state = state

    def requests(self, batch) -> list[Request]:
        """A processor batch (or one processor output) -> the engine's requests, one per row."""
        self.check_batch(batch)
        if isinstance(batch, ProcessorOutput):
            outputs = [batch]
        else:
            outputs = list(batch.rows)
            if len(outputs) != np.shape(batch.input_ids)[0]:
                raise InputError("the batch has no processor outputs; make it with model.processor.batchify.")
        return [Request.from_output(o, self.cfg.tokens_per_tile_side) for o in outputs]

    def generate(
        self,
        batch,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = 0,
        stop: str | Sequence[str] = (),
        on_text: Callable[[int, str], None] | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Generates answers for a processor batch (or one processor output) -> `GenerationResult`.

        Greedy when `temperature == 0` (the default); otherwise samples with temperature, `top_k` (0 or -1 = off)
        and `top_p` (1.0 = off), reproducibly for a `seed` (None: a fresh random one): each row draws from
        its own key, so a seeded answer is the same alone and in a batch. `repetition_penalty` > 1
        discourages tokens already in the prompt or answer. A row stops at EOS, at one of the `stop`
        strings (e.g. "User:", the chat template's), after `max_new_tokens`, or when its slot is full
        (`runtime.max_seq_len`). Rows beyond `runtime.max_batch` run as slots free up. `on_text(row, new_text)` is called with text as it is
        produced. `ignore_eos=True` generates exactly `max_new_tokens` (for benchmarks). One call at a time
        per model: the engine's state (slots and cache) passes from call to call.
        """
        seed = secrets.randbits(32) if seed is None else seed
        check_sampling(temperature, top_p, top_k, repetition_penalty, seed)
        check_max_new_tokens(max_new_tokens)
        stop = stop_strings(stop)
        max_new_tokens = min(int(max_new_tokens), self.engine.max_seq_len)  # a slot holds no more
        requests = self.requests(batch)
        for request in requests:
            self.engine.check(request)
        settings = RowSampling.make(temperature, top_k, top_p, repetition_penalty, seed)
        eos = -1 if ignore_eos else self.cfg.language.eos_token_id
        shape = f"{len(requests)} prompt(s) of up to {max(len(r.ids) for r in requests)} tokens + {max_new_tokens} new"
        with self.mesh_context(), out_of_memory_as(f"while generating ({shape})"), CompileWatch() as compiling:
            result, self._state = generation.run(
                self.engine, self.params, self.take_state(), requests, Detokenizer.of(self.processor.tokenizer),
                max_new_tokens, settings, stop, eos, on_text)
        return dataclasses.replace(result, compile_s=compiling.seconds)

    def run_jobs(self, jobs: Iterable[generation.Job], on_done: Callable[[generation.Job], None]) -> None:
        """Answers `generation.Job`s, each with its own settings (prompt, limits, sampling, stop strings),
        drawn from `jobs` as slots free up; `on_done(job)` as each finishes. One call at a time per model."""
        with self.mesh_context(), out_of_memory_as("while generating"):
            self.give_state(generation.run_jobs(self.engine, self.params, self.take_state(), jobs,
                                                Detokenizer.of(self.processor.tokenizer), on_done))

    def stream(self, batch, **kwargs) -> Iterator[str]:
        """Like `generate` for a one-conversation batch, yielding the answer's text as it is produced."""
        if "on_text" in kwargs:
            raise TypeError("stream yields the text itself and takes no on_text; pass on_text to generate instead")
        return stream_text(self, batch, **kwargs)

