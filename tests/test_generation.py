"""Generation: greedy parity with the reference's `generate`, chunked prefill, batches, the cache, sampling
and compile counts."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vl2_jax
from tests.conftest import VARIANTS, all_cases, ckpt_dir, load_case, open_images
from vl2_jax import Runtime
from vl2_jax.errors import ConfigError, InputError
from vl2_jax.generation import Detokenizer, Job, RowText
from vl2_jax.sampling import RowSampling, filter_top_k_top_p, penalize, sample_rows


@functools.cache
def model(variant: str, chunks: tuple[int, ...] | None = None) -> vl2_jax.VL2Model:
    """The fixture checkpoint; with `chunks`, the same weights with prompts written in those chunks."""
    if chunks is None:
        return vl2_jax.load_pretrained(ckpt_dir(variant), dtype="float32")
    m = model(variant)
    return vl2_jax.VL2Model(m.cfg, m.params, m.processor, m.dtype, Runtime(prefill_chunks=chunks))


def one(m, variant, name):
    case = load_case(variant, name)
    return m.processor(case["conversation"], open_images(case)), case["arrays"]["greedy"].tolist()


@pytest.mark.parametrize("variant,name", all_cases())
def test_greedy_matches_reference_whole_and_chunked_prefill(variant, name):
    m = model(variant)
    out, greedy = one(m, variant, name)
    batch = m.processor.batchify([out])
    r = m.generate(batch, max_new_tokens=len(greedy))
    assert r.token_ids[0] == greedy
    assert r.finish_reason[0] == ("stop" if greedy[-1] == m.cfg.language.eos_token_id else "length")
    assert model(variant, (7,)).generate(batch, max_new_tokens=len(greedy)).token_ids[0] == greedy


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_gives_each_rows_answer(variant):
    m = model(variant)
    names = ("three_images_no_crop", "text_only", "one_wide")
    outs, greedys = zip(*(one(m, variant, n) for n in names))
    r = m.generate(m.processor.batchify(list(outs)), max_new_tokens=max(map(len, greedys)))
    for got, want in zip(r.token_ids, greedys):
        assert got[: len(want)] == want


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_attention_gives_the_reference_answers(variant):
    """attention="xla" runs `jax.nn.dot_product_attention` (MLA expanded from the latent cache), the form
    cuDNN runs on GPUs, at every step: the reference's greedy tokens for a left-padded batch of three,
    prefilled whole and in chunks of 7 (queries meeting earlier chunks' cache entries)."""
    base = model(variant)
    names = ("three_images_no_crop", "text_only", "one_wide")
    outs, greedys = zip(*(one(base, variant, n) for n in names))
    batch = base.processor.batchify(list(outs))
    for chunks in (Runtime().prefill_chunks, (7,)):
        runtime = vl2_jax.Runtime(attention="xla", prefill_chunks=chunks)
        m = vl2_jax.VL2Model(base.cfg, base.params, base.processor, jnp.float32, runtime)
        r = m.generate(batch, max_new_tokens=max(map(len, greedys)))
        for got, want in zip(r.token_ids, greedys):
            assert got[: len(want)] == want


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_attention_kernel_gives_the_reference_answers(variant, monkeypatch):
    """Decoding through the decode attention kernel (interpreted, switched in as on a GPU: each slot's
    keys read up to its own length from the whole cache, one key bucket): the reference's greedy tokens
    for a batch of three prompts of different lengths."""
    from vl2_jax import kernels
    from vl2_jax.modules import attention

    calls = []

    def interpreted(*args, **kwargs):
        calls.append(args[1][0].shape)
        return kernels.decode_attention(*args, **kwargs, interpret=True)

    monkeypatch.setattr(attention, "decode_attention_usable", lambda *args: True)
    monkeypatch.setattr(attention, "decode_attention", interpreted)
    base = model(variant)
    m = vl2_jax.VL2Model(base.cfg, base.params, base.processor, jnp.float32, Runtime())
    assert m.engine.decode_key_buckets == (m.engine.capacity,)
    names = ("three_images_no_crop", "text_only", "one_wide")
    outs, greedys = zip(*(one(m, variant, n) for n in names))
    r = m.generate(m.processor.batchify(list(outs)), max_new_tokens=max(map(len, greedys)))
    for got, want in zip(r.token_ids, greedys):
        assert got[: len(want)] == want
    assert calls and all(shape[:2] == (m.engine.max_batch, m.engine.capacity) for shape in calls)


def test_unknown_attention_is_a_config_error():
    base = model("mha")
    with pytest.raises(ConfigError, match="unknown attention 'flash'"):
        vl2_jax.VL2Model(base.cfg, base.params, base.processor, runtime=vl2_jax.Runtime(attention="flash"))


def test_cached_decoding_equals_full_recompute():
    """Random weights (query LoRA, grouped routing): each greedy token is the argmax of a full forward."""
    base = vl2_jax.PRESETS["test"]
    cfg = dataclasses.replace(base, language=dataclasses.replace(base.language, vocab_size=413))
    proc = model("mla").processor
    cfg = dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, image_size=70), candidate_resolutions=proc.candidate_resolutions
    )
    module = vl2_jax.VL2Model(cfg, None, proc).module
    s = cfg.vision.image_size
    params = jax.jit(module.init)(
        jax.random.key(1), jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 3, s, s)), jnp.zeros((1, 4), jnp.int32),
        jnp.zeros((1, 4), bool), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool),
    )
    m = vl2_jax.VL2Model(cfg, params, proc)
    case = load_case("mla", "one_photo")
    out = proc(case["conversation"], open_images(case))
    r = m.generate(proc.batchify([out]), max_new_tokens=10)
    ids = np.concatenate([out.input_ids, np.asarray(r.token_ids[0][:-1], np.int32)])
    full = dataclasses.replace(
        out, input_ids=ids, images_seq_mask=np.pad(out.images_seq_mask, (0, len(ids) - len(out.input_ids)))
    )
    logits = np.asarray(m.logits(proc.batchify([full])))[0, len(out.input_ids) - 1 :]
    assert logits.argmax(-1).tolist() == r.token_ids[0]


