"""Generation on the engine: the host side of continuous batching (`Batcher`), and one-shot batches
on it (`run`: a list of conversations in, their answers out, streamed as they come).

The batcher admits jobs into free slots (prefill + insert), runs the engine's decode calls over the
live slots, turns each call's tokens into text, applies stop strings, and frees a slot as soon as its
answer ends, admitting the next job there: a batch larger than `max_batch` runs through the slots as
they free up, with the same answers. Nothing here compiles: the engine's programs have fixed shapes.
The server's scheduler drives the same batcher from its own thread.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import numbers
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from vl2_jax.engine import NO_TOKEN, CompileWatch, Engine, Prefill, Request, Slots, smallest_at_least
from vl2_jax.errors import InputError
from vl2_jax.prefix_cache import SlotPrefixes, TileFeatures, signature, tile_digests
from vl2_jax.sampling import RowSampling


@dataclasses.dataclass
class GenerationResult:
    """Per row: the new token ids (EOS included when produced), their text (special tokens kept, EOS not
    shown), and why it ended: "stop" (EOS or a stop string) or "length" (max_new_tokens or the slot's
    capacity). ttft_s: seconds to the first tokens of the first rows (any compiling before them
    included); decode_s: seconds after that, less the one-time compiling of programs then (a first
    run's decode programs); compile_s: seconds tracing and compiling programs of new shapes during the
    call (0 once `warmup` has compiled them all, or their shapes have run before)."""

    token_ids: list[list[int]]
    text: list[str]
    finish_reason: list[str]
    prompt_tokens: list[int]
    ttft_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0

    @property
    def generated_tokens(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second over the decode calls alone (the first token of each row excluded); 0.0
        where no row decoded (one-token answers)."""
        steps = sum(max(0, n - 1) for n in self.generated_tokens)
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Detokenizer:
    """What turns answers' token ids into text: `decode(ids)`, whether its pieces join (`joins`:
    `Tokenizer.pieces_join`) and the ids of the special tokens (`special`: `Tokenizer.special_ids`)."""

    decode: Callable[[list[int]], str]
    joins: bool = False
    special: frozenset[int] = frozenset()

    @classmethod
    def of(cls, tokenizer) -> Detokenizer:
        """A `Tokenizer`'s (`decode`, `pieces_join`, `special_ids`)."""
        return cls(tokenizer.decode, tokenizer.pieces_join, frozenset(tokenizer.special_ids))


class RowText:
    """One answer's text as its tokens arrive: what is safe to show, and where a stop string cuts it.

    While the answer goes on, a trailing partial UTF-8 character and the last `len(stop) - 1`
    characters (which a stop string may still complete) are held back; when it ends, everything is
    released. The shown pieces always add up to the final text.

    The text keeps special tokens (`detok.special`: their ids), but a stop string matches only in the
    text of ordinary tokens: never within, partly within or across a special token's text (as in vLLM,
    SGLang and transformers, whose default text leaves special tokens out).

    `detok.joins`: `decode(a + b) == decode(a) + decode(b)` wherever `decode(a)` ends on a whole
    character (`Tokenizer.pieces_join`: a byte-level decoder). Then the text of all but the last few tokens is
    settled as it grows and only the tokens after it are decoded again at each step (a long answer
    costs linear time, not quadratic); otherwise the whole answer is decoded at each step.
    """

    LAG = 8  # tokens decoded again at each step, at least, past the settled text

    def __init__(self, detok: Detokenizer, stop: Sequence[str], eos: int):
        self.decode, self.joins, self.special = detok.decode, detok.joins, detok.special
        self.stop, self.eos = tuple(s for s in stop if s), eos
        self.tokens: list[int] = []
        self._opaque: list[tuple[int, int]] = []  # (start, end) characters of each special token's text, in order
        self._scanned = 0  # the answer's tokens looked at for special tokens
        self.shown = 0  # characters handed out so far
        self.cut: tuple[int, int] | None = None  # (tokens kept, characters kept) at a stop string
        self.matched: str | None = None  # the stop string that cut it
        self._settled, self._settled_text = 0, ""  # the first tokens and their text (`joins`)

    @property
    def ended_by_eos(self) -> bool:
        return bool(self.tokens) and self.tokens[-1] == self.eos

    def _text_of(self, n: int) -> str:
        """The text of the first `n` tokens."""
        if n >= self._settled:
            return self._settled_text + self.decode(self.tokens[self._settled:n])
        return self.decode(self.tokens[:n])

    def _answer_tokens(self) -> int:
        """Tokens whose text is the answer's (all but a final EOS)."""
        return len(self.tokens) - 1 if self.ended_by_eos else len(self.tokens)

    def text(self) -> str:
        if self.cut:
            return self._text_of(self.cut[0])[: self.cut[1]]
        return self._text_of(self._answer_tokens())

    def add(self, new: list[int], finished: bool) -> str:
        """Appends tokens; returns the newly showable text. Sets `cut` when a stop string appears."""
        if self.cut is None:
            self.tokens.extend(new)
            text = self._text_of(self._answer_tokens())
            self._note_special()
            found = [(i, s) for s in self.stop if (i := self._find(text, s, max(0, self.shown - len(s)))) >= 0]
            if found:
                at, self.matched = min(found, key=lambda hit: hit[0])  # (the earliest; the first listed on a tie)
                first = self._settled + 1 if at >= len(self._settled_text) else 1  # (a shorter prefix holds no more)
                keep = next(n for n in range(first, len(self.tokens) + 1) if len(self._text_of(n)) > at)
                self.cut = (keep, at)
                finished = True
            else:
                self._settle()
        text = self.text()
        if not finished:
            text = text.rstrip("\ufffd")
            hold = max((len(s) - 1 for s in self.stop), default=0)
            opaque_end = min(len(text), self._opaque[-1][1]) if self._opaque else 0  # (no stop string begins before)
            text = text[: max(self.shown, len(text) - hold, opaque_end)]
        piece = text[self.shown:]
        self.shown = max(self.shown, len(text))
        return piece

    def _note_special(self) -> None:
        """Notes where the text of each special token among the answer's new tokens lies."""
        for n in range(self._scanned, self._answer_tokens()):
            if self.tokens[n] in self.special:
                self._opaque.append((len(self._text_of(n)), len(self._text_of(n + 1))))
        self._scanned = max(self._scanned, self._answer_tokens())

    def _find(self, text: str, stop: str, start: int) -> int:
        """Where `stop` first occurs in `text` from `start` on, wholly outside special tokens' text (-1: nowhere)."""
        at = text.find(stop, start)
        while at >= 0:
            k = bisect.bisect_right(self._opaque, at, key=lambda span: span[1])  # the first span ending after `at`
            if k == len(self._opaque) or self._opaque[k][0] >= at + len(stop):
                return at
            at = text.find(stop, self._opaque[k][1])  # (any match starting before that span's end overlaps it)
        return at

    def _settle(self) -> None:
        """With `joins`, settles the text of all but the last LAG tokens (in steps of LAG or more, and
        only where it ends on a whole character)."""
        upto = self._answer_tokens() - self.LAG
        if not self.joins or upto - self._settled < self.LAG:
            return
        piece = self.decode(self.tokens[self._settled:upto])
        if not piece.endswith("\ufffd"):  # (else it may end inside a character: later)
            self._settled, self._settled_text = upto, self._settled_text + piece


@dataclasses.dataclass(eq=False)
class Job:
    """One request for the `Batcher`: a prompt, how long an answer may be, its per-row sampling settings,
    stop strings and EOS id (-1: never stop at EOS). `on_update(job, text, token_ids)` is called (on the
    batcher's thread) with each piece of newly showable text and the new token ids, and once more, maybe
    with nothing new, when the job finishes.

    Filled by the batcher: `text` (a `RowText`), `finish_reason` ("stop": EOS or a stop string,
    "length": max_new_tokens or the slot is full, "abort": cancelled, "error": `error` says why),
    `submitted` and `first_token_at` (perf_counter seconds)."""

    request: Request
    max_new_tokens: int
    sampling: RowSampling
    stop: tuple[str, ...] = ()
    eos: int = -1
    on_update: Callable[[Job, str, list[int]], None] | None = None
    text: RowText | None = None
    finish_reason: str | None = None
    error: str | None = None
    submitted: float = 0.0
    first_token_at: float | None = None
    cached_tokens: int = 0  # prompt tokens a slot already held (the prefix cache)
    slot: int = -1  # the engine slot it was given (-1: none yet)
    reported: int = 0  # token ids handed to on_update so far
    signature: np.ndarray | None = None  # (prefix_cache.signature, with the prefix cache on)
    digests: list[int] | None = None  # (prefix_cache.tile_digests of its tiles, likewise)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def greedy(self) -> bool:
        return bool(self.sampling.temperature == 0)

    @property
    def token_ids(self) -> list[int]:
        """The answer's token ids (EOS included when produced; cut at a stop string)."""
        t = self.text
        return t.tokens[: t.cut[0]] if t.cut else list(t.tokens)

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.ids)


