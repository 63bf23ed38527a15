"""The server's scheduler: one thread that owns the engine and runs continuous batching for everyone.

Requests arrive from the HTTP layer's event loop as `Job`s (prompt ready for the device, its own
sampling settings, stop strings, limits); `submit` queues one and returns a `Handle` whose `events()`
yields the answer's text as it is produced. The device thread drives a `generation.Batcher`: between
decode calls it takes new jobs into free slots (a long prompt's prefill spread over several calls, so
running answers keep streaming) and applies cancellations (a client that went away frees its slot at
once). Events cross back to the event loop with `call_soon_threadsafe`; nothing on the event loop
waits for the device.

The queue is bounded (`max_queue` jobs waiting for a slot beyond the free ones): `submit` raises `QueueFull` beyond it, which
the API turns into 429. A failure of a device program ends every job in flight with an "error" event
and starts from a fresh engine state; the scheduler keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator

from vl2_jax.generation import Batcher, Detokenizer, Job
from vl2_jax.prefix_cache import TileFeatures

__all__ = ["Event", "Handle", "Job", "QueueFull", "Scheduler"]


class QueueFull(Exception):
    """More jobs wait for a slot than the scheduler's `max_queue`."""


@dataclasses.dataclass(frozen=True)
class Event:
    """A piece of one answer: newly showable `text` and the new `token_ids`; `finish_reason` is None
    until the last event ("stop", "length", "abort" or "error", then `error` says why). Counts so far:
    the prompt's tokens, the answer's tokens, and prompt tokens served from the prefix cache; in the last
    event of an answer a stop string ended, `matched` is that string."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: str | None = None
    matched: str | None = None


class Handle:
    """One submitted job: its events, in order, and `cancel()`. Made by `Scheduler.submit`; events go to
    the event loop that submitted it (`events()`), or, submitted outside one, to `iter_events()`."""

    def __init__(self, job: Job, scheduler: Scheduler, measured: bool = True):
        self.job, self._scheduler = job, scheduler
        self.measured = measured  # (False: a health probe, kept out of the metrics)
        try:
            self._loop = asyncio.get_running_loop()
            self._queue: asyncio.Queue | queue.Queue = asyncio.Queue()
        except RuntimeError:
            self._loop, self._queue = None, queue.Queue()

    def _push(self, event: Event) -> None:  # (the device thread)
        if self._loop is None:
            self._queue.put(event)
        else:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody is listening
                pass

    async def events(self) -> AsyncIterator[Event]:
        """The answer's events, the last one with a finish_reason."""
        while True:
            event = await self._queue.get()
            yield event
            if event.finish_reason is not None:
                return

    def iter_events(self, timeout: float | None = None) -> Iterator[Event]:
        """`events()` for a job submitted outside an event loop (blocking)."""
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        """Ends the job now ("abort"): the device thread frees its slot before its next step."""
        self._scheduler._cancel(self.job)