def test_sampling_is_reproducible_and_seed_dependent():
    m = model("mha")
    batch = m.processor.batchify([one(m, "mha", "text_only")[0]])
    kw = dict(max_new_tokens=12, temperature=1.5)
    a, b = m.generate(batch, seed=3, **kw), m.generate(batch, seed=3, **kw)
    assert a.token_ids == b.token_ids
    assert any(m.generate(batch, seed=s, **kw).token_ids != a.token_ids for s in (4, 5, 6))
    # The key is made on the device from the seed's low 32 bits, as `jax.random.key` makes it on the host:
    # numpy and JAX integer seeds work, and seeds equal modulo 2**32 sample alike.
    assert m.generate(batch, seed=np.int64(3), **kw).token_ids == a.token_ids
    assert m.generate(batch, seed=jnp.int32(3), **kw).token_ids == a.token_ids
    assert m.generate(batch, seed=3 + 2**32, **kw).token_ids == a.token_ids
    assert m.generate(batch, seed=-5, **kw).token_ids == m.generate(batch, seed=2**32 - 5, **kw).token_ids


def test_top_k_one_and_tiny_top_p_are_greedy():
    m = model("mla")
    batch = m.processor.batchify([one(m, "mla", "one_wide")[0]])
    greedy = m.generate(batch, max_new_tokens=8).token_ids
    assert m.generate(batch, max_new_tokens=8, temperature=0.9, top_k=1, seed=7).token_ids == greedy
    assert m.generate(batch, max_new_tokens=8, temperature=0.9, top_p=1e-6, seed=7).token_ids == greedy


