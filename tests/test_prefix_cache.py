"""The prefix cache kept in the slots: a prompt that starts like an earlier one continues from its cache
entries and gets the answer it gets fresh; images match by their tiles, not their placeholder ids."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from PIL import Image

import vl2_jax
from tests.conftest import ckpt_dir, load_case, open_images
from vl2_jax import Runtime
from vl2_jax.engine import CompileWatch, Request
from vl2_jax.generation import Batcher, Detokenizer, Job
from vl2_jax.prefix_cache import SlotPrefixes, TileFeatures, signature, tile_digests
from vl2_jax.sampling import RowSampling

VARIANT = "mla"


@functools.cache
def model():
    return vl2_jax.load_pretrained(ckpt_dir(VARIANT), runtime=Runtime(
        max_batch=2, max_seq_len=512, prefill_chunks=(16, 512), prefix_cache=True))
    # (a fresh prompt runs as one chunk; only prompts continued past a prefix run chunks of 16 tokens,
    # programs that warmup compiles only with the prefix cache on)


def image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def request(conversation, images=()) -> Request:
    m = model()
    return Request.from_output(m.processor(conversation, list(images)), m.cfg.tokens_per_tile_side)


def answer(b: Batcher, req: Request, max_new: int = 10) -> Job:
    job = b.submit(Job(req, max_new, RowSampling.make()))
    while not job.finished:
        b.step()
    return job


def fresh_and_cached(b: Batcher, first: Request, second: Request) -> tuple[Job, Job]:
    """`second` answered with nothing cached, then again after `first` left its entries in a slot."""
    b.prefixes.clear()
    fresh = answer(b, second)
    b.prefixes.clear()
    answer(b, first)
    return fresh, answer(b, second)


def batcher() -> Batcher:
    m = model()
    return Batcher(m.engine, m.params, m.take_state(), Detokenizer.of(m.processor.tokenizer))


def test_the_same_prompt_again_continues_from_the_cache_with_the_same_answer():
    b = batcher()
    case = load_case(VARIANT, "history")
    req = request(case["conversation"], open_images(case))
    first = answer(b, req, 12)
    again = answer(b, req, 12)
    want = case["arrays"]["greedy"].tolist()
    assert first.cached_tokens == 0 and first.token_ids == want
    assert again.cached_tokens == (len(req.ids) - 1) // 16 * 16 > 0
    assert again.token_ids == want
    model().give_state(b.state)


def test_a_next_chat_turn_reuses_the_history_and_answers_as_fresh():
    b = batcher()
    turn1 = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]
    images = [image(1, 64, 48)]
    first = answer(b, request(turn1, images))
    turn2 = [*turn1, {"role": "assistant", "content": first.text.text()},
             {"role": "user", "content": "<image>\nAnd in this one?"}]
    images2 = [*images, image(2, 40, 72)]
    fresh, cached = fresh_and_cached(b, request(turn1, images), request(turn2, images2))
    assert cached.cached_tokens >= len(request(turn1, images).ids) // 16 * 16 - 16 > 0
    assert cached.token_ids == fresh.token_ids
    model().give_state(b.state)


def test_a_third_image_retiles_the_first_two_and_the_answer_equals_a_fresh_one():
    """Up to two images are cropped into tiles; with a third, none is: the first image's tokens change
    within it (its global view, the same tile, may still match), so the cache is used only up to there."""
    b = batcher()
    two = [{"role": "user", "content": "<image>\n<image>\nCompare them."}]
    imgs = [image(3, 96, 64), image(4, 64, 96)]
    three = [*two, {"role": "assistant", "content": "They differ."},
             {"role": "user", "content": "<image>\nAnd now?"}]
    req2, req3 = request(two, imgs), request(three, [*imgs, image(5, 50, 50)])
    side = model().cfg.tokens_per_tile_side
    s2, s3 = (signature(r.ids, r.src, r.image_mask, r.tiles, side) for r in (req2, req3))
    differ = int(np.flatnonzero(s2[: len(s3)] != s3[: len(s2)])[0])
    image_at = np.flatnonzero(req3.image_mask)
    first_end = image_at[np.flatnonzero(np.diff(image_at) > 1)[0]]  # the first image's tokens: a run
    assert image_at[0] < differ <= first_end
    fresh, cached = fresh_and_cached(b, req2, req3)
    assert 0 < cached.cached_tokens <= differ
    assert cached.token_ids == fresh.token_ids
    model().give_state(b.state)


def test_signatures_tell_images_apart_behind_the_same_ids():
    side = model().cfg.tokens_per_tile_side
    q = [{"role": "user", "content": "<image>\nWhat is it?"}]
    a, b = request(q, [image(6, 64, 64)]), request(q, [image(7, 64, 64)])
    assert np.array_equal(a.ids, b.ids)
    sa = signature(a.ids, a.src, a.image_mask, a.tiles, side)
    sb = signature(b.ids, b.src, b.image_mask, b.tiles, side)
    first = int(np.argmax(a.image_mask))
    assert np.array_equal(sa[:first], sb[:first]) and sa[first] != sb[first]
    assert np.array_equal(sa, signature(a.ids, a.src, a.image_mask, a.tiles, side))
    assert (sa[a.image_mask] < 0).all() and (sa[~a.image_mask] >= 0).all()


def test_slots_are_chosen_hits_first_then_empty_then_least_recently_used():
    p = SlotPrefixes(3, granularity=4)
    sig = np.arange(20, dtype=np.int64)
    assert p.choose([0, 1, 2], sig) == (0, 0, ())  # all empty: the lowest
    p.keep(1, sig[:10], [100, 101, 102])  # holds 12 entries
    p.keep(2, np.arange(50, 60, dtype=np.int64), [1])
    assert p.choose([0, 1, 2], sig) == (1, 8, ())  # 10 common, rounded down to 8
    assert p.choose([1, 2], np.arange(200, 210, dtype=np.int64))[0] == 1  # the least recently used
    assert p.choose([2], sig[:4]) == (2, 0, ())  # at least one prompt token is prefilled
    # slot 1 would enlarge the decode program: its prefix is copied into slot 0 (the prompt parts from
    # slot 1's answer, which stays there), and with the whole of slot 2's held, the two trade places
    assert p.choose([0, 1, 2], sig, below=1) == (0, 8, (("copy", 1, 0),))
    assert np.array_equal(p.held[0], sig[:8]) and len(p.held[1]) == 12
    p.keep(2, sig[:12], [])
    assert p.choose([0, 2], sig, below=1) == (0, 12, (("swap", 0, 2),))
    assert np.array_equal(p.held[0], sig[:12]) and np.array_equal(p.held[2], sig[:8])
    p.keep(2, sig[:10], [5, 6])
    assert p.choose([1, 2], sig, below=1) == (1, 8, ())  # nothing below: any slot (a tie: the lower)
    assert p.lookups == 7 and p.hits == 36


def test_entries_about_to_be_overwritten_trade_places_with_an_idle_slot():
    p = SlotPrefixes(3, granularity=4)
    a, b = np.arange(20, dtype=np.int64), np.arange(100, 120, dtype=np.int64)
    p.keep(0, a, [7])
    assert p.choose([0, 1, 2], b, below=1) == (0, 0, (("swap", 0, 1),))  # slot 0 taken; its entries go up
    assert np.array_equal(p.held[1][:20], a) and len(p.held[0]) == 0
    p.keep(0, b, [8])
    # `a` again: cached in slot 1, it comes down into slot 0, whose `b` goes up in its place
    assert p.choose([0, 1, 2], a, below=1) == (0, 16, (("swap", 0, 1),))
    assert np.array_equal(p.held[1][:20], b) and np.array_equal(p.held[0][:20], a) and len(p.held[2]) == 0
    p.keep(2, np.arange(200, 220, dtype=np.int64), [9])
    p.keep(0, np.arange(300, 320, dtype=np.int64), [9])
    p.keep(1, np.arange(400, 420, dtype=np.int64), [9])  # now the most recent of the idle slots
    # a miss evicts the idle slot that holds the oldest entries (slot 2), never a newer one
    assert p.choose([0, 1, 2], np.arange(500, 520, dtype=np.int64), below=1) == (0, 0, (("swap", 0, 2),))
    assert p.held[2][0] == 300 and p.held[1][0] == 400 and p.held[0][0] == 200


def test_a_prefix_shared_with_another_conversation_is_copied_and_that_conversation_kept():
    p = SlotPrefixes(3, granularity=4)
    system = np.arange(12, dtype=np.int64)
    a = np.concatenate([system, np.arange(500, 520)])
    b = np.concatenate([system, np.arange(600, 620)])
    p.keep(1, a, [7, 8])
    p.keep(0, np.arange(900, 930, dtype=np.int64), [1])
    # b shares a's first 12 entries only: a stays whole in slot 1, slot 0's entries go up to empty
    # slot 2, then the shared start is copied down into slot 0
    assert p.choose([0, 1, 2], b, below=1) == (0, 12, (("swap", 0, 2), ("copy", 1, 0)))
    assert np.array_equal(p.held[1][:32], a) and p.held[2][0] == 900 and np.array_equal(p.held[0], system)


def test_a_prefix_of_a_job_still_decoding_is_copied_never_taken_or_swapped():
    p = SlotPrefixes(3, granularity=4)
    system = np.arange(12, dtype=np.int64)
    a = np.concatenate([system, np.arange(500, 520)])
    b = np.concatenate([system, np.arange(600, 620)])
    # slot 0 decodes `a`: its prompt is copied into free slot 1, which keeps only the shared start
    assert p.choose([1, 2], b, running={0: a}) == (1, 12, (("copy", 0, 1),))
    assert np.array_equal(p.held[1], system) and len(p.held[0]) == 0
    # the whole of `a` again while it decodes: still a copy (a swap would move the running job)
    assert p.choose([2], a, running={0: a, 1: b}) == (2, 28, (("copy", 0, 2),))
    # a free slot that holds as much as a running one: taken as it is, nothing copied
    p.keep(1, b, [1])
    assert p.choose([1], b, running={0: b}) == (1, 28, ())
    assert p.hits == 12 + 28 + 28


def test_as_many_conversations_as_slots_taking_turns_all_hit_after_the_first_round():
    """One job at a time (the decode program of one slot: every job runs in slot 0), four conversations
    in turn over four slots: each stays cached somewhere, once."""
    p = SlotPrefixes(4, granularity=4)
    conversations = [np.arange(100 * i, 100 * i + 30, dtype=np.int64) for i in range(4)]
    starts = []
    for _ in range(3):
        for sig in conversations:
            slot, start, _ = p.choose([0, 1, 2, 3], sig, below=1)
            assert slot == 0
            starts.append(start)
            p.keep(slot, sig, [1, 2, 3])
    assert starts[:4] == [0] * 4 and starts[4:] == [28] * 8


def test_nothing_compiles_after_warmup_when_prompts_continue_from_the_cache():
    m = model()
    m.warmup()
    b = batcher()
    case = load_case(VARIANT, "two_images")
    conv, imgs = case["conversation"], open_images(case)
    with CompileWatch() as compiling:
        first = answer(b, request(conv, imgs), 5)
        longer = [*conv, {"role": "assistant", "content": first.text.text()},
                  {"role": "user", "content": "Say more. " * 20}]
        assert answer(b, request(longer, imgs), 5).cached_tokens > 0
        assert answer(b, request(longer, imgs), 5).cached_tokens > 0
    assert compiling.count == 0
    m.give_state(b.state)


def test_requests_one_at_a_time_stay_in_slot_zero_and_keep_the_last_prefixes_above():
    """A decode call runs every slot up to the highest live one: a lone request in slot 1 would run the
    two-slot program, so one at a time they all take slot 0, and the entries each one overwrites move
    up to slot 1: asking the one before last again continues from the cache, with the same answer."""
    b = batcher()
    b.prefixes.clear()
    taken = []
    jobs = []
    for prompt in ("One.", "Two, a different question.", "Three, different again."):
        jobs.append(answer(b, request([{"role": "user", "content": prompt}]), 3))
        taken.append(jobs[-1].slot)
    assert taken == [0, 0, 0]
    assert all(len(held) > 0 for held in b.prefixes.held)
    again = answer(b, request([{"role": "user", "content": "Two, a different question."}]), 3)
    assert again.slot == 0 and again.cached_tokens > 0 and again.token_ids == jobs[1].token_ids
    model().give_state(b.state)


def test_slot_moves_trade_or_copy_two_rows_in_place():
    """"swap" trades two slots' cache rows and "copy" copies one over the other, every other entry
    untouched; neither program copies a whole cache array (as two row writes, a swap had made XLA copy
    every cache array twice: by arithmetic ~64 GB of traffic a swap for tiny's 16 GB cache at max_batch 64)."""
    m = model()
    e, state = m.engine, m.take_state()
    layers = tuple({k: jnp.arange(v.size, dtype=v.dtype).reshape(v.shape) for k, v in layer.items()}
                   for layer in state.cache.layers)
    before = [{k: np.asarray(v) for k, v in layer.items()} for layer in layers]
    state = state.replace(cache=state.cache.replace(layers=layers))
    whole = {"[" + ",".join(map(str, v.shape)) + "]" for v in before[0].values()}
    for kind in ("swap", "copy"):
        hlo = e._moves[kind].lower(state, np.int32(0), np.int32(1)).compile().as_text()
        copies = [line for line in hlo.splitlines() if (" copy(" in line or " copy-start(" in line)
                  and any(w in line for w in whole)]
        assert not copies, (kind, copies)
    state = e.move_slots(state, "swap", 0, 1)
    for got, want in zip(state.cache.layers, before):
        for k, v in want.items():
            np.testing.assert_array_equal(np.asarray(got[k]), v[[1, 0]])
    state = e.move_slots(state, "copy", 0, 1)  # (slot 0 holds what slot 1 held at first)
    for got, want in zip(state.cache.layers, before):
        for k, v in want.items():
            np.testing.assert_array_equal(np.asarray(got[k]), v[[1, 1]])
    m.give_state(state)


def test_a_prefix_cached_in_a_higher_slot_comes_down_and_answers_the_same():
    b = batcher()
    b.prefixes.clear()
    case = load_case(VARIANT, "history")
    req = request(case["conversation"], open_images(case))
    other = b.submit(Job(request([{"role": "user", "content": "Something else entirely."}]), 3, RowSampling.make()))
    first = b.submit(Job(req, 12, RowSampling.make()))  # slot 1, beside `other` in slot 0
    while not (first.finished and other.finished):
        b.step()
    assert len(b.prefixes.held[1]) > len(b.prefixes.held[0])
    again = answer(b, req, 12)  # alone: slot 0, with slot 1's prefix brought there
    assert again.cached_tokens == (len(req.ids) - 1) // 16 * 16 > 0
    assert again.token_ids == first.token_ids == case["arrays"]["greedy"].tolist()
    assert np.array_equal(b.prefixes.held[0][: again.prompt_tokens], signature(
        req.ids, req.src, req.image_mask, req.tiles, model().cfg.tokens_per_tile_side))
    model().give_state(b.state)


def test_a_start_shared_with_a_conversation_further_up_is_copied_and_both_answer_the_same(monkeypatch):
    b = batcher()
    system = {"role": "system", "content": "You are a careful assistant who answers briefly. " * 4}
    qa = request([system, {"role": "user", "content": "First question?"}])
    qb = request([system, {"role": "user", "content": "Second, another question?"}])
    b.prefixes.clear()
    fresh = answer(b, qb, 6)
    b.prefixes.clear()
    other = b.submit(Job(request([{"role": "user", "content": "Something else entirely."}]), 3, RowSampling.make()))
    first = b.submit(Job(qa, 6, RowSampling.make()))  # slot 1, beside `other` in slot 0
    while not (first.finished and other.finished):
        b.step()
    assert first.slot == 1
    calls, call = [], b.engine._call
    monkeypatch.setattr(b.engine, "_call", lambda name, *args: (calls.append(name), call(name, *args))[1])
    shared = b.submit(Job(qb, 6, RowSampling.make()))  # alone: slot 0, the shared start copied from slot 1
    while not shared.finished:
        b.step()
    assert "copy()" in calls and "swap()" not in calls
    assert shared.slot == 0 and shared.cached_tokens >= 16 and shared.token_ids == fresh.token_ids
    again = answer(b, qa, 6)  # slot 1 kept all of `qa`
    assert again.cached_tokens == (len(qa.ids) - 1) // 16 * 16 and again.token_ids == first.token_ids
    model().give_state(b.state)


def test_requests_sharing_a_start_with_one_still_decoding_copy_it_and_answer_the_same(monkeypatch):
    """A second request that shares an image and a system prompt with one still decoding starts from
    that one's entries (copied: the first goes on decoding), and so does one that comes with it (it
    waits for the first's prefill); both answers equal their fresh ones."""
    b = batcher()
    system = {"role": "system", "content": "You are a careful assistant who answers briefly. " * 3}
    picture = [image(5, 48, 40)]
    qa = request([system, {"role": "user", "content": "<image>\nWhat is this?"}], picture)
    qb = request([system, {"role": "user", "content": "<image>\nDescribe the colours, please."}], picture)
    fresh = []
    for q, n in ((qa, 12), (qb, 6)):
        b.prefixes.clear()
        fresh.append(answer(b, q, n))
    fresh_a, fresh_b = fresh
    assert fresh_a.cached_tokens == fresh_b.cached_tokens == 0
    b.prefixes.clear()
    calls, call = [], b.engine._call
    monkeypatch.setattr(b.engine, "_call", lambda name, *args: (calls.append(name), call(name, *args))[1])
    first = b.submit(Job(qa, 12, RowSampling.make()))
    for _ in range(5):
        b.step()
        if first.slot in b.live:
            break
    assert first.slot in b.live and not first.finished
    second = b.submit(Job(qb, 6, RowSampling.make()))
    while not (first.finished and second.finished):
        b.step()
    assert calls.count("copy()") == 1 and "swap()" not in calls
    assert first.cached_tokens == 0 and second.cached_tokens >= 16 and second.slot != first.slot
    assert first.token_ids == fresh_a.token_ids and second.token_ids == fresh_b.token_ids
    # the two at once: the second waits for the first's prefill, then copies its entries likewise
    b.prefixes.clear()
    calls.clear()
    first, second = (b.submit(Job(q, n, RowSampling.make())) for q, n in ((qa, 12), (qb, 6)))
    b.step()
    assert first.slot in b.live and second in b.pending
    while not (first.finished and second.finished):
        b.step()
    assert calls.count("copy()") == 1 and first.cached_tokens == 0 and second.cached_tokens >= 16
    assert first.token_ids == fresh_a.token_ids and second.token_ids == fresh_b.token_ids
    model().give_state(b.state)


def test_an_image_seen_behind_another_prefix_is_not_encoded_again_and_answers_the_same(monkeypatch):
    """The tile-feature cache: the same image after a different system prompt shares no prefix with
    the earlier prompt, but its tiles' features are kept, so the vision tower does not run again."""
    m = model()
    img = image(8, 90, 60)
    first = request([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat?"}], [img])
    second = request([{"role": "system", "content": "Answer at length, please."},
                      {"role": "user", "content": "<image>\nWhat?"}], [img])
    b = batcher()
    b.features = TileFeatures(1 << 30)
    b.prefixes.clear()
    fresh = answer(b, second, 8)
    assert b.features.hits == 0 and len(b.features.entries) == len(second.tiles)
    b.features.clear()
    b.prefixes.clear()
    answer(b, first, 8)
    calls, call = [], b.engine._call
    monkeypatch.setattr(b.engine, "_call", lambda name, *args: (calls.append(name), call(name, *args))[1])
    again = answer(b, second, 8)
    assert not [c for c in calls if c.startswith("encode")] and calls.count("put()") == len(second.tiles)
    assert again.cached_tokens == 0  # (the prompts part before the image)
    assert b.features.hits == len(second.tiles) and b.features.lookups == 3 * len(second.tiles)
    assert again.token_ids == fresh.token_ids
    m.give_state(b.state)


def test_two_prompts_with_one_image_prefilled_together_encode_it_once(monkeypatch):
    """Admitted together, both prompts are put on the device just before their one prefill call, in
    order: the first encodes the image's tiles, the second finds them kept. Each answer is its own."""
    m = model()
    img = image(9, 90, 60)
    reqs = [request([{"role": "system", "content": text}, {"role": "user", "content": "<image>\nWhat?"}], [img])
            for text in ("Be brief.", "Answer at length, please.")]
    b = batcher()
    b.prefixes.clear()
    alone = [answer(b, r, 8).token_ids for r in reqs]
    b.features = TileFeatures(1 << 30)
    b.prefixes.clear()
    calls, call = [], b.engine._call
    monkeypatch.setattr(b.engine, "_call", lambda name, *args: (calls.append(name), call(name, *args))[1])
    jobs = [b.submit(Job(r, 8, RowSampling.make())) for r in reqs]
    while not all(j.finished for j in jobs):
        b.step()
    assert [c for c in calls if c.startswith("prefill")] == ["prefill(2, 512)"]
    assert calls.count("take()") == calls.count("put()") == len(reqs[0].tiles)  # encoded once, kept, put once
    assert [j.token_ids for j in jobs] == alone
    m.give_state(b.state)


def test_tile_features_drop_the_least_recently_used_beyond_the_budget():
    f = TileFeatures(budget=3 * 400)
    arrays = {d: np.zeros((10, 10), np.float32) for d in range(5)}  # 400 bytes each
    for d in (0, 1, 2):
        f.put(d, arrays[d])
    assert f.get(0) is arrays[0]  # 0 is now the most recently used
    f.put(3, arrays[3])  # drops 1, the least recently used
    assert f.get(1) is None and f.get(2) is arrays[2] and f.get(3) is arrays[3]
    assert f.bytes == 1200 and (f.hits, f.lookups) == (3, 4)
    f.put(4, np.zeros((20, 20), np.float32))  # larger than the whole budget: not kept
    assert 4 not in f.entries
    assert tile_digests(np.zeros((2, 4, 4, 3), np.uint8))[0] == tile_digests(np.zeros((1, 4, 4, 3), np.uint8))[0]



def test_random_traffic_with_follow_ups_cancels_and_stops_answers_as_each_request_alone():
    """Seeded random traffic through three slots with a prefill budget: new conversations (shared system
    prompts, 0-2 images), the same prompt again, next turns after an earlier answer (some adding an
    image, which re-tiles the earlier ones), greedy and seeded sampling, stop strings and cancels, all
    interleaved. Every answer that ended by itself equals that request's answer alone with nothing
    cached (float32: exactly), and some of them continued from the cache."""
    import random

    m = vl2_jax.load_pretrained(ckpt_dir(VARIANT), runtime=dataclasses.replace(model().runtime, max_batch=3))
    rng = random.Random(7)
    images = [image(20 + i, w, h) for i, (w, h) in enumerate([(40, 30), (64, 64), (30, 90)])]
    systems = [None, "You are a careful assistant who answers briefly. " * 3]
    questions = ["What is this?", "Describe it.", "Why?", "Tell me more about the colours."]
    b = Batcher(m.engine, m.params, m.take_state(), Detokenizer.of(m.processor.tokenizer), prefill_budget=32)
    b.prefixes.clear()
    done, running = [], []  # (conversation, image indices, (max_new, sampling, stop), job)

    def new_job():
        if done and rng.random() < 0.5:  # a next turn, or the same prompt again
            conv, chosen, _, job = rng.choice(done)
            if rng.random() < 0.7:
                add = [rng.randrange(len(images))] if rng.random() < 0.4 and len(chosen) < 3 else []
                conv = [*conv, {"role": "assistant", "content": m.processor.decode(job.token_ids)},
                        {"role": "user", "content": "<image>\n" * len(add) + rng.choice(questions)}]
                chosen = chosen + add
        else:
            chosen = [rng.randrange(len(images)) for _ in range(rng.choice([0, 1, 1, 2]))]
            system = rng.choice(systems)
            conv = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": "<image>\n" * len(chosen) + rng.choice(questions)}]
        sampled = rng.random() < 0.3
        settings = (rng.randint(1, 12), (1.3, 5, 0.9, 1.2, rng.randrange(100)) if sampled else (0.0,),
                    (m.processor.decode(done[-1][3].token_ids)[-2:],) if done and rng.random() < 0.2 else ())
        return conv, chosen, settings

    def submit(b, conv, chosen, settings):
        max_new, sampling, stop = settings
        return b.submit(Job(request(conv, [images[i] for i in chosen]), max_new, RowSampling.make(*sampling),
                            stop=tuple(s for s in stop if s)))

    for _ in range(120):
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
            conv, chosen, settings = new_job()
            running.append((conv, chosen, settings, submit(b, conv, chosen, settings)))
        if running and rng.random() < 0.05:
            b.cancel(rng.choice(running)[3])
        b.step()
        done += [r for r in running if r[3].finish_reason in ("stop", "length")]
        assert not [r for r in running if r[3].finish_reason == "error"]
        running = [r for r in running if not r[3].finished]
    while b.busy:
        b.step()
    done += [r for r in running if r[3].finish_reason in ("stop", "length")]
    assert len(done) > 40 and sum(r[3].cached_tokens > 0 for r in done) > 10
    for conv, chosen, settings, job in done:
        b.prefixes.clear()
        alone = submit(b, conv, chosen, settings)
        while not alone.finished:
            b.step()
        assert alone.cached_tokens == 0 and alone.token_ids == job.token_ids, (conv, settings)
    m.give_state(b.state)
