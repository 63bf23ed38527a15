"""The server's scheduler: concurrent jobs each get the answer they get alone, events stream in order,
a cancelled job frees its slot, the queue is bounded, and stop hands the engine state back."""

from __future__ import annotations

import functools
import threading
import time

import pytest

import vl2_jax
from tests.conftest import ckpt_dir, load_case, open_images
from vl2_jax import Runtime
from vl2_jax.engine import Request
from vl2_jax.generation import Job
from vl2_jax.sampling import RowSampling
from vl2_jax.serving.scheduler import QueueFull, Scheduler

VARIANT = "mla"
NAMES = ("text_only", "one_wide", "two_images", "history", "three_images_no_crop")


@functools.cache
def model():
    return vl2_jax.load_pretrained(ckpt_dir(VARIANT), runtime=Runtime(max_batch=4, max_seq_len=256,
                                                                      prefill_chunks=(32, 64)))


def job(name: str, max_new: int | None = None) -> tuple[Job, list[int]]:
    m, case = model(), load_case(VARIANT, name)
    out = m.processor(case["conversation"], open_images(case))
    want = case["arrays"]["greedy"].tolist()
    return Job(Request.from_output(out, m.cfg.tokens_per_tile_side), max_new or len(want), RowSampling.make()), want


def collect(handle) -> tuple[str, list[int], list]:
    events = list(handle.iter_events(timeout=120))
    return "".join(e.text for e in events), [t for e in events for t in e.token_ids], events


def test_concurrent_jobs_each_get_their_alone_answer():
    """15 jobs from three threads over 4 slots: every answer is the official greedy continuation, and
    its events add up to the final text and ids."""
    sched = Scheduler(model(), prefill_budget=32).start()
    results = {}

    def client(k):
        handles = [(name, sched.submit(job(name)[0])) for name in NAMES]
        results[k] = [(name, collect(h)) for name, h in handles]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    sched.stop()
    for k in range(3):
        for name, (text, ids, events) in results[k]:
            assert ids == job(name)[1], name
            assert events[-1].finish_reason == "length" and events[-1].completion_tokens == len(ids)
            assert text == model().processor.decode(ids)
    assert model().take_state() is not None  # handed back
    model().give_state(None)


def test_cancel_frees_the_slot_and_the_queue_is_bounded():
    sched = Scheduler(model(), max_queue=2).start()
    try:
        running = [sched.submit(job("history", max_new=200)[0]) for _ in range(4)]  # every slot
        deadline = time.monotonic() + 60
        while sched.stats()["running"] < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = [sched.submit(job("text_only")[0]) for _ in range(2)]
        with pytest.raises(QueueFull):
            sched.submit(job("text_only")[0])
        for h in running:
            h.cancel()
        for h in running:
            assert collect(h)[2][-1].finish_reason == "abort"
        for h in waiting:
            assert collect(h)[1] == job("text_only")[1]
        assert sched.stats()["running"] == 0
    finally:
        sched.stop()


def test_a_cancelled_job_leaves_the_queue_before_the_device_thread_gets_to_it():
    """While the device thread is busy (here: not started; in a server, compiling), a request that
    times out cancels its job: its place in the queue is free for the next request at once."""
    sched = Scheduler(model(), max_queue=1)  # (4 slots take jobs at once, then one waits)
    handles = [sched.submit(job("text_only")[0]) for _ in range(5)]
    # (the 4 that free slots take do not count as waiting: the message said "5 requests are waiting")
    with pytest.raises(QueueFull, match=r"^1 request is waiting for a slot, as many as the queue holds$"):
        sched.submit(job("text_only")[0])
    handles[-1].cancel()
    assert sched.stats()["queued"] == 4
    sched.submit(job("text_only")[0])
    with pytest.raises(QueueFull):
        sched.submit(job("text_only")[0])


def test_stop_cancels_what_its_drain_leaves_and_hurry_cuts_the_drain_short():
    """stop(timeout) lets jobs run for the timeout, then ends every job still running or waiting with
    "abort" (each handle gets its last event) and hands the state back; `hurry` (a second Ctrl-C) ends
    the drain at once."""
    for hurried in (False, True):
        sched = Scheduler(model()).start()
        handles = [sched.submit(job("history", max_new=200)[0]) for _ in range(24)]  # 4 slots: 6 rounds
        stopping = threading.Thread(target=sched.stop, args=(60.0 if hurried else 0.0,))
        start = time.monotonic()
        stopping.start()
        if hurried:
            time.sleep(0.2)
            sched.hurry()
        stopping.join(60)
        assert not stopping.is_alive() and time.monotonic() - start < 30
        ends = [collect(h)[2][-1].finish_reason for h in handles]
        assert set(ends) <= {"length", "abort"} and ends.count("abort") >= 8, (hurried, ends)
        assert model().take_state() is not None  # handed back
        model().give_state(None)


def test_probes_are_answered_but_left_out_of_the_metrics():
    """`submit(job, measured=False)` (the server's /health_generate): answered as any job, but its tokens
    and latencies reach no metric; a measured job's do."""
    seen = []

    class Metrics:
        def __getattr__(self, name):
            return lambda *args: seen.append(name)

    sched = Scheduler(model(), metrics=Metrics()).start()
    probe, want = job("text_only", 3)
    _, ids, _ = collect(sched.submit(probe, measured=False))
    assert ids == want[:3]
    assert not {"observe_ttft", "observe_itl", "add_tokens", "cache_lookup"} & set(seen)
    _, ids, _ = collect(sched.submit(job("text_only", 3)[0]))
    assert ids == want[:3] and {"observe_ttft", "add_tokens", "cache_lookup"} <= set(seen)
    sched.stop()
    model().give_state(None)
