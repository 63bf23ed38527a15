"""Continuous batching (`generation.Batcher`): jobs join slots while others decode, a long prompt's
prefill is spread over decode calls, a cancelled job frees its slot, and every answer is the one the
request gets alone (the official greedy continuations of the fixtures)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import vl2_jax
from tests.conftest import ckpt_dir, load_case, open_images
from vl2_jax import Runtime
from vl2_jax.engine import Request
from vl2_jax.generation import Batcher, Detokenizer, Job
from vl2_jax.sampling import RowSampling

VARIANT = "mla"


@functools.cache
def model():
    # chunks of at most 32 tokens: the fixtures' prompts (15-130 tokens) take up to 5 prefill chunks
    return vl2_jax.load_pretrained(ckpt_dir(VARIANT), runtime=Runtime(max_batch=2, max_seq_len=256,
                                                                      prefill_chunks=(16, 32)))


def job(name: str, max_new: int | None = None, **kw) -> tuple[Job, list[int]]:
    """A greedy job for a fixture case, and the official greedy continuation it must produce."""
    m, case = model(), load_case(VARIANT, name)
    out = m.processor(case["conversation"], open_images(case))
    want = case["arrays"]["greedy"].tolist()
    request = Request.from_output(out, m.cfg.tokens_per_tile_side)
    return Job(request, max_new or len(want), RowSampling.make(), **kw), want[: max_new or len(want)]


def batcher(budget: int | None) -> Batcher:
    m = model()
    return Batcher(m.engine, m.params, m.take_state(), Detokenizer.of(m.processor.tokenizer), prefill_budget=budget)


def test_a_prompt_prefilled_between_decode_calls_into_a_reused_slot_gets_its_own_answer():
    """Slot 0 frees after two tokens; a 130-token prompt then takes it, one chunk per step,
    while slot 1 keeps decoding (its writes must not touch the new prompt's rows, nor the new prompt's
    its answer)."""
    b = batcher(budget=32)
    short, short_want = job("text_only", max_new=2)
    long_, long_want = job("one_wide")
    long_.max_new_tokens = 80  # decoding all through `late`'s prefill (the official continuation: 12 tokens)
    late, late_want = job("two_images")
    b.submit(short), b.submit(long_)
    rows = None
    while b.busy:
        b.step()
        if short.finished and late.text is None:
            b.submit(late)
        if late.first_token_at is not None and rows is None:
            rows = prompt_rows(b, late)
    assert short.finish_reason == "length" and short.token_ids == short_want
    assert long_.token_ids[:12] == long_want
    assert late.token_ids == late_want
    assert late.first_token_at > long_.first_token_at
    model().give_state(b.state)
    # the prompt's cache rows are exactly those it gets alone
    alone = batcher(budget=None)
    solo, _ = job("two_images")
    alone.submit(solo)
    while solo.first_token_at is None:
        alone.step()
    for got, want in zip(rows, prompt_rows(alone, solo)):
        np.testing.assert_array_equal(got, want)
    alone.cancel(solo)
    while alone.step():
        pass
    model().give_state(alone.state)


def prompt_rows(b: Batcher, j: Job) -> list[np.ndarray]:
    """The cache entries of `j`'s prompt in its slot, every layer."""
    slot = next(s for s, other in b.live.items() if other is j)
    n = j.prompt_tokens
    return [np.asarray(layer[k][slot, :n]) for layer in b.state.cache.layers for k in sorted(layer)]


def test_prefill_budget_spreads_a_prompt_over_steps():
    """With a budget of 32 tokens, a 130-token prompt (chunks 32, 32, 32, 32, 16) needs 5 steps to its
    first token; with no budget, one."""
    assert [c[1] for c in model().engine.chunk_plan(130)] == [32, 32, 32, 32, 16]
    for budget, want_steps in ((32, 5), (None, 1)):
        b = batcher(budget)
        j, _ = job("two_images", max_new=1)
        b.submit(j)
        steps = 0
        while j.first_token_at is None:
            b.step()
            steps += 1
        while b.step():
            pass
        assert steps == want_steps, budget
        model().give_state(b.state)