def test_filters_and_penalty_semantics():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda k, p: np.isfinite(np.asarray(filter_top_k_top_p(logits, jnp.int32(k), jnp.float32(p))))[0]
    assert kept(2, 1.0).tolist() == [True, True, False, False, False]
    assert kept(0, 0.6).tolist() == [True, True, False, False, False]  # 0.5 < 0.6, 0.5 + 0.2 reaches it
    assert kept(0, 0.5).tolist() == [True, False, False, False, False]
    assert kept(0, 1.0).all() and kept(-1, 1.0).all()  # -1 is off too, as SGLang writes it
    pen = penalize(jnp.asarray([[2.0, -2.0, 2.0]]), jnp.asarray([[True, True, False]]), jnp.float32(2.0))
    np.testing.assert_allclose(np.asarray(pen), [[1.0, -4.0, 2.0]])
    # Sampled tokens stay inside the top-k set.
    rows = lambda settings: jax.tree.map(lambda a: jnp.asarray(a)[None], settings)
    params = rows(RowSampling.make(temperature=1.0, top_k=2))
    unseen = jnp.zeros_like(logits, bool)
    draws = jax.vmap(lambda step: sample_rows(logits, unseen, params, step[None], False))(jnp.arange(50))
    assert set(np.asarray(draws).ravel().tolist()) == {0, 1}
    # Greedy exactly when the device's float32 temperature is 0: 1e-46 rounds to 0 and must not divide by it.
    tiny_t = RowSampling.make(temperature=1e-46)
    assert tiny_t.temperature == 0 and RowSampling.make(temperature=1e-30).temperature > 0
    got = sample_rows(logits[:, ::-1], unseen, rows(tiny_t), jnp.zeros((1,), jnp.int32), False)
    assert np.asarray(got).tolist() == [4]
    # A temperature or penalty past float32 is its largest finite value: draws stay tokens of the vocabulary.
    huge = RowSampling.make(temperature=1e308, repetition_penalty=1e308)
    assert np.isfinite(huge.temperature) and np.isfinite(huge.repetition_penalty)
    seen = jnp.asarray([[True, False, True, False, False]])
    draws = jax.vmap(lambda step: sample_rows(logits, seen, rows(huge), step[None], False))(jnp.arange(50))
    assert set(np.asarray(draws).ravel().tolist()) <= set(range(5))


def test_stop_strings_and_streaming():
    m = model("mha")
    batch = m.processor.batchify([one(m, "mha", "text_only")[0]])
    full = m.generate(batch, max_new_tokens=12)
    pieces = list(m.stream(batch, max_new_tokens=12))
    assert "".join(pieces) == full.text[0] and len(pieces) >= 1
    stop = full.text[0][3:5]
    r = m.generate(batch, max_new_tokens=12, stop=[stop])
    assert r.finish_reason == ["stop"] and r.text[0] == full.text[0][: full.text[0].find(stop)]
    assert r.token_ids[0] == full.token_ids[0][: len(r.token_ids[0])]
    assert m.generate(batch, max_new_tokens=12, stop=stop).text == r.text  # one string is one stop string
    with pytest.raises(InputError, match="stop must be a string or a list of strings"):
        m.generate(batch, max_new_tokens=12, stop=[1])
    two = m.processor.batchify([one(m, "mha", "text_only")[0]] * 2)
    with pytest.raises(InputError, match="stream takes one conversation, not a batch of 2"):
        list(m.stream(two, max_new_tokens=4))
    with pytest.raises(TypeError, match="stream yields the text itself and takes no on_text"):
        m.stream(batch, on_text=print)


def test_closing_a_stream_stops_its_generation():
    """Leaving a `stream` loop early (`break`, an exception, Ctrl-C in a notebook) ends the answer: the
    thread that generated it went on to max_new_tokens, holding the model's state (so that the next call
    made a second cache) and the device."""
    import threading

    m = model("mha")
    batch = m.processor.batchify([one(m, "mha", "text_only")[0]])
    m.generate(batch, max_new_tokens=400, ignore_eos=True)  # (compiled before the stream is timed)
    before = set(threading.enumerate())
    pieces = m.stream(batch, max_new_tokens=400, ignore_eos=True)
    next(pieces)
    pieces.close()
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert m.generate(batch, max_new_tokens=3).generated_tokens == [3]