class Scheduler:
    """Continuous batching over `model`'s engine on a thread of its own (see the module docstring).

    `metrics`, if given, receives: observe_ttft(seconds from submit to first token), observe_itl(seconds
    per token between a job's updates), add_tokens(n), set_queue(n), set_running(n) and
    cache_lookup(hit_tokens, prompt_tokens). `prefill_budget`: prompt tokens (chunks as padded)
    prefilled between two decode calls, at least one chunk (default: the runtime's `prefill_tokens`).
    """

    def __init__(self, model, max_queue: int = 256, metrics=None, prefill_budget: int | None = None,
                 feature_cache_bytes: int = 1 << 30):
        self.model, self.max_queue, self.metrics = model, max_queue, metrics
        self.prefill_budget = model.engine.runtime.prefill_tokens if prefill_budget is None else prefill_budget
        self.feature_cache_bytes = feature_cache_bytes
        self._cv = threading.Condition()
        self._inbox: list[tuple[Job, Handle]] = []
        self._cancels: list[Job] = []
        self._handles: dict[int, Handle] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batcher: Batcher | None = None
        self._last_update: dict[int, float] = {}
        self._flush = False
        self.stepped_at = 0.0  # time.monotonic() when the device thread last finished a step
        self._cancel_all = False  # (set by `stop` when its drain time is up: the device thread ends every job)
        self._hurry = threading.Event()

    # -- the event loop's side ------------------------------------------------------------------------
    def submit(self, job: Job, measured: bool = True) -> Handle:
        """Queues `job` (thread-safe) -> its Handle. Raises QueueFull when `max_queue` jobs already wait.
        `measured=False`: a probe (`/health_generate`), whose tokens and latencies the metrics leave out."""
        handle = Handle(job, self, measured)
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            waiting = self._queued()
            free = len(self._batcher.free) if self._batcher else self.model.engine.max_batch
            if waiting >= self.max_queue + free:  # (jobs a free slot takes at once do not wait)
                n = waiting - free
                raise QueueFull(f"{n} request{' is' if n == 1 else 's are'} waiting for a slot, as many as the "
                                "queue holds")
            job.submitted = job.submitted or time.perf_counter()  # (the API may set it at the request's arrival)
            job.on_update = self._on_update
            self._handles[id(job)] = handle
            self._inbox.append((job, handle))
            self._cv.notify()
        return handle

    def _cancel(self, job: Job) -> None:
        with self._cv:
            self._cancels.append(job)
            self._cv.notify()

    def _queued(self) -> int:
        """Jobs submitted and not yet in a slot, less those cancelled: a request that timed out or went
        away while the device thread was busy (e.g. compiling) leaves the queue at once, not when the
        thread gets to its cancel. Read under the lock (the inbox, the cancels); `list()` copies the
        batcher's deque in one step."""
        gone = {id(job) for job in self._cancels}
        waiting = [job for job, _ in self._inbox] + (list(self._batcher.pending) if self._batcher else [])
        return sum(id(job) not in gone for job in waiting)

    def stats(self) -> dict:
        b = self._batcher
        with self._cv:
            queued = self._queued()
        return {"queued": queued, "running": b.running if b else 0, "max_batch": self.model.engine.max_batch,
                "max_seq_len": self.model.engine.max_seq_len, "alive": bool(self._thread and self._thread.is_alive())}

    def flush_cache(self) -> None:
        """Forgets every prefix the free slots hold and every tile's kept features (the prefix and
        feature caches; the device thread applies it before its next step). Running jobs are not affected,
        and a new prompt may still continue from a running job's prompt (`prefix_cache`)."""
        with self._cv:
            self._flush = True
            self._cv.notify()

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self._batcher = self._new_batcher(self.model.take_state())
        self._thread = threading.Thread(target=self._run, name="vl2-scheduler", daemon=True)
        self._thread.start()
        return self

    def _new_batcher(self, state) -> Batcher:
        """A batcher over the model's engine, with a feature cache where the prefix cache is on."""
        keep = self.model.engine.runtime.prefix_cache and self.feature_cache_bytes > 0
        return Batcher(self.model.engine, self.model.params, state, Detokenizer.of(self.model.processor.tokenizer),
                       self.prefill_budget, features=TileFeatures(self.feature_cache_bytes) if keep else None)

    def stop(self, timeout: float = 30.0) -> None:
        """Refuses new jobs, lets running ones finish for up to `timeout` seconds, cancels the rest, and
        hands the engine state back to the model."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        deadline = time.monotonic() + timeout
        while self._thread and self._thread.is_alive() and time.monotonic() < deadline and not self._hurry.is_set():
            self._thread.join(0.05)
        if self._thread and self._thread.is_alive():
            with self._cv:
                self._cancel_all = True
                self._cv.notify()
            self._thread.join(5.0)

    def hurry(self) -> None:
        """Cuts short the drain of a `stop` under way (a second Ctrl-C): what still runs is cancelled now."""
        self._hurry.set()

    # -- the device thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            b = self._batcher
            with self._cv:
                while not (self._inbox or self._cancels or b.busy or self._stopping):
                    self._cv.wait()
                if self._stopping and not (self._inbox or b.busy):
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                flush, self._flush = self._flush, False
                cancel_all = self._cancel_all
            if flush and b.prefixes is not None:
                b.prefixes.clear()
            if flush and b.features is not None:
                b.features.clear()
            for job, _ in inbox:
                b.submit(job)
            for job in b.jobs() if cancel_all else cancels:  # (every job it holds, the inbox's just submitted)
                b.cancel(job)
            try:
                b.step()
                self.stepped_at = time.monotonic()
            except Exception as e:  # a device program failed: end everyone in flight, start afresh
                self._fail_all(f"{type(e).__name__}: {e}")
            if self.metrics:
                with self._cv:
                    queued = self._queued()
                self.metrics.set_queue(queued)
                self.metrics.set_running(self._batcher.running)
        self.model.give_state(self._batcher.state)

    def _fail_all(self, message: str) -> None:
        self._batcher.fail_all(message)
        self.model.give_state(None)  # (donated to the program that failed)
        self._batcher = self._new_batcher(self.model.take_state())  # (with empty caches: a new state)

    def _on_update(self, job: Job, text: str, ids: list[int]) -> None:
        """The batcher's callback (device thread): one event to the job's handle, and the metrics."""
        handle = self._handles.get(id(job))
        now = time.perf_counter()
        if self.metrics and ids and (handle is None or handle.measured):
            last = self._last_update.get(id(job))
            if last is None:
                self.metrics.observe_ttft(now - job.submitted)
                self.metrics.cache_lookup(job.cached_tokens, job.prompt_tokens)
                rest = len(ids) - 1
            else:
                rest = len(ids)
                for _ in range(rest):
                    self.metrics.observe_itl((now - last) / rest)
            self.metrics.add_tokens(len(ids))
        self._last_update[id(job)] = now
        if job.finished:
            self._handles.pop(id(job), None)
            self._last_update.pop(id(job), None)
        if handle is not None:
            handle._push(Event(text, ids, job.finish_reason, job.prompt_tokens, len(job.token_ids), job.cached_tokens,
                               job.error, job.text.matched if job.finished and job.text else None))