def sign(job: Job, side: int) -> None:
    """Computes `job.signature` (the prefix cache's key: token ids, image tokens by their tile's pixel
    digest) ahead of admission, off the thread that drives the device."""
    r = job.request
    job.digests = tile_digests(r.tiles)
    job.signature = signature(r.ids, r.src, r.image_mask, r.tiles, side, job.digests)


class Batcher:
    """Continuous batching on the engine, on the host: jobs join free slots and leave as they end.

    Each `step()` admits waiting jobs into free slots (checked and planned: a prompt's tiles are
    encoded and its tokens embedded just before its first chunk runs; with the prefix cache, the next
    job waits, and those behind it with it, while it shares a longer start with a prompt being
    prefilled than with any slot), runs prefill chunks of the admitted prompts up to `prefill_budget`
    tokens (None: all of them; otherwise at least one chunk, so a long prompt's prefill is spread over
    several steps while the running answers go on decoding; the first chunks of prompts waiting
    together run in one call per chunk length), inserts the first tokens of the finished prefills,
    dispatches one decode call over the live slots (none once every live answer is full: the call
    before ends them), and then reads the previous call's tokens while that one runs on the device (a
    step that inserted first tokens reads them before dispatching, for the time to first token). A
    job's tokens become text (`RowText`: UTF-8 safe, stop strings cut exactly) and go to its
    `on_update`. The engine state lives in `state` (donated to every program). Not thread-safe: one
    thread drives a batcher (the server's scheduler thread, or `run`).
    """

    def __init__(self, engine: Engine, params, state: Slots, detok: Detokenizer,
                 prefill_budget: int | None = None, prefixes: SlotPrefixes | None = None,
                 features: TileFeatures | None = None):
        self.engine, self.params, self.state, self.detok = engine, params, state, detok
        self.prefill_budget = prefill_budget
        if prefixes is None and engine.runtime.prefix_cache:
            prefixes = SlotPrefixes(engine.max_batch, engine.chunks[0])
        self.prefixes = prefixes  # what free slots still hold (None: no prefix cache)
        self.features = features  # tiles encoded lately (None: no feature cache)
        self.pending: collections.deque[Job] = collections.deque()
        self.free = list(range(engine.max_batch))
        self.prefilling: list[tuple[int, Job, Prefill]] = []  # admitted, chunks under way, in order
        self.live: dict[int, Job] = {}  # slot -> a job decoding there (as far as the host has read)
        self.bound = np.zeros((engine.max_batch,), np.int64)  # upper bounds of the slots' cached lengths
        self.ends = np.zeros((engine.max_batch,), np.int64)  # cached lengths at which the slots' answers are full
        self.unread: collections.deque = collections.deque()  # device outputs not read yet, in order
        self.stop_mask = np.zeros((engine.max_batch,), bool)  # slots to end before the next decode call

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.prefilling or self.live or self.unread)

    @property
    def running(self) -> int:
        """Jobs holding a slot (prefilling or decoding)."""
        return len(self.prefilling) + len(self.live)

    def submit(self, job: Job) -> Job:
        job.text = RowText(self.detok, job.stop, job.eos)
        job.submitted = job.submitted or time.perf_counter()
        self.pending.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """Ends `job` now ("abort"), freeing its slot; its remaining tokens are never read."""
        if job.finished:
            return
        if job in self.pending:
            self.pending.remove(job)
        for entry in self.prefilling:
            if entry[1] is job:
                self.prefilling.remove(entry)
                self._free(entry[0], forget=True)
        for slot, other in list(self.live.items()):
            if other is job:
                self.stop_mask[slot] = True
                del self.live[slot]
                self._free(slot, job)
        self._end(job, "abort")

    def jobs(self) -> list[Job]:
        """Every job it holds: waiting, prefilling, decoding."""
        return [*self.pending, *(entry[1] for entry in self.prefilling), *self.live.values()]

    def fail_all(self, message: str) -> None:
        """Ends every job it holds with "error" (`message`): after a device program failed, when the
        state is no longer usable."""
        for job in self.jobs():
            job.error = message
            self._end(job, "error")
        self.pending.clear(), self.prefilling.clear(), self.live.clear(), self.unread.clear()

    def step(self) -> bool:
        """One round (see the class docstring). Returns whether any work is left."""
        engine = self.engine
        admitted = []
        while self.pending and self.free:
            if self._sharer_prefilling(self.pending[0]):
                break  # (it waits for that prompt's prefill; the jobs behind it wait their turn)
            job = self.pending.popleft()
            slot, start = self._choose_slot(job)
            job.slot = slot
            try:
                if self.features is not None and job.digests is None:
                    job.digests = tile_digests(job.request.tiles)
                prefill = engine.plan(job.request, start)
                self.prefilling.append((slot, job, prefill))
                admitted.append((slot, job, prefill))
                job.cached_tokens = start
            except InputError as e:
                self._free(slot, forget=True)
                job.error = str(e)
                self._end(job, "error")
        if admitted and engine.executables is not None:  # (their programs load side by side, from the store)
            jobs = [job for _, job, _ in admitted]
            engine.preload(self.params, self.state, engine.forecast(
                [p for _, _, p in admitted], [job.greedy for job in jobs],
                max([*self.live, *(s for s, _, _ in admitted)]) + 1,
                int(max((self.bound[s] for s in self.live), default=0)), max(job.max_new_tokens for job in jobs),
                all(job.greedy for job in [*jobs, *self.live.values()])))
        self._prefill()
        if any(item[0] == "first" for item in self.unread):
            self._read(keep=0)
        dispatched = False
        # (a call over slots whose answers are all full by now would only produce tokens past their ends:
        # their last call, still unread, has ended them)
        if self.live and any(self.bound[s] < self.ends[s] for s in self.live):
            live = self.live
            longest = int(max(self.bound[s] for s in live))
            greedy = all(job.greedy for job in live.values())
            self.state, out = engine.decode(self.params, self.state, max(live) + 1, longest, greedy,
                                            self.stop_mask.copy())  # (the host's mask changes before the copy is done)
            self.stop_mask[:] = False
            for slot in live:
                self.bound[slot] += out.shape[1] - 1  # (the call's steps)
            self.unread.append(("decode", out, dict(live), None))
            dispatched = True
        elif self.stop_mask.any() and not self.prefilling:
            self.state = engine.release(self.state, self.stop_mask.copy())
            self.stop_mask[:] = False
        self._read(keep=1 if dispatched else 0)
        return self.busy

    def _running(self) -> dict[int, np.ndarray]:
        """{slot: prompt signature} of the jobs decoding (their prompts are all in the cache)."""
        return {slot: job.signature for slot, job in self.live.items() if job.signature is not None}

    def _sharer_prefilling(self, job: Job) -> bool:
        """Whether `job` should wait for a prompt still being prefilled that shares a longer start with it
        than any slot holds now (a burst of requests with one system prompt or image): once that one
        decodes, `job` continues from a copy of its entries instead of prefilling the same start again
        beside it (as SGLang's scheduler holds back a request whose prefix another in its batch is about
        to cache)."""
        if self.prefixes is None or not self.prefilling:
            return False
        if job.signature is None:
            sign(job, self.engine.side)
        later = self.prefixes.longest([(s, other.signature) for s, other, _ in self.prefilling
                                       if other.signature is not None], job.signature)[1]
        if not later:  # (the common case, found without looking at the slots)
            return False
        candidates = [(s, self.prefixes.held[s]) for s in self.free] + list(self._running().items())
        return later > self.prefixes.longest(candidates, job.signature)[1]

    def _choose_slot(self, job: Job) -> tuple[int, int]:
        """(slot, cached prompt tokens) for a job about to be admitted; the slot leaves the free list."""
        if self.prefixes is None:
            return self.free.pop(0), 0
        if job.signature is None:  # (a server signs its jobs on its host threads: `sign`)
            sign(job, self.engine.side)
        in_use = self.engine.max_batch - len(self.free)
        below = smallest_at_least(in_use + 1, self.engine.slot_buckets)  # (the bucket one more job needs)
        slot, start, moves = self.prefixes.choose(self.free, job.signature, below, self._running())
        for kind, a, b in moves:  # (a prefix comes down; the entries the job would overwrite go up)
            self.state = self.engine.move_slots(self.state, kind, a, b)
        self.free.remove(slot)
        return slot, start

    def _prefill(self) -> None:
        """Prefills the admitted prompts in order up to the budget: the first chunks of the prompts
        waiting together in calls of one chunk length each (`Engine.pick_together`), later chunks (and
        prompts continued past a cached prefix) likewise (`Engine.pick_later`); the prompts whose chunks
        are all written get their first tokens (those of one call together). In admission order: prompts
        behind a long one wait for its later chunks (no prompt is overtaken for ever)."""
        used, budget = 0, self.prefill_budget
        while self.prefilling:
            first = self.prefilling[0][2].at_first_chunk
            pick, run = ((self.engine.pick_together, self.engine.prefill_first) if first else
                         (self.engine.pick_later, self.engine.prefill_later))
            picked = pick([p for _, _, p in self.prefilling], None if budget is None else budget - used) or (
                [] if used else [0])
            if not picked:
                return
            group = [self.prefilling[i] for i in picked]
            for entry in group:
                self._begin(entry)  # (a prompt continued past a cached prefix starts at a later chunk)
            chunk = max(p.next_chunk() for _, _, p in group)
            self.state, logits = run(self.params, self.state, [(s, p) for s, _, p in group])
            used += logits.shape[0] * chunk
            self._insert([entry if entry[2].finished else None for entry in group], logits)

    def _begin(self, entry: tuple[int, Job, Prefill]) -> None:
        """Puts a prompt on the device (tiles encoded, tokens embedded) just before its first chunk runs,
        not at admission, so that its encoding does not go ahead of earlier prompts' prefill."""
        _, job, prefill = entry
        if not prefill.begun:
            self.engine.begin(self.params, prefill, self.features, job.digests)

    def _insert(self, group: list[tuple[int, Job, Prefill] | None], logits) -> None:
        """The first tokens of the finished prompts in `group` (None: a row of `logits` [N, V] to skip):
        their slots go live and the tokens are read before the next decode call."""
        entries = {i: entry for i, entry in enumerate(group) if entry is not None}
        if not entries:
            return
        self.state, first = self.engine.insert(self.state, logits, [
            None if e is None else (e[0], e[2], e[1].max_new_tokens, e[1].sampling, e[1].eos) for e in group])
        for slot, job, prefill in entries.values():
            self.stop_mask[slot] = False  # (the slot's previous answer, if a stop string ended it)
            self.live[slot] = job
            self.bound[slot] = prefill.length + 1
            self.ends[slot] = min(prefill.length + int(job.max_new_tokens), self.engine.max_seq_len)
        self.prefilling = [entry for entry in self.prefilling if not entry[2].finished]
        self.unread.append(("first", first, {e[0]: e[1] for e in entries.values()},
                            {e[0]: i for i, e in entries.items()}))

    def _read(self, keep: int) -> None:
        """Reads device outputs in order until `keep` are left, handing each job its new tokens."""
        while len(self.unread) > keep:
            kind, out, jobs, rows = self.unread.popleft()
            out = np.asarray(out)
            now = time.perf_counter()
            for slot, job in jobs.items():
                if job.finished:  # (cancelled, or ended by an earlier read: these tokens are past its end)
                    continue
                if kind == "first":
                    new, done = [int(out[rows[slot], 0])], bool(out[rows[slot], 1])
                    job.first_token_at = now
                else:
                    new, done = [int(t) for t in out[slot, :-1] if t != NO_TOKEN], bool(out[slot, -1])
                piece = job.text.add(new, done)
                if done or job.text.cut:
                    self.stop_mask[slot] = not done  # a stop string: the slot ends before the next call
                    del self.live[slot]
                    self._free(slot, job)
                    self._end(job, "stop" if job.text.cut or job.text.ended_by_eos else "length", piece)
                else:
                    self._report(job, piece)

    def _free(self, slot: int, ended: Job | None = None, forget: bool = False) -> None:
        """Returns `slot` to the free list; with the prefix cache, it keeps what `ended` (the job that
        decoded there) left in it, or nothing (`forget`: a prefill cut short)."""
        self.free.append(slot)
        self.free.sort()
        if self.prefixes is not None:
            if ended is not None and ended.signature is not None:
                self.prefixes.keep(slot, ended.signature, ended.token_ids)
            elif forget:
                self.prefixes.forget(slot)

    def _report(self, job: Job, piece: str) -> None:
        ids = job.token_ids
        new, job.reported = ids[job.reported:], len(ids)
        if job.on_update and (piece or new or job.finished):
            job.on_update(job, piece, new)

    def _end(self, job: Job, reason: str, piece: str = "") -> None:
        job.finish_reason = reason
        self._report(job, piece)


