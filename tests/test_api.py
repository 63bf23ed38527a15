"""The HTTP layer over a scripted scheduler (no model runs): OpenAI's client and SGLang's /generate
shapes, streaming, errors in OpenAI's shape with their status codes, the API key, cancellation when a
client leaves, 429 on a full queue, metrics. tests/test_serve.py runs the same routes on a real model."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import socket
import tempfile
import threading
import time

import httpx2
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

from vl2_jax.config import PRESETS, Runtime
from vl2_jax.engine import Engine
from vl2_jax.load import write_assets
from vl2_jax.processor import Processor
from vl2_jax.serving.api import ServerSettings, create_app
from vl2_jax.serving.metrics import Metrics
from vl2_jax.serving.scheduler import Event, QueueFull

MODEL = "vl2-test"
PIECES = ["Hel", "lo", ", wor", "ld"]


@functools.cache
def processor() -> Processor:
    return Processor.from_pretrained(write_assets(tempfile.mkdtemp(prefix="vl2-api-"), PRESETS["test"]))


class FakeModel:
    def __init__(self):
        self.cfg = PRESETS["test"]
        self.dtype, self.quant = jnp.float32, "int8"
        p = processor()
        self.engine = Engine(self.cfg, jnp.float32, Runtime(max_batch=4, max_seq_len=256), p.pixel_norm, p.pad_id)


class FakeHandle:
    def __init__(self, job, script, scheduler, measured=True):
        self.job, self.script, self.scheduler, self.measured = job, script, scheduler, measured
        self.cancelled = False

    async def events(self):
        for delay, event in self.script(self.job):
            await asyncio.sleep(delay)
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self):
        if not self.cancelled:
            self.scheduler.cancelled.append(self)
        self.cancelled = True


def answer(job, pieces=PIECES, reason="stop", delay=0.0):
    """Events of an answer of `pieces`, one token each, the last with `reason`."""
    p = len(job.request.ids)
    out = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        out.append((delay, Event(piece, [10 + i], reason if last else None, p, i + 1, 0)))
    return out


class FakeScheduler:
    """Scripted events per job (`script(job) -> [(delay, Event)]`), the jobs it got and the handles
    cancelled; `full` makes submit raise QueueFull."""

    def __init__(self):
        self.model = FakeModel()
        self.script = answer
        self.jobs, self.cancelled, self.full = [], [], False
        self.max_queue = 3
        self.busy, self.stepped_at = False, 0.0  # (busy: stats report a running request)

    def submit(self, job, measured=True):
        if self.full:
            raise QueueFull("3 requests are waiting for a slot, as many as the queue holds")
        self.jobs.append(job)
        return FakeHandle(job, self.script, self, measured)

    def stats(self):
        return {"queued": 0, "running": int(self.busy), "max_batch": 4, "max_seq_len": 256, "alive": True}

    def flush_cache(self):
        pass


@contextlib.contextmanager
def running(app):
    """The app on a free local port, served by uvicorn on a thread -> its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server():
    sched = FakeScheduler()
    metrics = Metrics()
    app = create_app(sched, MODEL, processor(), ServerSettings(max_body_bytes=200_000, max_images=2), metrics)
    with running(app) as url:
        yield sched, url, app


@pytest.fixture
def sched(server):
    s = server[0]
    s.script, s.full = answer, False
    s.jobs.clear(), s.cancelled.clear()
    return s


@pytest.fixture
def url(server):
    return server[1]


def client(url, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)


def png_data_url(seed=0, size=(60, 40)) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_of(data_url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")


# -- OpenAI -----------------------------------------------------------------------------------------------
def test_chat_with_an_image_part_becomes_the_official_prompt(sched, url):
    image = png_data_url()
    out = client(url).chat.completions.create(model=MODEL, max_tokens=7, temperature=0, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                     {"type": "text", "text": "Describe it."}]}])
    assert out.choices[0].message.content == "Hello, world"
    assert out.choices[0].finish_reason == "stop" and out.model == MODEL
    job = sched.jobs[-1]
    want = processor()([{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "<image>\nDescribe it."}], [image_of(image)])
    assert np.array_equal(job.request.ids, want.input_ids)
    assert job.request.tiles is not None and job.request.image_mask.sum() > 0
    assert job.max_new_tokens == 7 and float(job.sampling.temperature) == 0
    assert job.eos == PRESETS["test"].language.eos_token_id
    assert out.usage.prompt_tokens == len(want.input_ids) and out.usage.completion_tokens == 4