@pytest.mark.parametrize("when", ["waiting", "prefilling", "decoding"])
def test_a_cancelled_job_ends_at_once_and_frees_its_slot(when):
    b = batcher(budget=32)
    updates = []
    first, _ = job("one_wide", max_new=200, on_update=lambda j, text, ids: updates.append((text, ids, j.finished)))
    blocker, _ = job("history", max_new=200)
    after, want = job("text_only")
    if when == "waiting":  # both slots busy: `first` waits
        b.submit(blocker), b.submit(job("history", max_new=200)[0])
    b.submit(first)
    if when == "decoding":
        while first.first_token_at is None:
            b.step()
    elif when == "prefilling":
        b.step()
        assert any(entry[1] is first for entry in b.prefilling)
    b.cancel(first)
    assert first.finish_reason == "abort" and updates[-1][2]
    b.submit(after)
    while not after.finished:
        b.step()
    assert after.token_ids == want
    for j in list(b.live.values()) + [e[1] for e in b.prefilling] + list(b.pending):
        b.cancel(j)
    while b.step():
        pass
    assert not b.live and sorted(b.free) == [0, 1]
    model().give_state(b.state)


def test_eos_ends_one_row_with_stop_while_its_neighbour_goes_on():
    """The EOS id is made a token the first answer produces at its 4th step: that row ends there with
    "stop" (EOS kept in its ids, not in its text), its neighbour's answer is untouched."""
    m = model()
    a, a_want = job("one_wide")
    b_, b_want = job("history")
    eos = a_want[3]
    assert eos not in b_want and eos not in a_want[:3]
    b = batcher(budget=None)
    a.eos = b_.eos = eos
    b.submit(a), b.submit(b_)
    while b.step():
        pass
    assert a.finish_reason == "stop" and a.token_ids == a_want[:4]
    assert a.text.text() == m.processor.decode(a_want[:3])
    assert b_.finish_reason == "length" and b_.token_ids == b_want
    m.give_state(b.state)


def test_run_jobs_fills_a_slot_as_soon_as_an_answer_finishes():
    """`generate --input`'s loop (model.run_jobs) with 2 slots: one long answer and four short ones. Each
    short job after the first is drawn when a slot frees, while the long answer still runs in the other
    slot, and every answer is its official greedy continuation."""
    from vl2_jax.generation import run_jobs

    m = model()
    long_, long_want = job("text_only")
    long_.max_new_tokens = 200  # 13 decode calls: longer than the four short ones' prefills and answers
    shorts = [job(name, max_new=2) for name in ("one_wide", "two_images", "history", "text_only")]
    drawn, done = [], []

    def source():
        for j in [long_, *(s for s, _ in shorts)]:
            drawn.append((id(j), long_.finished))
            yield j

    state = run_jobs(m.engine, m.params, m.take_state(), source(), Detokenizer.of(m.processor.tokenizer), done.append)
    m.give_state(state)
    assert [id(j) for j in done] == [id(s) for s, _ in shorts] + [id(long_)]  # finishing order
    assert all(not long_done for _, long_done in drawn)  # all four short ones ran beside the long one
    for s, want in shorts:
        assert s.token_ids == want and s.finish_reason == "length"
    assert long_.token_ids[: len(long_want)] == long_want


@pytest.mark.parametrize("max_new", [1, 17, 18])
def test_no_decode_call_runs_past_the_answers_ends(max_new, monkeypatch):
    """The host dispatches a decode call before it reads the last: it sends none once every live answer
    is full by then (the first token comes from prefill, a call makes `decode_steps` tokens: 16 at these
    slots), so 1 / 17 / 18 new tokens take 0 / 1 / 2 calls; the answers begin with the official ones."""
    from vl2_jax.engine import decode_steps

    m = model()
    calls = []
    engine_decode = m.engine.decode

    def counted(*args, **kwargs):
        calls.append(1)
        return engine_decode(*args, **kwargs)

    monkeypatch.setattr(m.engine, "decode", counted)
    b = batcher(budget=None)
    jobs = [job("one_wide", max_new=max_new), job("history", max_new=max_new)]
    for j, _ in jobs:
        b.submit(j)
    while b.step():
        pass
    m.give_state(b.state)
    assert len(calls) == -(-(max_new - 1) // decode_steps(2))
    for j, want in jobs:
        assert j.finish_reason == "length" and len(j.token_ids) == max_new and j.token_ids[:len(want)] == want[:max_new]