def test_stop_strings_skip_special_tokens_in_generate_stream_and_the_scheduler():
    """A model that answers with special tokens: the fixture's weights with the ids of "!?" and
    <|grounding|> swapped in the embedding and the head (the same answer, relabelled). A stop string
    within or across <|grounding|>'s text ends no answer; one in the ordinary text right after it cuts
    exactly, in `generate`, in `stream` and in the server's scheduler."""
    from vl2_jax.engine import Request
    from vl2_jax.serving.scheduler import Scheduler

    base = model("mla")
    out, greedy = one(base, "mla", "text_only")  # "!?" x3, "`", ...
    special, plain = base.processor.tokenizer.token_to_id("<|grounding|>"), greedy[0]
    assert special not in out.input_ids and plain not in out.input_ids
    swap = np.arange(base.cfg.language.vocab_size)
    swap[[special, plain]] = swap[[plain, special]]
    language = dict(base.params["params"]["language"])
    language["embed"], language["lm_head"] = language["embed"][swap], language["lm_head"][:, swap]
    params = {"params": {**base.params["params"], "language": language}}
    m = vl2_jax.VL2Model(base.cfg, params, base.processor, jnp.float32)
    batch = m.processor.batchify([out])
    full = m.generate(batch, max_new_tokens=12)
    assert full.token_ids[0] == [special if t == plain else t for t in greedy]
    assert full.text[0].startswith("<|grounding|>" * 3 + "`")
    for stop in (["|g"], ["><"], [">`"], ["|g", "<|grounding|>"]):
        r = m.generate(batch, max_new_tokens=12, stop=stop)
        assert r.finish_reason == ["length"] and r.text == full.text, stop
        assert "".join(m.stream(batch, max_new_tokens=12, stop=stop)) == full.text[0], stop
    want = "<|grounding|>" * 3
    r = m.generate(batch, max_new_tokens=12, stop=["|g", "`"])
    assert r.finish_reason == ["stop"] and r.text == [want] and r.token_ids[0] == full.token_ids[0][:4]
    assert "".join(m.stream(batch, max_new_tokens=12, stop=["|g", "`"])) == want
    sched = Scheduler(m).start()
    try:
        request = Request.from_output(out, m.cfg.tokens_per_tile_side)
        events = list(sched.submit(Job(request, 12, RowSampling.make(), ("|g", "`"), m.cfg.language.eos_token_id)).iter_events(timeout=120))
    finally:
        sched.stop()
    assert "".join(e.text for e in events) == want and events[-1].finish_reason == "stop"


EOS = 256  # a byte-level vocabulary: tokens 0-255 are bytes
REF, GROUNDING = 257, 258  # and two special tokens
SPECIAL = {REF: "<|ref|>", GROUNDING: "<|grounding|>"}


def _bytes_decode(ids) -> str:
    """The byte-level vocabulary's text (special tokens kept, EOS not): its bytes joined, then decoded."""
    return b"".join(SPECIAL[i].encode() if i in SPECIAL else bytes([i]) for i in ids if i != EOS).decode(
        "utf-8", errors="replace")


def _stream_pieces(data, stop=(), eos_at=None, steps=2):
    """RowText fed `data` (bytes, or token ids) a few tokens at a time, `finished` with the last call, as
    the batcher does; (pieces, final text). An EOS token follows when `eos_at` says so."""
    tokens = list(data) + ([EOS] if eos_at else [])
    row = RowText(Detokenizer(_bytes_decode, special=frozenset(SPECIAL)), stop, EOS)
    pieces = []
    for start in range(0, len(tokens), steps):
        new = tokens[start:start + steps]
        pieces.append(row.add(new, start + steps >= len(tokens)))
        if row.cut:
            break
    return pieces, row.text()


@pytest.mark.parametrize("ending", ["length", "length mid-character", "stop string", "eos"])
def test_streamed_multibyte_text_is_the_whole_answer(ending):
    """Characters of 2-4 bytes split over tokens: no piece shows a half character (U+FFFD) while the
    answer goes on, and the pieces add up to the final text for each way it ends (at the length limit,
    the held-back start of a stop string, "Use", and a half character are released)."""
    text = "aé日本🙂 ok\nUser: more"
    data = {"length": "aé日本🙂 ok\nUse".encode(), "length mid-character": "aé日本🙂".encode()[:-2],
            "stop string": text.encode(), "eos": "é日🙂".encode()}[ending]
    want = {"length": "aé日本🙂 ok\nUse", "length mid-character": "aé日本\ufffd", "stop string": "aé日本🙂 ok\n",
            "eos": "é日🙂"}[ending]
    for stop, steps in ((("User:",), 3), (("User:",), 1), ((), 1)):
        if ending == "stop string" and not stop:
            continue
        pieces, final = _stream_pieces(data, stop=stop, eos_at=ending == "eos", steps=steps)
        assert "".join(pieces) == final == want, (stop, steps)
        assert all("\ufffd" not in p for p in pieces[:-1]), (stop, steps)


@pytest.mark.parametrize("stop,want", [
    ("|g", "say <<|ref|>|/ref|> x<|grounding|>"),  # (not the "|g" of <|grounding|>: the one after it)
    ("ref|>", "say <<|ref|>|/"),  # (not the end of <|ref|>: the ordinary text "|/ref|>")
    (", end", "say <<|ref|>|/ref|> x<|grounding|>|g"),
    ("<|ref|>", None), ("<<|", None), ("|>|/", None), ("x<|g", None), ("ng|>|g", None)])