def run(engine: Engine, params, state: Slots, requests: Sequence[Request], detok: Detokenizer,
        max_new_tokens: int, sampling: RowSampling, stop: Sequence[str] = (), eos: int = -1,
        on_text: Callable[[int, str], None] | None = None) -> tuple[GenerationResult, Slots]:
    """Generates an answer for every request; returns the result and the engine state (donated in).

    `eos`: the EOS token id (-1: generate max_new_tokens). `on_text(row, text)` receives each row's
    text as it becomes showable. Rows beyond the slots wait for one to free up.
    """
    rows: dict[int, int] = {}

    def update(job: Job, piece: str, ids: list[int]) -> None:
        if piece and on_text:
            on_text(rows[id(job)], piece)

    t0 = time.perf_counter()
    jobs = [Job(request, max_new_tokens, sampling, tuple(stop), eos, update, submitted=t0) for request in requests]
    rows.update((id(job), row) for row, job in enumerate(jobs))
    with CompileWatch() as compiling:
        state = run_jobs(engine, params, state, jobs, detok, on_done=lambda job: None)
    errors = [job.error for job in jobs if job.finish_reason == "error"]
    if errors:
        raise InputError(errors[0])
    first = min(job.first_token_at for job in jobs)
    # decode time without the one-time compiling of decode programs (reported apart by the callers)
    decode_s = max(0.0, time.perf_counter() - first - compiling.seconds_after(first))
    ttft = first - t0
    result = GenerationResult(
        token_ids=[job.token_ids for job in jobs], text=[job.text.text() for job in jobs],
        finish_reason=[job.finish_reason for job in jobs], prompt_tokens=[job.prompt_tokens for job in jobs],
        ttft_s=ttft, decode_s=decode_s)
    return result, state


