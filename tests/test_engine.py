"""The fixed-shape engine: after warmup nothing compiles, whatever the requests; seeded answers do not
depend on their neighbours; batches beyond the slots run in waves; streams carry the whole answer."""

from __future__ import annotations

import functools
import time
import unittest.mock

import jax
import numpy as np
import pytest
from PIL import Image

import vl2_jax
from tests.conftest import ckpt_dir, load_case, open_images
from vl2_jax import Runtime
from vl2_jax import engine as engine_module
from vl2_jax.errors import InputError

EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration")
_counts = {"on": False, **dict.fromkeys(EVENTS, 0)}


def _listen(event, duration, **kwargs):
    if _counts["on"] and event in EVENTS:
        _counts[event] += 1


jax.monitoring.register_event_duration_secs_listener(_listen)


def count_compiles(fn):
    """(fn's result, {event: count}) for the compilations and traces while fn runs."""
    for e in EVENTS:
        _counts[e] = 0
    _counts["on"] = True
    try:
        return fn(), {e: _counts[e] for e in EVENTS}
    finally:
        _counts["on"] = False


@functools.cache
def warm_model():
    m = vl2_jax.load_model("random:test", "float32", runtime=Runtime(max_batch=4))
    start = time.perf_counter()
    report = m.warmup()
    return m, report, time.perf_counter() - start