def test_a_stop_string_matches_only_ordinary_tokens_text(stop, want):
    """The text keeps special tokens, but a stop string is never found within, partly within or across a
    special token's text; one in the ordinary text around them cuts the answer exactly before it. Fed
    a token at a time, three at a time or all at once, the pieces add up to the same final text."""
    tokens = [*b"say <", REF, *b"|/ref|> x", GROUNDING, *b"|g, end"]
    whole = "say <<|ref|>|/ref|> x<|grounding|>|g, end"
    for steps in (1, 3, len(tokens)):
        pieces, final = _stream_pieces(tokens, stop=(stop,), steps=steps)
        assert "".join(pieces) == final == (whole if want is None else want), steps


def test_text_up_to_a_special_token_is_shown_at_once():
    """No stop string begins within or before a special token's text: none of it is held back."""
    row = RowText(Detokenizer(_bytes_decode, special=frozenset(SPECIAL)), ("a long stop string",), EOS)
    assert row.add([*b"ab", GROUNDING], False) == "ab<|grounding|>"
    assert row.add([*b"cd"], False) == ""  # (ordinary text: held back again)


def test_piecewise_decoding_gives_the_pieces_and_text_of_whole_decoding_in_linear_time():
    """A byte-level tokenizer (the fixture's): RowText with `joins` settles the text as it grows; on random
    token streams (with multi-byte characters split over tokens, special tokens, stop strings, EOS) its
    pieces, cut and final text equal those of decoding the whole answer at each step, no stop string is
    found within a special token's text nor missed outside, and a 3000-token answer decodes each token a
    bounded number of times."""
    from vl2_jax.processor import Processor

    processor = Processor.from_pretrained(ckpt_dir("mha"))
    assert processor.tokenizer.pieces_join
    decode, eos, vocab = processor.decode, processor.tokenizer.eos_token_id, len(processor.tokenizer)
    special = processor.tokenizer.special_ids
    clear = lambda opaque, i, s: all(end <= i or start >= i + len(s) for start, end in opaque)  # (s at i)
    rng = np.random.default_rng(0)
    for trial in range(300):
        tokens = rng.integers(0, vocab, int(rng.integers(1, 120))).tolist()
        if trial % 3 == 0:
            tokens.append(eos)
        width = (2, 3) if trial % 4 == 1 else (12, 40)  # (long ones often begin inside the settled text)
        stop = tuple(decode(tokens[i:i + width[0]])[:width[1]] for i in rng.integers(0, len(tokens), 2)) if trial % 2 else ()
        rows = [RowText(Detokenizer(decode, joins, special), stop, eos) for joins in (False, True)]
        at = 0
        while at < len(tokens) and not rows[0].cut:
            step = int(rng.integers(1, 17))
            new, at = tokens[at:at + step], at + step
            pieces = [row.add(new, at >= len(tokens)) for row in rows]
            assert pieces[0] == pieces[1], (trial, at)
        assert rows[0].text() == rows[1].text() and rows[0].cut == rows[1].cut and rows[0].matched == rows[1].matched
        seen = tokens[:at][:-1] if tokens[:at][-1] == eos else tokens[:at]  # (the answer's tokens)
        text = decode(seen)
        opaque = [(len(decode(seen[:n])), len(decode(seen[:n + 1]))) for n, t in enumerate(seen) if t in special]
        if rows[0].cut:
            cut = rows[0].cut[1]
            assert text[cut:].startswith(rows[0].matched) and clear(opaque, cut, rows[0].matched), trial
        else:
            assert not any(clear(opaque, i, s) for s in stop if s for i in range(len(text)) if text.startswith(s, i)), trial

    decoded = []
    counting = lambda ids: decoded.append(len(ids)) or decode(ids)
    row = RowText(Detokenizer(counting, joins=True), ("never-said",), eos)
    tokens = rng.integers(0, vocab, 3000).tolist()
    for i in range(0, 3000, 4):
        row.add(tokens[i:i + 4], False)
    assert sum(decoded) < 30 * 3000, sum(decoded)  # (decoding the whole answer at each step: ~1.1M)


def test_the_stop_string_that_cut_is_the_earliest_found():
    decode = lambda ids: bytes(ids).decode()
    for stop, matched in ((("xyz", "c", "b"), "b"), (("bc", "b"), "bc"), ((), None)):
        row = RowText(Detokenizer(decode), stop, EOS)
        row.add(list(b"abcdef"), False)
        assert row.matched == matched and row.text() == ("abcdef" if matched is None else "a"), stop