def run_jobs(engine: Engine, params, state: Slots, jobs: Iterable[Job], detok: Detokenizer,
             on_done: Callable[[Job], None]) -> Slots:
    """Runs `jobs` (each with its own settings) through a Batcher, drawing the next from the iterable only
    when a slot is about to free up, and calls `on_done(job)` as each finishes (in finishing order).
    Returns the engine state (donated in)."""
    batcher = Batcher(engine, params, state, detok)
    source, running, exhausted = iter(jobs), [], False
    while True:
        while not exhausted and len(running) < engine.max_batch:
            job = next(source, None)
            if job is None:
                exhausted = True
            else:
                running.append(batcher.submit(job))
        if not batcher.busy and exhausted:
            break
        batcher.step()
        for job in [j for j in running if j.finished]:
            running.remove(job)
            on_done(job)
    for job in running:
        on_done(job)
    return batcher.state


def check_max_new_tokens(max_new_tokens) -> None:
    """Raises InputError unless `max_new_tokens` is a whole number (not a bool) of at least 1."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise InputError(f"max_new_tokens must be a whole number (got {max_new_tokens!r}).")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1 (got {max_new_tokens}).")


def stop_strings(stop) -> tuple[str, ...]:
    """`stop` as stop strings: one string, or a sequence of them (None: none). Raises InputError for
    anything else."""
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InputError(f"stop must be a string or a list of strings (got {stop!r}).")
    return tuple(stop)


def stream_text(model, batch, **kwargs) -> Iterator[str]:
    """Yields the text of a single-conversation batch as it is produced (generation runs in a thread).
    A batch of several conversations is refused (InputError): their pieces would interleave. Closing
    the iterator early (leaving its loop) ends the answer at its next piece of text and waits for that."""
    import queue
    import threading

    rows = len(model.requests(batch))
    if rows != 1:
        raise InputError(f"stream takes one conversation, not a batch of {rows}; use generate(batch, on_text=...) "
                         "for several (on_text gets each row's number with its text).")

    q: queue.Queue = queue.Queue()
    box: dict = {}
    closed = threading.Event()

    def on_text(row: int, text: str) -> None:
        if closed.is_set():
            raise _StreamClosed  # (ends `generate` in the worker; nobody reads it)
        q.put(text)

    def work():
        try:
            box["result"] = model.generate(batch, on_text=on_text, **kwargs)
        except BaseException as e:  # re-raised in the consumer
            box["error"] = e
        q.put(None)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while (piece := q.get()) is not None:
            yield piece
    finally:
        closed.set()  # (the consumer left early, or the answer is over)
        worker.join()
    if "error" in box:
        raise box["error"]


class _StreamClosed(Exception):
    """Raised in `stream_text`'s worker when its consumer has gone."""
