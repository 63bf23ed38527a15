"""One-shot generation on the engine: a list of conversations in, their answers out (and streamed).

The host loop admits requests into free slots (prefill + insert), runs the engine's decode calls over
the live slots, turns each call's tokens into text, applies stop strings, and frees a slot as soon as
its answer ends, admitting the next request there: a batch larger than `max_batch` runs through the
slots as they free up, with the same answers. Nothing here compiles: the engine's programs have fixed
shapes.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from vl2_jax.engine import NO_TOKEN, Engine, Request, Slots
from vl2_jax.sampling import RowSampling


@dataclasses.dataclass
class GenerationResult:
    """Per row: the new token ids (EOS included when produced), their text (special tokens kept, EOS not
    shown), and why it ended: "stop" (EOS or a stop string) or "length" (max_new_tokens or the slot's
    capacity). ttft_s: seconds to the first tokens of the first rows; decode_s: seconds after that."""

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
        """Tokens per second over the decode calls alone (the first token of each row excluded)."""
        steps = sum(max(0, n - 1) for n in self.generated_tokens)
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else 0.0


class RowText:
    """One answer's text as its tokens arrive: what is safe to show, and where a stop string cuts it.

    While the answer goes on, a trailing partial UTF-8 character and the last `len(stop) - 1`
    characters (which a stop string may still complete) are held back; when it ends, everything is
    released. The shown pieces always add up to the final text.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str], eos: int):
        self.decode, self.stop, self.eos = decode, tuple(s for s in stop if s), eos
        self.tokens: list[int] = []
        self.shown = 0  # characters handed out so far
        self.cut: tuple[int, int] | None = None  # (tokens kept, characters kept) at a stop string

    @property
    def ended_by_eos(self) -> bool:
        return bool(self.tokens) and self.tokens[-1] == self.eos

    def text(self) -> str:
        toks = self.tokens[: self.cut[0]] if self.cut else self.tokens
        text = self.decode(toks[:-1] if toks and toks[-1] == self.eos and not self.cut else toks)
        return text[: self.cut[1]] if self.cut else text

    def add(self, new: list[int], finished: bool) -> str:
        """Appends tokens; returns the newly showable text. Sets `cut` when a stop string appears."""
        if self.cut is None:
            self.tokens.extend(new)
            text = self.decode(self.tokens[:-1] if self.ended_by_eos else self.tokens)
            found = [i for i in (text.find(s, max(0, self.shown - len(s))) for s in self.stop) if i >= 0]
            if found:
                at = min(found)
                keep = next(n for n in range(1, len(self.tokens) + 1) if len(self.decode(self.tokens[:n])) > at)
                self.cut = (keep, at)
                finished = True
        text = self.text()
        if not finished:
            text = text.rstrip("\ufffd")
            hold = max((len(s) - 1 for s in self.stop), default=0)
            text = text[: max(self.shown, len(text) - hold)]
        piece = text[self.shown:]
        self.shown = max(self.shown, len(text))
        return piece


@dataclasses.dataclass
class _Live:
    row: int
    text: RowText
    length: int  # an upper bound of the slot's cached tokens


def run(engine: Engine, params, state: Slots, requests: Sequence[Request], decode: Callable[[list[int]], str],
        max_new_tokens: int, sampling: RowSampling, stop: Sequence[str] = (), eos: int = -1,
        on_text: Callable[[int, str], None] | None = None) -> tuple[GenerationResult, Slots]:
    """Generates an answer for every request; returns the result and the engine state (donated in).

    `eos`: the EOS token id (-1: generate max_new_tokens). `on_text(row, text)` receives each row's
    text as it becomes showable.
    """
    pending = collections.deque(enumerate(requests))
    free = list(range(engine.max_batch))
    live: dict[int, _Live] = {}
    texts: dict[int, RowText] = {}
    stop_mask = np.zeros((engine.max_batch,), bool)
    greedy = bool(sampling.temperature == 0)
    t0 = time.perf_counter()
    ttft = None

    def emit(row: int, piece: str) -> None:
        if piece and on_text:
            on_text(row, piece)

    while pending or live:
        admitted = []
        while pending and free:
            row, request = pending.popleft()
            slot = free.pop(0)
            stop_mask[slot] = False  # (a stop string of the slot's last answer)
            state = engine.prefill(params, state, slot, request, max_new_tokens, sampling, eos)
            texts[row] = RowText(decode, stop, eos)
            live[slot] = _Live(row, texts[row], len(request.ids) + 1)
            admitted.append(slot)
        if admitted:  # the first tokens: shown at once (time to first token), and some answers end here
            first, done = np.asarray(state.token), np.asarray(state.done)
            ttft = time.perf_counter() - t0 if ttft is None else ttft
            for slot in admitted:
                item = live[slot]
                emit(item.row, item.text.add([int(first[slot])], bool(done[slot])))
                if done[slot] or item.text.cut:
                    stop_mask[slot] = not done[slot]
                    _finish(live, free, slot)
            if not live:
                continue
        highest = max(live) + 1
        state, tokens = engine.decode(params, state, highest, max(item.length for item in live.values()), greedy,
                                      stop_mask)
        stop_mask = np.zeros_like(stop_mask)
        tokens, done = np.asarray(tokens), np.asarray(state.done)
        for slot in list(live):
            item = live[slot]
            new = [int(t) for t in tokens[slot] if t != NO_TOKEN]
            item.length += len(new)
            emit(item.row, item.text.add(new, bool(done[slot])))
            if done[slot] or item.text.cut:
                stop_mask[slot] = not done[slot]  # a stop string: the slot ends before the next step
                _finish(live, free, slot)
    if stop_mask.any():  # answers cut by a stop string in the last call: their slots end now
        state = engine.release(state, stop_mask)
    decode_s = time.perf_counter() - t0 - (ttft or 0.0)
    rows = [texts[i] for i in range(len(requests))]
    result = GenerationResult(
        token_ids=[t.tokens[: t.cut[0]] if t.cut else list(t.tokens) for t in rows],
        text=[t.text() for t in rows],
        finish_reason=["stop" if t.cut or t.ended_by_eos else "length" for t in rows],
        prompt_tokens=[len(r.ids) for r in requests], ttft_s=ttft or 0.0, decode_s=decode_s)
    return result, state


def _finish(live: dict[int, _Live], free: list[int], slot: int) -> None:
    del live[slot]
    free.append(slot)
    free.sort()


def stream_text(model, batch, **kwargs) -> Iterator[str]:
    """Yields the text of a single-conversation batch as it is produced (generation runs in a thread)."""
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