def test_context_limit():
    m = model("mha")
    tight = dataclasses.replace(m.cfg.language, max_position_embeddings=20)
    m2 = vl2_jax.VL2Model(dataclasses.replace(m.cfg, language=tight), m.params, m.processor)
    batch = m.processor.batchify([one(m, "mha", "text_only")[0]])  # 15 prompt tokens
    r = m2.generate(batch, max_new_tokens=50)
    assert len(r.token_ids[0]) == 5 and r.finish_reason == ["length"]
    long = m.processor.batchify([one(m, "mha", "one_photo")[0]])
    with pytest.raises(InputError, match="98 tokens.*20 tokens"):
        m2.generate(long, max_new_tokens=5)


@pytest.mark.parametrize(
    "kwargs,words",
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty")],
)
def test_bad_arguments(kwargs, words):
    m = model("mha")
    batch = m.processor.batchify([one(m, "mha", "text_only")[0]])
    with pytest.raises(InputError, match=words):
        m.generate(batch, **kwargs)


def test_device_out_of_memory_becomes_one_clear_error(monkeypatch):
    from vl2_jax import generation
    from vl2_jax.errors import DeviceMemoryError

    m = model("mha")
    batch = m.processor.batchify([one(m, "mha", "text_only")[0]])

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.9GiB.")

    monkeypatch.setattr(generation, "run", exhausted)
    with pytest.raises(DeviceMemoryError, match="ran out of memory while generating.*prefill_chunk"):
        m.generate(batch, max_new_tokens=4)


def test_decode_and_prefill_update_the_cache_in_place():
    """The engine's compiled decode loop, prefill and insert alias the donated state (no second copy of
    the cache in memory)."""
    m = vl2_jax.VL2Model(model("mla").cfg, model("mla").params, model("mla").processor, jnp.float32,
                         Runtime(max_batch=2, max_seq_len=256, prefill_chunks=(8,)))
    engine = m.engine
    state = engine.new_state()
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(state.cache))
    lm = engine.language_params(m.params)
    stop = np.zeros((2,), bool)
    decode = engine._decode.lower(lm, state, stop, 2, 256, True)
    assert decode.compile().memory_analysis().alias_size_in_bytes >= cache_bytes
    x = jnp.zeros((engine.capacity, m.cfg.language.hidden_size), m.dtype)
    rows = np.zeros((2,), np.int32)
    one, four = np.zeros((1,), np.int32), np.zeros((4,), np.int32)
    for program in (engine._prefill.lower(lm, state, (x, x), rows, rows, 8),  # two prompts' first chunks
                    engine._extend.lower(lm, state, (x,), one, one + 8, one, 8, 256),  # a later one (in place)
                    engine._extend.lower(lm, state, (x,) * 4, four, four + 8, four, 8, 256)):  # four (a scatter)
        assert program.compile().memory_analysis().alias_size_in_bytes >= cache_bytes


@pytest.mark.parametrize("penalty", [1.3, pytest.param(0.7, marks=pytest.mark.slow)])  # (0.7: 22 s, the same code)
def test_repetition_penalty_matches_a_plain_loop_over_full_forwards(penalty):
    """Greedy with a repetition penalty through the engine equals a plain loop: the whole sequence's
    logits from a full forward (no cache), Hugging Face's penalty on every token of the prompt and the
    answer so far (positive logits divided, negative multiplied), argmax."""
    variant = "mla"
    m = vl2_jax.load_pretrained(ckpt_dir(variant))
    case = load_case(variant, "one_wide")
    out = m.processor(case["conversation"], open_images(case))
    steps = 8
    got = m.generate(m.processor.batchify([out]), max_new_tokens=steps, repetition_penalty=penalty,
                     ignore_eos=True).token_ids[0]
    ids, mask, want = list(out.input_ids), list(out.images_seq_mask), []
    for _ in range(steps):
        seq = dataclasses.replace(out, input_ids=np.asarray(ids, np.int32), images_seq_mask=np.asarray(mask))
        logits = np.asarray(m.logits(m.processor.batchify([seq])))[0, -1].astype(np.float64)
        seen = np.unique(ids)
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
        token = int(np.argmax(logits))
        want.append(token)
        ids.append(token)
        mask.append(False)
    assert got == want
