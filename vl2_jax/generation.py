"""Generation: bucketed, jitted prefill into a static KV cache, then a decode loop on the device.

Flow for a batch (left padded by the processor):
1. The prompt is left padded further to a bucket length (`bucket`: 64, then 8 lengths per octave), so
   new prompt lengths reuse compiled code; padding is masked, so answers do not change.
2. `embed` (vision tower + projector + text embeddings) runs once; prefill then writes the prompt into
   the cache whole or `prefill_chunk` tokens at a time, and the first token is sampled.
3. `decode` runs a `lax.while_loop` on the device until every row has produced EOS or a step limit is
   reached; nothing returns to the host per token. For streaming, the host calls it with successive
   limits (chunks of tokens) and decodes the text in between. The cache and the loop state are donated.
Stop strings are applied on the host, after each chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding

from vl2_jax.cache import KVCache
from vl2_jax.errors import InputError, out_of_memory_as
from vl2_jax.modules.language import LanguageModel
from vl2_jax.processor import left_pad, left_pad_positions
from vl2_jax.sampling import SamplingParams, sample

MIN_BUCKET = 64


def bucket(n: int) -> int:
    """The padded length for n tokens: 64, then 8 steps per octave (at most 12.5% padding).

    1042 -> 1152, 3000 -> 3072. Lengths in one bucket share compiled code.
    """
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    step = 1 << max(0, (n - 1).bit_length() - 4)
    return -(-n // step) * step


@struct.dataclass
class DecodeState:
    """Loop state. tokens [B, N] generated ids (pad after a row is done); done [B]; count [B] tokens
    generated per row; positions [B] RoPE position of the next fed token; seen [B, V] tokens in the prompt
    or answer (for the repetition penalty); step [] tokens generated so far; key: PRNG key."""

    cache: KVCache
    tokens: jax.Array
    done: jax.Array
    count: jax.Array
    positions: jax.Array
    seen: jax.Array
    step: jax.Array
    key: jax.Array


@dataclasses.dataclass
class GenerationResult:
    """Per row: the new token ids (EOS included when produced), their text (special tokens kept, EOS not
    shown), and why it ended: "stop" (EOS or a stop string) or "length" (max_new_tokens or the context)."""

    token_ids: list[list[int]]
    text: list[str]
    finish_reason: list[str]
    prompt_tokens: list[int]
    ttft_s: float = 0.0
    decode_s: float = 0.0

    @property
    def generated_tokens(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.generated_tokens, default=0) - 1
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else 0.0


class Generator:
    """Jitted prefill and decode of one model. Compiled functions are cached per shape bucket."""

    def __init__(self, model):
        """`model`: a `vl2_jax.VL2Model` (its parameters, placement and embedding)."""
        self.model = model
        self.traces = 0  # incremented each time prefill or decode is traced (tests count recompiles; the
        # embedding is `VL2Model._embed`, whose jit cache they read)
        self._empty_caches: dict[tuple[int, int], Callable[[], KVCache]] = {}
        # Prefill and decode run the language model alone, on its parameters alone: every leaf passed to
        # a jitted call costs host time (~3 us on a GPU host), and the vision tower has 300+ of them.
        module = model.module
        self._language = LanguageModel(model.cfg.language, module.dtype, module.runtime)

    @property
    def language_params(self) -> dict:
        """{"params": the language model's parameters}: what prefill and decode take."""
        return {"params": self.model.params["params"]["language"]}

    # -- jitted functions -----------------------------------------------------------------------------
    @functools.cached_property
    def prefill_chunk(self):
        """Jitted (language params, x [B, T, D], positions [B, T], valid [B, T], cache (donated), fresh
        (static)) -> (float32 logits [B, V] of the last token, cache): T tokens written into the cache."""

        def run(params, x, positions, valid, cache, fresh):
            self.traces += 1
            return self._language.apply(params, x, positions, valid, cache, fresh,
                                        method=LanguageModel.forward_cached)

        return jax.jit(run, donate_argnums=(4,), static_argnums=(5,))

    @functools.cached_property
    def _start(self):
        """First token from the prefill logits -> the initial DecodeState."""

        def run(logits, cache, positions, seen, sampling, seed, eos, pad, max_new):
            self.traces += 1
            # made here, not on the host: no dispatches of its own, and never tied to another mesh
            key, sub = jax.random.split(jax.random.key(seed))
            first = sample(logits, seen, sampling, sub)
            b = first.shape[0]
            tokens = jnp.full((b, max_new), pad, jnp.int32).at[:, 0].set(first)
            seen = seen.at[jnp.arange(b), first].set(True)
            return DecodeState(cache, tokens, first == eos, jnp.ones((b,), jnp.int32), positions, seen, jnp.int32(1), key)

        return jax.jit(run, donate_argnums=(1,), static_argnums=(8,))

    @functools.cached_property
    def decode(self):
        """Jitted (language params, DecodeState (donated), step limit [], sampling, eos [], pad []) ->
        DecodeState: the on-device loop until every row is done or `limit` tokens are generated."""
        language = self._language

        def run(params, state: DecodeState, limit, sampling, eos, pad):
            self.traces += 1

            def cond(s: DecodeState):
                return (s.step < limit) & ~jnp.all(s.done)

            def body(s: DecodeState):
                fed = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1, keepdims=False)
                x = language.apply(params, fed[:, None], method=LanguageModel.embed)
                logits, cache = language.apply(
                    params, x, s.positions[:, None], jnp.ones_like(fed, bool)[:, None], s.cache,
                    method=LanguageModel.forward_cached,
                )
                key, sub = jax.random.split(s.key)
                tok = sample(logits, s.seen, sampling, sub)
                tok = jnp.where(s.done, pad, tok)
                tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, tok, s.step, axis=1)
                seen = s.seen.at[jnp.arange(tok.shape[0]), tok].set(True)
                return DecodeState(
                    cache, tokens, s.done | (tok == eos), s.count + (~s.done).astype(jnp.int32),
                    s.positions + 1, seen, s.step + 1, key,
                )

            return jax.lax.while_loop(cond, body, state)

        return jax.jit(run, donate_argnums=(1,))

    # -- host side -----------------------------------------------------------------------------------
    def embed_prompt(self, batch, length: int) -> tuple[jax.Array, np.ndarray, np.ndarray]:
        """The batch left padded to `length` and embedded (vision included).

        Returns (embeddings [B, length, D] on the devices, ids [B, length], attention [B, length] bool).
        """
        x, ids = self.model.embed(batch, length)
        return x, ids, left_pad(batch.attention_mask, length, False).astype(bool)

    def run(
        self,
        batch,
        max_new_tokens: int = 512,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        stop: Sequence[str] = (),
        prefill_chunk: int | None = None,
        on_text: Callable[[int, str], None] | None = None,
        stream_every: int = 16,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Generates for a processor batch; see `VL2Model.generate` for the arguments."""
        m, cfg = self.model, self.model.cfg.language
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1 (got {max_new_tokens}).")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be at least 1 (got {prefill_chunk}).")
        attention = np.asarray(batch.attention_mask, bool)
        prompt_tokens = attention.sum(-1).astype(int).tolist()
        longest = max(prompt_tokens)
        limit = cfg.max_position_embeddings
        if longest > limit - 1:
            raise InputError(
                f"the prompt has {longest} tokens but the model's context is {limit} tokens "
                f"(max_position_embeddings), leaving no room for an answer; shorten the prompt or use fewer images."
            )
        # Positions stop at the context limit: that row then ends with finish reason "length".
        max_new = min(max_new_tokens, limit - longest)
        sampling = sampling or SamplingParams.make()
        shape = f"{len(prompt_tokens)} x {batch.input_ids.shape[1]} prompt tokens + {max_new} new"
        with m.mesh_context(), out_of_memory_as(f"while generating ({shape})"):
            return self._generate(batch, max_new, sampling, seed, stop, prefill_chunk, on_text, stream_every,
                                  ignore_eos, prompt_tokens)

    def empty_cache(self, batch: int, slots: int) -> KVCache:
        """An empty cache [batch, slots] from one jitted call (created eagerly, its ~25-55 zero arrays took 9-13 ms on an
        H200), directly in its shards under a mesh."""
        if (batch, slots) not in self._empty_caches:
            m = self.model
            make = functools.partial(KVCache.zeros, m.cfg.language, batch, slots, m.dtype)
            shardings = None
            if m.mesh is not None:
                specs = m.layout.cache_specs(jax.eval_shape(make))
                shardings = jax.tree.map(lambda p: NamedSharding(m.mesh, p), specs)
            self._empty_caches[batch, slots] = jax.jit(make, out_shardings=shardings)
        return self._empty_caches[batch, slots]()

    def _generate(self, batch, max_new, sampling, seed, stop, prefill_chunk, on_text, stream_every, ignore_eos,
                  prompt_tokens) -> GenerationResult:
        m, cfg = self.model, self.model.cfg.language
        bt = ("batch", None)
        t0 = time.perf_counter()
        length = bucket(batch.input_ids.shape[1])
        if prefill_chunk:
            length = -(-length // prefill_chunk) * prefill_chunk
        x, ids, attention = self.embed_prompt(batch, length)
        positions = left_pad_positions(attention)
        b = ids.shape[0]
        cache = self.empty_cache(b, bucket(length + max_new))
        chunk = prefill_chunk or length
        for start in range(0, length, chunk):
            sl = slice(start, start + chunk)
            pos, valid = m.put_many((positions[:, sl], bt), (attention[:, sl], bt))
            x_chunk = x if chunk == length else x[:, sl]  # (slicing is one more dispatch)
            logits, cache = self.prefill_chunk(self.language_params, x_chunk, pos, valid, cache, start == 0)
        seen = np.zeros((b, cfg.vocab_size), bool)
        rows = np.repeat(np.arange(b), length)
        seen[rows[attention.ravel()], ids.ravel()[attention.ravel()]] = True
        eos = np.int32(-1 if ignore_eos else cfg.eos_token_id)
        pad = np.int32(m.processor.pad_id)
        next_pos, seen = m.put_many((positions[:, -1] + 1, ("batch",)), (seen, bt))
        # jax.random.key(seed) keeps a seed's low 32 bits: the same key for every seed as on the host
        seed = np.uint32(int(seed) % 2**32)
        state = self._start(logits, cache, next_pos, seen, sampling, seed, eos, pad, max_new)
        done = m.fetch(state.done)
        ttft = time.perf_counter() - t0

        streamer = _Streamer(m.processor, b, stop, on_text) if (on_text or stop) else None
        t1 = time.perf_counter()
        step = 1
        while True:
            if streamer:
                stopped = streamer.update(m.fetch(state.tokens)[:, :step], m.fetch(state.count), done)
                if stopped.any():
                    done = done | stopped
                    state = state.replace(done=m.put(done, ("batch",)))
            if step >= max_new or done.all():
                break
            step = min(max_new, step + stream_every) if streamer else max_new
            state = self.decode(self.language_params, state, np.int32(step), sampling, eos, pad)
            step, done = int(m.fetch(state.step)), m.fetch(state.done)
        tokens, count = m.fetch(state.tokens), m.fetch(state.count)
        decode_s = time.perf_counter() - t1
        return self._result(tokens, count, prompt_tokens, stop, streamer, ttft, decode_s, cfg.eos_token_id)

    def _result(self, tokens, count, prompt_tokens, stop, streamer, ttft, decode_s, eos) -> GenerationResult:
        ids, texts, reasons = [], [], []
        for row in range(tokens.shape[0]):
            toks = tokens[row, : count[row]].tolist()
            reason = "stop" if toks and toks[-1] == eos else "length"
            cut = streamer.stop_at[row] if streamer else None
            if cut is not None:
                toks, reason = toks[: cut[0]], "stop"
            text = self.model.processor.decode(toks[:-1] if toks and toks[-1] == eos else toks)
            if cut is not None:
                text = text[: cut[1]]
            ids.append(toks)
            texts.append(text)
            reasons.append(reason)
        return GenerationResult(ids, texts, reasons, prompt_tokens, ttft, decode_s)


class _Streamer:
    """Host-side text of each row as chunks of tokens arrive: emits new text and finds stop strings."""

    def __init__(self, processor, rows: int, stop: Sequence[str], on_text):
        self.processor, self.stop, self.on_text = processor, tuple(s for s in stop if s), on_text
        self.sent = [""] * rows
        self.stop_at: list[tuple[int, int] | None] = [None] * rows  # (tokens kept, characters kept)

    def update(self, tokens: np.ndarray, count: np.ndarray, done: np.ndarray) -> np.ndarray:
        """Returns [B] bool: rows that just hit a stop string."""
        hit = np.zeros(len(self.sent), bool)
        for row, sent in enumerate(self.sent):
            if self.stop_at[row] is not None:
                continue
            toks = tokens[row, : count[row]].tolist()
            text = self.processor.decode(toks)
            found = [text.find(s, max(0, len(sent) - len(s))) for s in self.stop]
            found = [f for f in found if f >= 0]
            if found:
                at = min(found)
                keep = next(n for n in range(1, len(toks) + 1) if len(self.processor.decode(toks[:n])) > at)
                self.stop_at[row] = (keep, at)
                text, hit[row] = text[:at], True
            elif not done[row]:
                # Hold back a partial multi-byte character and anything a stop string may still complete.
                text = text.rstrip("\ufffd")
                hold = max((len(s) - 1 for s in self.stop), default=0)
                text = text[: max(len(sent), len(text) - hold)]
            elif toks and toks[-1] == self.processor.eos_id:
                text = self.processor.decode(toks[:-1])
            if self.on_text and len(text) > len(sent):
                self.on_text(row, text[len(sent) :])
            self.sent[row] = max(text, sent, key=len)
        return hit


def stream_text(model, batch, **kwargs) -> Iterator[str]:
    """Yields the text of a single-conversation batch as it is produced (runs generation in a thread)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue()
    box: dict = {}

    def work():
        try:
            box["result"] = model.generate(batch, on_text=lambda row, text: q.put(text), **kwargs)
        except BaseException as e:  # re-raised in the consumer
            box["error"] = e
        q.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (piece := q.get()) is not None:
        yield piece
    if "error" in box:
        raise box["error"]