def image(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_nothing_compiles_after_warmup():
    """Requests that differ in prompt length (up to near the context), number of images (0-3) and their
    sizes, batch size (<= max_batch), max_new_tokens, sampling settings and stop strings: zero
    compilations and zero traces once the model is warm. Warmup itself takes under two minutes."""
    m, report, seconds = warm_model()
    assert seconds < 120, f"warmup took {seconds:.0f} s ({report['programs']} programs)"
    p = m.processor
    user = lambda text, n=0: [{"role": "user", "content": "<image>\n" * n + text}]
    long_text = "word " * 190  # ~960 byte-level tokens: near the 1024-token context
    conversations = [
        p(user("Hi.")),
        p(user(long_text)),
        p(user("What is this?", 1), [image(1, 56, 56)]),
        p(user("Compare them.", 2), [image(2, 200, 90), image(3, 60, 170)]),
        p(user("Three of them.", 3), [image(4, 56, 56), image(5, 300, 120), image(6, 90, 90)]),
        p([*user("First.", 1), {"role": "assistant", "content": "An answer."}, *user("And then?")], [image(7, 120, 120)]),
    ]
    assert max(len(c.input_ids) for c in conversations) > 900
    calls = [
        dict(batch=[0], max_new_tokens=5),
        dict(batch=[1], max_new_tokens=3, temperature=0.7, top_p=0.9, seed=1),
        dict(batch=[2, 3], max_new_tokens=9, top_k=5, temperature=1.3, seed=2),
        dict(batch=[4, 5, 0], max_new_tokens=17, repetition_penalty=1.3, stop=["a", "</s>"]),
        dict(batch=[3, 2, 1, 0], max_new_tokens=40, temperature=0.5, stop=["\n"]),
        dict(batch=[5, 4, 3, 2, 1, 0], max_new_tokens=20),  # more rows than slots: two waves
    ]

    def run_all():
        results = []
        for call in calls:
            call = dict(call)
            rows = call.pop("batch")
            results.append(m.generate(p.batchify([conversations[i] for i in rows]), **call))
            results.append(list(m.stream(p.batchify([conversations[rows[0]]]), **call)))
        return results

    results, counts = count_compiles(run_all)
    assert counts == dict.fromkeys(EVENTS, 0), counts
    assert all(len(r.token_ids) >= 1 for r in results[::2])


def test_seeded_answer_is_the_same_alone_and_in_a_batch():
    """Each row samples from its own key (the seed folded with its step): the same seeded answer in any
    slot, beside any other request; greedy rows likewise."""
    m, _, _ = warm_model()
    p = m.processor
    a = p([{"role": "user", "content": "Tell me a story."}])
    b = p([{"role": "user", "content": "<image>\nWhat is it?"}], [image(8, 80, 56)])
    kw = dict(max_new_tokens=12, temperature=1.1, top_k=50, seed=9)
    alone = m.generate(p.batchify([a]), **kw).token_ids[0]
    for rows in ([b, a], [b, b, b, a], [a, b]):
        got = m.generate(p.batchify(rows), **kw).token_ids
        assert got[[i for i, r in enumerate(rows) if r is a][0]] == alone
    assert len(set(map(tuple, m.generate(p.batchify([a, a]), **{**kw, "seed": 10}).token_ids))) == 1


def test_decode_calls_are_shorter_the_more_slots_decode_and_answers_do_not_change():
    """Seventeen live slots decode in calls of 4 steps (one alone: 16); a seeded sampled answer and a
    greedy one are the same either way, at any position in the batch."""
    from vl2_jax.engine import STEPS, decode_steps

    assert [decode_steps(n) for n in (1, 2, 4, 8, 16, 32, 64)] == [STEPS] * 4 + [STEPS // 2] + [STEPS // 4] * 2
    m = vl2_jax.load_model("random:test", "float32", runtime=Runtime(max_batch=32, max_seq_len=256))
    p = m.processor
    a = p([{"role": "user", "content": "Tell me a story."}])
    others = [p([{"role": "user", "content": f"Count to {i}."}]) for i in range(16)]
    names: list = []
    m.engine._call = functools.partial(recorded, m.engine._call, names)
    for kw in (dict(max_new_tokens=21, temperature=1.1, top_k=50, seed=9), dict(max_new_tokens=21)):
        alone = m.generate(p.batchify([a]), **kw).token_ids[0]
        decodes = [n for n in names if n.startswith("decode")]
        # 20 tokens after the first: two calls of 16 steps (and one queued before the end was read)
        assert len(alone) == 21 and len(decodes) <= 3 and all(n.startswith("decode(1, 256,") for n in decodes)
        names.clear()
        together = m.generate(p.batchify([*others[:7], a, *others[7:]]), **kw).token_ids
        assert together[7] == alone
        decodes = [n for n in names if n.startswith("decode")]
        assert len(decodes) >= 5 and all(n.startswith("decode(32, 256,") for n in decodes), decodes  # 4 steps a call
        names.clear()


def test_fewer_decode_steps_a_call_give_the_same_answers():
    """`Runtime.decode_steps` sets the tokens per decode call (the server's --decode-steps): 4 a call over
    one slot, and a seeded sampled answer and a greedy one equal those of the default 16."""
    from vl2_jax.engine import decode_steps

    assert [decode_steps(n, 4) for n in (1, 8, 16, 32)] == [4, 4, 2, 1] and decode_steps(64, 2) == 1
    for bad in (0, 1025):
        with pytest.raises(vl2_jax.ConfigError, match=r"^decode_steps must be a whole number from 1 to 1024 "):
            Runtime(decode_steps=bad)
    # a call runs at most a slot's tokens (a server of 5-token slots and the default 16 steps runs 5)
    assert vl2_jax.load_model("random:test", runtime=Runtime(max_seq_len=5)).engine.steps(1) == 5
    default, short = (vl2_jax.load_model("random:test", "float32", runtime=Runtime(max_batch=2, max_seq_len=256, **kw))
                      for kw in ({}, {"decode_steps": 4}))
    p = default.processor
    batch = p.batchify([p([{"role": "user", "content": "Tell me a story."}])])
    names: list = []
    short.engine._call = functools.partial(recorded, short.engine._call, names)
    for kw in (dict(max_new_tokens=13, temperature=1.1, top_k=50, seed=9), dict(max_new_tokens=13)):
        assert short.generate(batch, **kw).token_ids == default.generate(batch, **kw).token_ids
    decodes = [n for n in names if n.startswith("decode")]
    assert 2 * 3 <= len(decodes) <= 2 * 4, decodes  # 12 tokens after the first, 4 a call: 3 calls (+1 queued)


def test_batch_larger_than_the_slots_runs_in_waves_with_the_same_answers():
    variant = "mla"
    m = vl2_jax.load_pretrained(ckpt_dir(variant), runtime=Runtime(max_batch=2))
    names = ("text_only", "one_wide", "two_images", "history", "three_images_no_crop")
    cases = [load_case(variant, n) for n in names]
    outs = [m.processor(c["conversation"], open_images(c)) for c in cases]
    r = m.generate(m.processor.batchify(outs), max_new_tokens=max(len(c["arrays"]["greedy"]) for c in cases))
    for got, case in zip(r.token_ids, cases):
        want = case["arrays"]["greedy"].tolist()
        assert got[: len(want)] == want


def recorded(call, names: list, name: str, *args, **kwargs):
    """`Engine._call` that also notes each program's name in `names`."""
    names.append(name)
    return call(name, *args, **kwargs)


@pytest.mark.parametrize("names, want_calls", [
    # the short first prompt goes alone: the four of 128 tokens are not padded to it, nor it to them
    (("text_only", "one_wide", "two_images", "history", "three_images_no_crop"),
     ["prefill(1, 32)", "insert(1, True)", "prefill(4, 128)", "insert(4, True)", "extend(1, 32, 256)", "insert(1, True)"]),
    # three of 128 tokens take a call of four rows: the short prompt fills the fourth
    (("one_wide", "text_only", "two_images", "history"),
     ["prefill(4, 128)", "insert(4, True)", "extend(1, 32, 256)", "insert(1, True)"]),
])
def test_prompts_waiting_together_are_prefilled_in_one_call_with_their_own_answers(names, want_calls):
    """Prompts whose first chunks have one length go through the model in one prefill call; a shorter
    one joins them only in a row the call pads anyway; a multi-chunk prompt starts there and goes on
    alone. Each row's greedy answer equals that of prompts prefilled one at a time (prefill_tokens=0)
    and the official greedy tokens."""
    variant = "mla"
    cases = [load_case(variant, n) for n in names]
    runtime = dict(max_batch=8, max_seq_len=512, prefill_chunks=(32, 64, 128))
    got = {}
    for tokens in (0, 8192):
        m = vl2_jax.load_pretrained(ckpt_dir(variant), runtime=Runtime(**runtime, prefill_tokens=tokens))
        outs = [m.processor(c["conversation"], open_images(c)) for c in cases]
        calls = []
        m.engine._call = functools.partial(recorded, m.engine._call, calls)
        r = m.generate(m.processor.batchify(outs), max_new_tokens=max(len(c["arrays"]["greedy"]) for c in cases))
        got[tokens] = r.token_ids, [n for n in calls if n.startswith(("prefill", "extend", "insert"))]
    (one_by_one, single_calls), (together, calls) = got[0], got[8192]
    lengths = {n: len(m.processor(c["conversation"], open_images(c)).input_ids) for n, c in zip(names, cases)}
    assert lengths["text_only"] <= 32 < lengths["one_wide"] and lengths["two_images"] > 128  # a later chunk
    assert calls == want_calls
    assert sum(n.startswith("prefill(1, ") for n in single_calls) == len(names)
    assert together == one_by_one
    for row, case in zip(together, cases):
        want = case["arrays"]["greedy"].tolist()
        assert row[: len(want)] == want


def test_later_chunks_of_prompts_waiting_together_go_in_one_call_with_their_own_answers():
    """With one chunk length of 32, every prompt but the shortest has later chunks: those of one length
    go through the model EXTEND_ROWS prompts a call (fewer rows pad), and each row's greedy answer equals
    that of prompts prefilled one chunk at a time (prefill_tokens=0) and the official greedy tokens."""
    from vl2_jax.engine import EXTEND_ROWS

    variant = "mla"
    names = ("text_only", "one_wide", "two_images", "history", "three_images_no_crop")
    cases = [load_case(variant, n) for n in names]
    got = {}
    for tokens in (0, 8192):
        m = vl2_jax.load_pretrained(ckpt_dir(variant), runtime=Runtime(
            max_batch=8, max_seq_len=512, prefill_chunks=(32,), prefill_tokens=tokens))
        outs = [m.processor(c["conversation"], open_images(c)) for c in cases]
        calls = []
        m.engine._call = functools.partial(recorded, m.engine._call, calls)
        r = m.generate(m.processor.batchify(outs), max_new_tokens=max(len(c["arrays"]["greedy"]) for c in cases))
        got[tokens] = r.token_ids, [n for n in calls if n.startswith("extend")]
    (one_by_one, single_calls), (together, calls) = got[0], got[8192]
    assert single_calls and all(n.startswith("extend(1, 32, ") for n in single_calls)
    assert any(n.startswith(f"extend({EXTEND_ROWS}, 32, ") for n in calls) and len(calls) < len(single_calls) / 2
    assert together == one_by_one
    for row, case in zip(together, cases):
        want = case["arrays"]["greedy"].tolist()
        assert row[: len(want)] == want


def test_a_prompt_s_tiles_are_encoded_after_the_prompts_ahead_of_it_are_prefilled():
    """Prompts admitted together: the text prompt ahead is prefilled before the image behind it is
    encoded, so its first token does not wait for the vision tower."""
    m, _, _ = warm_model()
    p = m.processor
    text = p([{"role": "user", "content": "word " * 40}])  # a chunk of 256 tokens
    pictured = p([{"role": "user", "content": "<image>\nWhat is it?"}], [image(11, 300, 200)])  # of 128
    assert len(text.input_ids) > 128 >= len(pictured.input_ids)
    names: list = []
    m.engine._call = functools.partial(recorded, m.engine._call, names)
    try:
        m.generate(p.batchify([text, pictured]), max_new_tokens=2)
    finally:
        del m.engine._call
    first_prefill = next(i for i, n in enumerate(names) if n.startswith("prefill"))
    encodes = [i for i, n in enumerate(names) if n.startswith("encode")]
    assert encodes and min(encodes) > first_prefill, names


def test_pick_together_groups_first_chunks_by_length_within_the_budget():
    from vl2_jax.engine import Prefill, Request

    m = vl2_jax.load_model("random:test", "float32", runtime=Runtime(
        max_batch=8, max_seq_len=512, prefill_chunks=(32, 64, 128), prefill_tokens=256))
    engine = m.engine
    text = lambda n: Request(np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, bool), None)
    prompts = lambda *lengths: [Prefill(text(n), n, engine.chunk_plan(n)) for n in lengths]
    assert engine.rows_for(128) == (1, 2) and engine.rows_for(64) == (1, 2, 4)
    assert engine.pick_together(prompts(100, 20, 120, 110)) == [0, 2]  # two rows of 128 at most
    assert engine.pick_together(prompts(60, 20, 30, 50, 64)) == [0, 1, 3, 4]  # 3 of 64 pad to 4 rows: one of 32 fills it
    assert engine.pick_together(prompts(20, 60, 10)) == [0, 2]  # never padded up to a longer chunk
    assert engine.pick_together(prompts(100, 110), budget=200) == [0]
    assert engine.pick_together(prompts(100), budget=100) == []  # the first alone does not fit
    later = prompts(300, 20)
    later[0].next = 1  # past its first chunk: prefill_later runs it
    assert engine.pick_together(later) == []


def test_prompt_longer_than_a_slot_names_both_lengths():
    m = vl2_jax.load_pretrained(ckpt_dir("mha"), runtime=Runtime(max_seq_len=64))
    case = load_case("mha", "one_photo")
    batch = m.processor.batchify([m.processor(case["conversation"], open_images(case))])
    with pytest.raises(InputError, match=r"the prompt has 98 tokens but a slot holds 64 tokens \(max_seq_len\)"):
        m.generate(batch, max_new_tokens=4)
    with pytest.raises(vl2_jax.ConfigError, match="max_batch"):
        Runtime(max_batch=0)


@pytest.mark.parametrize("ending", ["length", "stop_string", "context", "eos"])
def test_stream_carries_the_whole_answer(ending):
    """The streamed pieces add up to `generate`'s text for every way an answer ends (the last characters
    were once held back for a stop string and never sent)."""
    m = vl2_jax.load_pretrained(ckpt_dir("mha"), runtime=Runtime(max_seq_len=40 if ending == "context" else None))
    case = load_case("mha", "text_only")
    batch = m.processor.batchify([m.processor(case["conversation"], open_images(case))])
    kw = dict(max_new_tokens=32, stop=["User:"])
    if ending == "stop_string":
        full = m.generate(batch, max_new_tokens=32).text[0]
        kw["stop"] = [full[5:8]]  # three characters that usually span tokens
    if ending == "eos":  # the fixture's greedy answer never ends: make EOS outscore its second token
        second = m.generate(batch, max_new_tokens=2).token_ids[0][1]
        language = dict(m.params["params"]["language"])
        eos = m.cfg.language.eos_token_id
        language["lm_head"] = language["lm_head"].at[:, eos].set(language["lm_head"][:, second] * 1.01)
        params = {"params": {**m.params["params"], "language": language}}
        m = vl2_jax.VL2Model(m.cfg, params, m.processor, m.dtype, m.runtime)
    result = m.generate(batch, **kw)
    streamed = "".join(m.stream(batch, **kw))
    assert streamed == result.text[0]
    want = {"length": "length", "stop_string": "stop", "context": "length", "eos": "stop"}[ending]
    assert result.finish_reason[0] == want
    if ending == "context":
        assert len(result.token_ids[0]) == 40 - 15
    if ending == "eos":
        assert result.token_ids[0][-1] == m.cfg.language.eos_token_id


def test_a_cache_the_device_cannot_hold_is_refused_before_compiling(monkeypatch):
    """max_batch x max_seq_len beyond the device's free memory: one ConfigError naming both and the
    memory it needs (the device's memory report faked: the CPU reports none)."""
    m = vl2_jax.load_model("random:test", "float32", runtime=Runtime(max_batch=64, max_seq_len=1024))
    device = type(jax.local_devices()[0])
    monkeypatch.setattr(device, "memory_stats", lambda self: {"bytes_limit": 10_000_000, "bytes_in_use": 2_000_000})
    need = m.engine.cache_bytes() / 1e9
    (result, counts) = count_compiles(lambda: pytest.raises(vl2_jax.ConfigError, m.engine.new_state))
    assert counts == dict.fromkeys(EVENTS, 0)
    message = str(result.value)
    assert "max_batch=64 x max_seq_len=1024" in message and f"{need:.2f} GB" in message and "0.01 GB is free" in message


def test_a_cache_beyond_the_systems_memory_is_refused_on_a_cpu(monkeypatch):
    """On a CPU (no device memory report) the cache is weighed against the memory the system has
    available: one ConfigError naming both sizes, before anything is compiled."""
    if jax.local_devices()[0].platform != "cpu":
        pytest.skip("a CPU's check (an accelerator reports its own memory)")
    m = vl2_jax.load_model("random:test", "float32", runtime=Runtime(max_batch=64, max_seq_len=1024))
    monkeypatch.setattr(engine_module, "available_memory", lambda: 20_000_000)
    need = m.engine.cache_bytes() / 1e9
    (result, counts) = count_compiles(lambda: pytest.raises(vl2_jax.ConfigError, m.engine.new_state))
    assert counts == dict.fromkeys(EVENTS, 0)
    message = str(result.value)
    assert "max_batch=64 x max_seq_len=1024" in message and f"{need:.2f} GB" in message
    assert "0.02 GB of memory available" in message
    monkeypatch.setattr(engine_module, "available_memory", lambda: None)  # (unknown: no check)
    assert m.engine.new_state() is not None


def test_under_a_mesh_the_memory_check_weighs_each_devices_shards():
    """A device's share is the shards it holds (checked against the cache's real shards); on a CPU this
    process's devices share the system's memory, so a cache whose one shard fits but whose shards
    together do not is refused."""
    if jax.local_devices()[0].platform != "cpu":
        pytest.skip("a CPU's check")
    m = vl2_jax.load_model("random:test", "float32", runtime=Runtime(max_batch=4, max_seq_len=256),
                           mesh="data=2,expert=2,tensor=2")
    engine = m.engine
    state = engine.new_state()
    device = engine.mesh.devices.flat[0]
    held = sum(s.data.nbytes for leaf in jax.tree.leaves(state.cache) for s in leaf.addressable_shards
               if s.device == device)
    assert held == engine.cache_bytes_per_device() < engine.cache_bytes()
    with unittest.mock.patch.object(engine_module, "available_memory", lambda: 8 * held - 1):  # 8 shards don't fit
        with pytest.raises(vl2_jax.ConfigError, match="but the system has .* GB of memory available"):
            engine.check_memory()
    with unittest.mock.patch.object(engine_module, "available_memory", lambda: 8 * held):  # they just fit
        engine.check_memory()


def test_the_python_api_takes_what_the_cli_takes():
    """`load_pretrained` takes every spec `load_model` does (here random:test), and `generate` takes one
    processor output as well as a batch, with the same answer."""
    m = vl2_jax.load_pretrained("random:test")
    one = m.processor([{"role": "user", "content": "Hi."}])
    assert m.generate(one, max_new_tokens=4).token_ids == m.generate(m.processor.batchify([one]), max_new_tokens=4).token_ids


@pytest.mark.parametrize("layout", ["data=2,expert=2,tensor=2"])
def test_nothing_compiles_after_warmup_under_a_mesh(layout):
    """Every program pins the state's shardings, so the calls after warmup see what warmup compiled for;
    the answers equal one device's."""
    runtime = Runtime(max_batch=2, max_seq_len=256, prefill_chunks=(64, 256))
    single = vl2_jax.load_pretrained(ckpt_dir("mla"), runtime=runtime)
    m = vl2_jax.load_pretrained(ckpt_dir("mla"), runtime=runtime, mesh=layout)
    m.warmup()
    cases = [load_case("mla", n) for n in ("text_only", "one_wide", "two_images")]
    outs = [m.processor(c["conversation"], open_images(c)) for c in cases]

    def run():
        return [m.generate(m.processor.batchify(outs[i:i + 2]), max_new_tokens=6).token_ids for i in range(2)]

    got, counts = count_compiles(run)
    assert counts == dict.fromkeys(EVENTS, 0), counts
    assert got == [single.generate(single.processor.batchify(outs[i:i + 2]), max_new_tokens=6).token_ids
                   for i in range(2)]


def test_a_prompt_whose_tiles_fit_the_slot_is_accepted():
    """Local tiles bring side * side tokens each (plus a newline per row): two wide images of 20 tiles in
    103 tokens fit a 110-token slot, and answer as they do in a roomier one."""
    roomy = vl2_jax.load_model("random:test", "float32", runtime=Runtime(max_batch=1))
    tight = vl2_jax.VL2Model(roomy.cfg, roomy.params, roomy.processor, roomy.dtype,
                             Runtime(max_batch=1, max_seq_len=110, prefill_chunks=(64, 128)))
    one = roomy.processor([{"role": "user", "content": "<image>\n<image>\n"}], [image(11, 504, 56), image(12, 504, 56)])
    assert len(one.input_ids) <= 104 and len(one.pixels) == 20
    assert tight.generate(one, max_new_tokens=5).token_ids == roomy.generate(one, max_new_tokens=5).token_ids


def test_decode_speed_leaves_out_a_first_runs_compiling():
    """`decode_tokens_per_s` is over decoding alone: on a fresh model the decode programs compile after
    the first token (seconds on a CPU, against milliseconds of decoding), and that time is left out."""
    m = vl2_jax.load_model("random:test", "float32", runtime=Runtime(max_batch=1))
    batch = m.processor.batchify([m.processor([{"role": "user", "content": "Is it red?"}])])
    start = time.perf_counter()
    first = m.generate(batch, max_new_tokens=40)
    after_first_token = time.perf_counter() - start - first.ttft_s
    again = m.generate(batch, max_new_tokens=40)
    assert first.token_ids == again.token_ids
    assert after_first_token > 0.3  # (compiling happened there)
    assert first.decode_s < 0.25 * after_first_token and first.decode_s < 20 * again.decode_s + 0.05