def test_a_request_past_the_timeout_is_cancelled_with_a_504():
    """request_timeout_s: an answer still running after it gets 504 (a stream: an error event, then
    [DONE]), and its job is cancelled, freeing its slot."""
    sched = FakeScheduler()
    # the first token at once, the others a second apart: 3 s in all
    sched.script = lambda job: [(0.0 if i == 0 else 1.0, event) for i, (_, event) in enumerate(answer(job))]
    app = create_app(sched, MODEL, processor(), ServerSettings(request_timeout_s=0.5), Metrics())
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    with running(app) as url:
        start = time.monotonic()
        r = httpx2.post(url + "/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 504 and time.monotonic() - start < 2  # (well before the answer's end)
        assert r.json()["error"]["type"] == "timeout" and "--request-timeout" in r.json()["error"]["message"]
        assert len(sched.cancelled) == 1
        lines = [x for x in httpx2.post(url + "/v1/chat/completions", json={**body, "stream": True}, timeout=10)
                 .text.splitlines() if x.startswith("data: ")]
        assert '"timeout"' in lines[-2] and lines[-1] == "data: [DONE]"
        assert "Hel" in "".join(lines)  # what came before the limit was sent
        assert len(sched.cancelled) == 2
        sched.script = answer  # a quick answer is untouched
        assert httpx2.post(url + "/v1/chat/completions", json=body, timeout=10).json()["choices"][0]["message"][
            "content"] == "Hello, world"


def test_with_the_prefix_cache_jobs_are_signed_before_the_scheduler_gets_them():
    """The prefix cache's key hashes every tile: the API computes it on its host threads, so the
    scheduler's device thread does not."""
    from vl2_jax.prefix_cache import signature

    sched = FakeScheduler()
    p = processor()
    sched.model.engine = Engine(PRESETS["test"], jnp.float32, Runtime(max_batch=4, max_seq_len=256, prefix_cache=True),
                                p.pixel_norm, p.pad_id)
    app = create_app(sched, MODEL, p, ServerSettings(max_images=2), Metrics())
    with running(app) as url:
        client(url).chat.completions.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(5)}}, {"type": "text", "text": "What?"}]}])
    r = sched.jobs[-1].request
    assert r.tiles is not None and sched.jobs[-1].signature is not None
    want = signature(r.ids, r.src, r.image_mask, r.tiles, PRESETS["test"].tokens_per_tile_side)
    assert np.array_equal(sched.jobs[-1].signature, want) and (want < 0).any()  # image tokens by digest


def test_chat_stream_is_the_same_text_in_chunks_with_usage(sched, url):
    stream = client(url).chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "Hi"}], seed=3, stop=["x"])
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert pieces == PIECES
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []
    job = sched.jobs[-1]
    assert job.stop == ("x",) and int(job.sampling.seed) == 3
    assert job.max_new_tokens == 256 - len(job.request.ids)  # no limit given: until the slot is full


def test_completions_text_ids_and_stream(sched, url):
    c = client(url)
    out = c.completions.create(model=MODEL, prompt="<|User|>: Hi\n\n<|Assistant|>:", max_tokens=5)
    assert out.choices[0].text == "Hello, world" and out.usage.total_tokens == out.usage.prompt_tokens + 4
    ids = processor().raw("<|User|>: Hi\n\n<|Assistant|>:").input_ids
    assert np.array_equal(sched.jobs[-1].request.ids, ids)
    c.completions.create(model=MODEL, prompt=[0, 5, 6, 7], max_tokens=5)
    assert sched.jobs[-1].request.ids.tolist() == [0, 5, 6, 7]
    text = "".join(ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt="Hi", stream=True))
    assert text == "Hello, world"
    assert sched.jobs[-1].max_new_tokens == 16  # no limit given: OpenAI's default for completions


# -- SGLang -----------------------------------------------------------------------------------------------
def test_generate_plain_and_streamed(sched, url):
    image = png_data_url(1)
    raw = image.split(",", 1)[1]
    body = {"text": "<|User|>: <image>\nWhat? <image>\n\n<|Assistant|>:", "image_data": [image, raw],
            "sampling_params": {"max_new_tokens": 9, "temperature": 0, "top_k": -1, "stop": "User"}, "rid": "r1"}
    out = httpx2.post(url + "/generate", json=body).json()
    assert out["text"] == "Hello, world" and out["output_ids"] == [10, 11, 12, 13]
    meta = out["meta_info"]
    assert meta["id"] == "r1" and meta["finish_reason"]["type"] == "stop" and meta["completion_tokens"] == 4
    job = sched.jobs[-1]
    assert job.max_new_tokens == 9 and job.stop == ("User",) and int(job.sampling.top_k) == 0
    assert job.request.tiles is not None and len(job.request.tiles) >= 2
    with httpx2.stream("POST", url + "/generate", json={**body, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert [c["text"] for c in chunks] == ["Hel", "Hello", "Hello, wor", "Hello, world"]  # cumulative, as SGLang's
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "stop" and chunks[0]["meta_info"]["finish_reason"] is None
    assert "index" not in chunks[0]
    with httpx2.stream("POST", url + "/generate", json={**body, "text": [body["text"]], "stream": True}) as r:
        batch = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    assert [c["text"] for c in batch] == [c["text"] for c in chunks] and {c["index"] for c in batch} == {0}
    sched.script = lambda job: [*answer(job)[:-1], (0, Event("ld", [13], "stop", 3, 4, 0, None, "User"))]
    out = httpx2.post(url + "/generate", json={**body, "text": [body["text"]]}).json()  # a batch of one: a list
    assert isinstance(out, list) and out[0]["meta_info"]["finish_reason"] == {"type": "stop", "matched": "User"}
    sched.script = functools.partial(answer, reason="length")
    out = httpx2.post(url + "/generate", json={"input_ids": [0, 9, 9], "sampling_params": {"max_new_tokens": 4}}).json()
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert sched.jobs[-1].request.ids.tolist() == [0, 9, 9]


# -- errors -----------------------------------------------------------------------------------------------
def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("body, status, param", [
    ({**CHAT, "n": 2}, 400, "n"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({**CHAT, "functions": [{"name": "f"}]}, 400, "functions"),
    ({**CHAT, "tool_choice": "auto"}, 400, "tool_choice"),
    ({**CHAT, "function_call": "auto"}, 400, "function_call"),
    ({**CHAT, "messages": [{"role": "user", "content": None}]}, 400, "messages.0.content"),
    ({**CHAT, "logprobs": True}, 400, "logprobs"),
    ({**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ({**CHAT, "audio": {"voice": "x"}}, 400, "audio"),
    ({**CHAT, "modalities": ["text", "audio"]}, 400, "modalities"),
    ({**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({**CHAT, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({**CHAT, "regex": "a+"}, 400, "regex"),  # (vLLM's and SGLang's extras: refused, not silently ignored)
    ({**CHAT, "guided_choice": ["yes", "no"]}, 400, "guided_choice"),
    ({**CHAT, "json_schema": "{}"}, 400, "json_schema"),
    ({**CHAT, "min_p": 0.1}, 400, "min_p"),
    ({**CHAT, "min_tokens": 5}, 400, "min_tokens"),
    ({**CHAT, "stop_token_ids": [5]}, 400, "stop_token_ids"),
    ({**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),  # (without stream, as OpenAI)
    ({**CHAT, "temperature": -1}, 400, None),
    ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({**CHAT, "model": "gpt-4"}, 404, "model"),
    ({"model": MODEL}, 400, "messages"),
    ({**CHAT, "messages": []}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, 400,
     "messages.0.content"),
    ({**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]}, 400, None),
    ({**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400, None),
    ({**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400, None),
    ({**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(i)}} for i in range(3)]}]}, 400, None),
    ({**CHAT, "messages": [{"role": "user", "content": "Look: <image>"}]}, 400, None),
    ({**CHAT, "messages": [{"role": "system", "content": [  # (images only in user turns, as the official template)
        {"type": "image_url", "image_url": {"url": png_data_url(0)}}]}, *CHAT["messages"]]}, 400, "messages.0.content.0"),
    ({**CHAT, "messages": [{"role": "user", "content": "word " * 300}]}, 400, None),
    ({**CHAT, "messages": [{"role": "user", "content": "x" * 300_000}]}, 413, None),
])
def test_bad_chat_requests_get_openai_errors(sched, url, body, status, param):
    error = error_of(httpx2.post(url + "/v1/chat/completions", json=body), status)
    if param is not None:
        assert (error["param"] or "").startswith(param), error
    assert not sched.jobs
    assert httpx2.get(url + "/health").status_code == 200


def test_role_and_content_errors_say_what_is_taken(url):
    post = lambda messages: error_of(httpx2.post(url + "/v1/chat/completions", json={**CHAT, "messages": messages}), 400)
    assert "use system (or developer), user or assistant" in post([{"role": "tool", "content": "x"}])["message"]
    assert post([{"role": "user", "content": None}])["message"] == "messages.0.content is missing."
    assert "tool calls are not supported" in post([{"role": "assistant", "content": None}])["message"]


def test_extras_left_at_their_defaults_are_no_constraint(url):
    """The refused extras, sent at the values that mean "off" (as a proxy that re-serializes a request may
    send them), are accepted."""
    unset = {"min_p": 0.0, "min_tokens": 0, "stop_token_ids": [], "regex": None, "use_beam_search": False}
    assert httpx2.post(url + "/v1/chat/completions", json={**CHAT, **unset, "max_tokens": 2}).status_code == 200


def test_other_bad_requests(sched, url):
    error_of(httpx2.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    huge = b'{"max_tokens": ' + b"9" * 5000 + b"}"
    assert "more than 4300 digits" in error_of(httpx2.post(url + "/v1/chat/completions", content=huge), 400)["message"]
    error_of(httpx2.post(url + "/v1/chat/completions", json=[1, 2]), 400)
    assert error_of(httpx2.get(url + "/v1/nothing"), 404)["type"] == "not_found_error"
    wrong = httpx2.get(url + "/v1/chat/completions")
    assert error_of(wrong, 405)["message"] == "/v1/chat/completions takes POST, not GET" and wrong.headers["allow"] == "POST"
    error_of(httpx2.get(url + "/v1/models/gpt-4"), 404)
    error_of(httpx2.post(url + "/v1/completions", json={"prompt": ["a", "b"]}), 400)
    error_of(httpx2.post(url + "/v1/completions", json={"prompt": "a", "echo": True}), 400)
    assert error_of(httpx2.post(url + "/v1/completions", json={"prompt": "a", "ebnf": "x"}), 400)["param"] == "ebnf"
    error_of(httpx2.post(url + "/v1/completions", json={"prompt": [1, 99999]}), 400)
    image = error_of(httpx2.post(url + "/v1/completions", json={"prompt": "<image>\nDescribe it."}), 400)
    assert image["param"] == "prompt" and "/v1/completions takes no images" in image["message"]
    error_of(httpx2.post(url + "/generate", json={"text": "a", "input_ids": [1]}), 400)
    error_of(httpx2.post(url + "/generate", json={"text": "a", "sampling_params": {"n": 2}}), 400)
    error_of(httpx2.post(url + "/generate", json={"text": "a", "sampling_params": {"regex": "a+"}}), 400)
    bad = error_of(httpx2.post(url + "/generate", json={"text": "a", "sampling_params": {"max_new_tokens": -1}}), 400)
    assert bad["param"] == "sampling_params.max_new_tokens" and "max_new_tokens must be at least 1" in bad["message"]
    error_of(httpx2.post(url + "/generate", json={"text": "<image>", "image_data": "A" * 80}), 400)  # bad base64 image
    error_of(httpx2.post(url + "/generate", json={"input_ids": [1], "image_data": png_data_url()}), 400)
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client(url).chat.completions.create(model=MODEL, n=2, messages=[{"role": "user", "content": "Hi"}])
    assert not sched.jobs
    assert httpx2.get(url + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize("route, body, param", [
    ("/v1/chat/completions", {**CHAT, "temperature": True}, "temperature"),  # (a bool is no number)
    ("/v1/chat/completions", {**CHAT, "max_tokens": "8"}, "max_tokens"),    # (nor is a string)
    ("/v1/chat/completions", {**CHAT, "max_tokens": 8.0}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {**CHAT, "seed": True}, "seed"),
    ("/v1/completions", {"prompt": "a", "top_p": "1"}, "top_p"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": True}}, "sampling_params.max_new_tokens"),
    ("/generate", {"input_ids": [[1], [2]]}, "input_ids"),
    ("/generate", {"text": ["a"], "rid": ["x", "y"]}, "rid"),
])
def test_fields_of_the_wrong_type_are_refused_not_converted(sched, url, route, body, param):
    assert error_of(httpx2.post(url + route, json=body), 400)["param"] == param
    assert not sched.jobs


def test_text_that_is_not_unicode_and_bodies_nested_too_deeply_are_400s(sched, url):
    """A lone surrogate escape is valid JSON but no text (it reached the tokenizer: a 500); nesting past
    Python's recursion limit failed the JSON decoder (a 500). A stream: null is false, as OpenAI's API has it."""
    post = lambda route, raw: httpx2.post(url + route, content=raw, headers={"content-type": "application/json"})
    lone = '{"model": "' + MODEL + '", "messages": [{"role": "user", "content": "a \\ud800 b"}]}'
    assert "lone UTF-16 surrogate" in error_of(post("/v1/chat/completions", lone.encode()), 400)["message"]
    assert "lone UTF-16 surrogate" in error_of(post("/generate", b'{"text": "a", "rid": "\\udfff"}'), 400)["message"]
    assert error_of(post("/generate", b'{"text": "a \xed\xa0\x80 b"}'), 400)  # (raw surrogate bytes)
    assert error_of(post("/v1/chat/completions", lone.encode("utf-16")), 400)
    assert "too deeply" in error_of(post("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000), 400)["message"]
    assert not sched.jobs
    paired = '{"model": "' + MODEL + '", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "stream": null}'
    response = post("/v1/chat/completions", paired.encode())
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "".join(PIECES)
    assert sched.jobs and httpx2.get(url + "/health").status_code == 200


def test_settings_out_of_range_name_their_field_and_a_huge_top_k_keeps_every_token(sched, url):
    assert error_of(httpx2.post(url + "/v1/chat/completions", json={**CHAT, "top_p": 2}), 400)["param"] == "top_p"
    bad = error_of(httpx2.post(url + "/v1/chat/completions", json={**CHAT, "max_completion_tokens": 0}), 400)
    assert bad["param"] == "max_completion_tokens" and "max_completion_tokens must be" in bad["message"]
    for route, body, param in [("/v1/chat/completions", {**CHAT, "n": 0}, "n"),  # (was "n=0 (several choices ...)")
                               ("/generate", {"text": "a", "sampling_params": {"n": -1}}, "sampling_params.n")]:
        bad = error_of(httpx2.post(url + route, json=body), 400)
        assert bad["param"] == param and bad["message"].startswith(f"{param} must be at least 1 (got ")
    bad = error_of(httpx2.post(url + "/generate", json={"text": "a", "sampling_params": {"temperature": -1}}), 400)
    assert bad["param"] == "sampling_params.temperature"
    assert not sched.jobs
    for body in ({**CHAT, "top_k": 2**40}, {"text": "a", "sampling_params": {"top_k": 2**33}}):
        route = "/generate" if "text" in body else "/v1/chat/completions"
        assert httpx2.post(url + route, json=body).status_code == 200
        assert int(sched.jobs[-1].sampling.top_k) == 2**31 - 1


def test_an_internal_error_is_a_500_in_the_metrics(server, sched, url, monkeypatch):
    def broken(job):
        raise RuntimeError("scheduler broke")

    monkeypatch.setattr(sched, "submit", broken)
    assert error_of(httpx2.post(url + "/v1/chat/completions", json=CHAT), 500)["type"] == "server_error"
    text = httpx2.get(url + "/metrics").text
    assert 'vl2_requests_total{route="/v1/chat/completions",status="500"} 1.0' in text


def test_a_request_through_the_router_without_a_model_is_served(sched, url):
    """SGLang's router fills in "unknown" where a chat request names no model."""
    assert httpx2.post(url + "/v1/chat/completions", json={**CHAT, "model": "unknown"}).status_code == 200
    error_of(httpx2.post(url + "/v1/chat/completions", json={**CHAT, "model": "unknown-2"}), 404)


def test_a_full_queue_is_429_with_retry_after(sched, url):
    sched.full = True
    r = httpx2.post(url + "/v1/chat/completions", json=CHAT)
    assert error_of(r, 429)["code"] == "queue_full" and r.headers["retry-after"] == "1"
    with pytest.raises(openai.RateLimitError):
        client(url).chat.completions.create(**CHAT)
    assert error_of(httpx2.get(url + "/health_generate"), 503)


def test_health_generate_on_a_busy_server_waits_for_a_step_not_behind_the_queue():
    """With requests in flight (here a full queue) the probe submits nothing: 200 once the scheduler
    finishes a step after it came, 503 where none finishes within the health timeout."""
    sched = FakeScheduler()
    sched.busy = sched.full = True
    with running(create_app(sched, MODEL, processor(), ServerSettings(health_timeout_s=1.0), Metrics())) as url:
        stepper = threading.Timer(0.3, lambda: setattr(sched, "stepped_at", time.monotonic()))
        stepper.start()
        start = time.monotonic()
        assert httpx2.get(url + "/health_generate").json() == {"status": "ok"}
        assert 0.25 < time.monotonic() - start < 1.0 and sched.jobs == []
        body = error_of(httpx2.get(url + "/health_generate"), 503)  # (no step after this probe came)
        assert body["message"] == "requests are in flight, but no scheduler step finished within 1.0 s."


def metric(url, prefix: str) -> float:
    """The sum of the /metrics lines that start with `prefix`."""
    return sum(float(x.split()[-1]) for x in httpx2.get(url + "/metrics").text.splitlines() if x.startswith(prefix))


def answered(url, route: str, status: int) -> float:
    """vl2_requests_total of `route` and `status`, from /metrics."""
    return metric(url, f'vl2_requests_total{{route="{route}",status="{status}"}} ')


def test_a_failure_mid_stream_ends_the_stream_with_an_error(sched, url):
    """... and the request counts under the error's status, not the 200 its stream began with."""
    def failing(job):
        return [*answer(job, ["Hel", "lo"])[:1], (0, Event("", [], "error", 3, 1, 0, "RuntimeError: device lost"))]

    sched.script = failing
    before = [answered(url, route, code) for route in ("/v1/chat/completions", "/generate") for code in (200, 500)]
    with pytest.raises(openai.APIError, match="device lost"):
        list(client(url).chat.completions.create(**CHAT, stream=True))
    with httpx2.stream("POST", url + "/generate", json={"text": "a", "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
    after = [answered(url, route, code) for route in ("/v1/chat/completions", "/generate") for code in (200, 500)]
    assert [b - a for a, b in zip(before, after)] == [0, 1, 0, 1]
    assert error_of(httpx2.post(url + "/v1/chat/completions", json=CHAT), 500)["type"] == "server_error"


def wait_for(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_a_client_that_leaves_cancels_its_job(sched, url):
    sched.script = lambda job: answer(job, ["tick"] * 1000, delay=0.05)
    left = answered(url, "/v1/chat/completions", 499)
    with httpx2.stream("POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        for line in r.iter_lines():
            if "tick" in line:
                break
    assert wait_for(lambda: len(sched.cancelled) == 1), "a stream's job not cancelled"
    assert wait_for(lambda: answered(url, "/v1/chat/completions", 499) == left + 1), "a stream left counted as 200"
    with pytest.raises(httpx2.TimeoutException):
        httpx2.post(url + "/generate", json={"text": "a"}, timeout=0.5)
    assert wait_for(lambda: len(sched.cancelled) == 2), "a waiting request's job not cancelled"
    assert httpx2.get(url + "/health").status_code == 200


def test_flush_cache_empties_the_tile_cache():
    from vl2_jax.processor import TileCache

    proc = processor()
    proc.tile_cache = TileCache(16 << 20)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    proc([{"role": "user", "content": "<image>\nHi"}], [image])
    proc([{"role": "user", "content": "<image>\nHi"}], [image])
    assert proc.tile_cache.hits == 1
    with running(create_app(FakeScheduler(), MODEL, proc)) as url:
        assert httpx2.post(url + "/flush_cache").status_code == 200
    proc([{"role": "user", "content": "<image>\nHi"}], [image])
    assert proc.tile_cache.hits == 1 and proc.tile_cache.lookups == 3  # (resampled again)


def test_model_info_reports_the_path_loaded_and_the_served_name_apart():
    """SGLang's router reads tokenizer_path: the model as loaded, whatever name it is served under."""
    with running(create_app(FakeScheduler(), MODEL, processor(), ServerSettings(model_path="/models/vl2-tiny"))) as url:
        info = httpx2.get(url + "/get_model_info").json()
        assert (info["model_path"], info["tokenizer_path"]) == ("/models/vl2-tiny", "/models/vl2-tiny")
        info = httpx2.get(url + "/get_server_info").json()
        assert (info["model_path"], info["served_model_name"]) == ("/models/vl2-tiny", MODEL)


def test_models_info_health_generate_flush_and_metrics(sched, url):
    assert [m.id for m in client(url).models.list()] == [MODEL]
    head = httpx2.head(url + "/health")
    assert head.status_code == 200 and head.content == b""
    card = httpx2.get(url + f"/v1/models/{MODEL}").json()
    assert (card["max_model_len"], card["dtype"], card["quantization"]) == (256, "float32", "int8")
    info = httpx2.get(url + "/get_model_info").json()
    assert (info["model_path"], info["quantization"]) == (MODEL, "int8")
    info = httpx2.get(url + "/get_server_info").json()
    assert (info["dtype"], info["quantization"]) == ("float32", "int8")
    assert info["max_batch"] == 4 and info["internal_states"][0]["alive"] and not info["api_key_required"]
    count = functools.partial(metric, url)
    before = count("vl2_time_to_first_token_seconds_count"), count("vl2_e2e_request_latency_seconds_count")
    assert httpx2.get(url + "/health_generate").json() == {"status": "ok"}
    assert sched.jobs[-1].max_new_tokens == 1
    # (a load balancer's probe is not a request: the latency histograms leave it out)
    assert (count("vl2_time_to_first_token_seconds_count"), count("vl2_e2e_request_latency_seconds_count")) == before
    assert httpx2.post(url + "/flush_cache").status_code == 200
    client(url).chat.completions.create(**CHAT)
    text = httpx2.get(url + "/metrics").text
    assert 'vl2_requests_total{route="/v1/chat/completions",status="200"}' in text
    for name in ("vl2_queue_length", "vl2_running_requests", "vl2_time_to_first_token_seconds_count",
                 "vl2_inter_token_latency_seconds", "vl2_generated_tokens_total", "vl2_prefix_cache_hits_total",
                 "vl2_prefix_cache_queries_total", "vl2_e2e_request_latency_seconds_count"):
        assert name in text, name
    ttft = [line for line in text.splitlines() if line.startswith("vl2_time_to_first_token_seconds_count")]
    assert float(ttft[0].split()[-1]) >= 1


def test_get_load_counts_the_answers_in_progress():
    """SGLang's /get_load, as its router's power-of-two policy reads it: one entry per data-parallel rank.
    (A server of its own: the shared one may still be ending an earlier test's cancelled answers.)"""
    sched = FakeScheduler()
    with running(create_app(sched, MODEL, processor())) as url:
        idle = [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
        assert httpx2.get(url + "/get_load").json() == idle
        sched.script = lambda job: answer(job, ["tick"] * 1000, delay=0.05)
        with httpx2.stream("POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            lines, ticks = r.iter_lines(), 0  # (held: a dropped iterator closes the stream)
            for line in lines:
                ticks += "tick" in line
                if ticks == 3:
                    break
            load = httpx2.get(url + "/get_load").json()
        prompt = len(sched.jobs[-1].request.ids)
        assert len(load) == 1 and load[0]["num_reqs"] == 1 and prompt + 3 <= load[0]["num_tokens"] <= prompt + 20
        assert wait_for(lambda: httpx2.get(url + "/get_load").json()[0]["num_reqs"] == 0)


def test_api_key(sched):
    app = create_app(FakeScheduler(), MODEL, processor(), ServerSettings(api_key="s3cret"))
    create_app(FakeScheduler(), MODEL, processor())  # a second app: metrics of its own, no clash
    with running(app) as url:
        error = error_of(httpx2.post(url + "/v1/chat/completions", json=CHAT), 401)
        assert error["code"] == "invalid_api_key"
        error_of(httpx2.post(url + "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"}), 401)
        error_of(httpx2.get(url + "/v1/models"), 401)
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").chat.completions.create(**CHAT)
        assert client(url, api_key="s3cret").chat.completions.create(**CHAT).choices[0].message.content == "Hello, world"
        assert httpx2.get(url + "/health").status_code == 200
        assert httpx2.get(url + "/metrics").status_code == 200


def test_the_servers_default_max_tokens_replaces_the_routes_and_a_clients_wins():
    sched = FakeScheduler()
    with running(create_app(sched, MODEL, processor(), ServerSettings(default_max_tokens=5))) as url:
        c = client(url)
        c.completions.create(model=MODEL, prompt="Hi")  # (the route's 16 without the setting)
        c.chat.completions.create(**CHAT)  # (until the slot is full without it)
        httpx2.post(url + "/generate", json={"text": "Hi"})  # (SGLang's 128 without it)
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=9)
        assert [job.max_new_tokens for job in sched.jobs] == [5, 5, 5, 9]


def test_draining_refuses_new_work_with_503(server, sched):
    url, app = server[1], server[2]
    app.state.server.draining = True
    try:
        assert error_of(httpx2.post(url + "/v1/chat/completions", json=CHAT), 503)["type"] == "service_unavailable"
        error_of(httpx2.get(url + "/health"), 503)
    finally:
        app.state.server.draining = False
    assert not sched.jobs


def test_image_limits_are_the_settings():
    from vl2_jax.images import ImageLimits

    settings = ServerSettings(image_limits=ImageLimits(max_pixels=1000, allow_fetch=False))
    with running(create_app(FakeScheduler(), MODEL, processor(), settings)) as url:
        part = {"type": "image_url", "image_url": {"url": png_data_url(size=(60, 40))}}
        body = {**CHAT, "messages": [{"role": "user", "content": [part]}]}
        assert "pixels" in error_of(httpx2.post(url + "/v1/chat/completions", json=body), 400)["message"]
        small = {"type": "image_url", "image_url": {"url": png_data_url(size=(30, 30))}}
        body = {**CHAT, "messages": [{"role": "user", "content": [small, small, small]}]}
        assert httpx2.post(url + "/v1/chat/completions", json=body).status_code == 200  # default max_images: 8


def test_start_and_stop_profile_write_a_trace_where_the_server_has_a_profile_directory(tmp_path):
    import jax.numpy as jnp

    with running(create_app(FakeScheduler(), MODEL, processor())) as url:
        off = httpx2.post(url + "/start_profile")
        assert off.status_code == 400 and "--profile-dir" in off.json()["error"]["message"]
    with running(create_app(FakeScheduler(), MODEL, processor(), ServerSettings(profile_dir=str(tmp_path)))) as url:
        assert error_of(httpx2.post(url + "/stop_profile"), 400)["message"].startswith("no profile")
        refused = httpx2.post(url + "/start_profile", json={"output_dir": "/etc"})
        assert error_of(refused, 400)["param"] == "output_dir"
        started = httpx2.post(url + "/start_profile", json={"activities": ["GPU"], "num_steps": None})
        assert started.status_code == 200, started.text
        folder = started.json()["trace_dir"]
        assert folder.startswith(str(tmp_path))
        assert error_of(httpx2.post(url + "/start_profile"), 400)["message"].startswith("a profile is already")
        jnp.arange(1000.0).sum().block_until_ready()
        stopped = httpx2.post(url + "/stop_profile")
        assert stopped.status_code == 200, stopped.text
        files = stopped.json()["files"]
        assert stopped.json()["trace_dir"] == folder
        assert any(f.endswith("perfetto_trace.json.gz") for f in files) and all(f.startswith(folder) for f in files)
        assert any(f.endswith(".xplane.pb") for f in files)  # (TensorBoard's profile)
        assert python_calls(files) == 0  # (Python's own calls only with SGLang's with_stack)
        assert error_of(httpx2.post(url + "/start_profile", json={"with_stack": "yes"}), 400)["param"] == "with_stack"
        assert httpx2.post(url + "/start_profile", json={"with_stack": True}).status_code == 200
        jnp.arange(1000.0).sum().block_until_ready()
        assert python_calls(httpx2.post(url + "/stop_profile").json()["files"]) > 0
        assert httpx2.get(url + "/start_profile").status_code == 200  # (a second trace, by GET as SGLang allows)
        assert httpx2.get(url + "/stop_profile").status_code == 200


def python_calls(files: list[str]) -> int:
    """The Python function events (JAX's Python tracer names them `$file:line function`) of a trace."""
    import gzip
    import json

    path = next(f for f in files if f.endswith("perfetto_trace.json.gz"))
    return sum(str(e.get("name", "")).startswith("$") for e in json.load(gzip.open(path))["traceEvents"])
