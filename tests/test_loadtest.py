"""The load tester against a stub OpenAI-compatible server (FastAPI under uvicorn in a thread, on a port
of its own) that streams a known number of tokens at known delays and records what it was sent."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from PIL import Image

from vl2_jax import loadtest


class Stub:
    """Streams `max_tokens` one-token chunks (or `per_chunk` tokens per chunk), `first_s` before the
    first (`seen_first_s` for a conversation seen before, if given) and `token_s` between chunks; fails
    every `fail_every`-th request with HTTP 500; counts a prefix-cache hit per repeated conversation on
    /metrics when `metrics` is set."""

    def __init__(self, first_s=0.0, token_s=0.002, per_chunk=1, usage_every_chunk=False, fail_every=0,
                 metrics=False, models=True, models_s=0.0, seen_first_s=None, context=None):
        self.first_s, self.token_s, self.per_chunk, self.usage_every_chunk = first_s, token_s, per_chunk, usage_every_chunk
        self.seen_first_s = first_s if seen_first_s is None else seen_first_s
        self.fail_every, self.metrics = fail_every, metrics
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = self.failed = self.tokens_sent = 0
        self.seen: set[str] = set()
        self.hits = self.queries = 0
        self.app = app = FastAPI()

        @app.get("/v1/models")
        async def list_models():
            await asyncio.sleep(models_s)
            if not models:
                return JSONResponse({"error": "no"}, status_code=404)
            card = {"id": "stub-model", "object": "model", "created": 0, "owned_by": "me"}
            return {"object": "list", "data": [card if context is None else {**card, "max_model_len": context}]}

        @app.get("/metrics")
        async def prometheus():
            if not self.metrics:
                return PlainTextResponse("not here", status_code=404)
            return PlainTextResponse(
                "# HELP vl2_prefix_cache_hits_total Prompt tokens found in the cache.\n"
                "# TYPE vl2_prefix_cache_hits_total counter\n"
                f'vl2_prefix_cache_hits_total{{model="stub"}} {self.hits}\n'
                f"vl2_prefix_cache_hits_created 1.7e9\nvl2_prefix_cache_queries_total {self.queries}\n")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.bodies.append(body)
            if self.fail_every and len(self.bodies) % self.fail_every == 0:
                self.failed += 1
                return JSONResponse({"error": {"message": "stub failure", "type": "server_error"}}, status_code=500)
            key = json.dumps(body["messages"])
            self.queries += 100
            first_s = self.seen_first_s if key in self.seen else self.first_s
            self.hits += 100 if key in self.seen else 0
            self.seen.add(key)
            return StreamingResponse(self.stream(body["max_tokens"], first_s), media_type="text/event-stream")

    async def stream(self, n: int, first_s: float):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(first_s)
            sent = 0
            while sent < n:
                k = min(self.per_chunk, n - sent)
                sent += k
                usage = {"prompt_tokens": 5, "completion_tokens": sent, "total_tokens": 5 + sent} if self.usage_every_chunk else None
                yield self.event([{"index": 0, "delta": {"content": "ab" * k}, "finish_reason": None}], usage)
                if sent < n:
                    await asyncio.sleep(self.token_s)
            yield self.event([{"index": 0, "delta": {}, "finish_reason": "length"}], None)
            yield self.event([], {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n})
            yield "data: [DONE]\n\n"
            self.tokens_sent += n
        finally:
            self.in_flight -= 1

    @staticmethod
    def event(choices, usage) -> str:
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "stub-model", "choices": choices, "usage": usage}
        return f"data: {json.dumps(chunk)}\n\n"


@contextlib.contextmanager
def serving(stub: Stub):
    """The stub on 127.0.0.1 at a free port; yields its /v1 URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(stub.app, log_config=None, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


def run_cli(capsys, url, *flags, status=0) -> tuple[list[dict], str]:
    assert loadtest.main(["--url", url, "--quiet", *flags]) == status
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_counts_concurrency_and_request_contents(capsys):
    stub = Stub(token_s=0.003)
    with serving(stub) as url:
        rows, err = run_cli(capsys, url, "--concurrency", "1,6", "--requests", "12", "--min-tokens", "5",
                            "--max-tokens", "9", "--image-share", "0.5", "--seed", "3")
    assert [r["concurrency"] for r in rows] == [1, 6] and [r["max_in_flight"] for r in rows] == [1, 6]
    assert stub.max_in_flight == 6  # the server saw six streams open at once
    timed = stub.bodies[1:]  # the first is the warm-up
    assert len(stub.bodies) == 1 + 24
    for r in rows:
        assert r["requests"] == 12 and r["errors"] == 0 and r["first_error"] is None and r["model"] == "stub-model"
        assert r["output_tokens"] == r["requested_tokens"]
        assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["duration_s"], rel=1e-2)
        assert r["requests_per_s"] == pytest.approx(12 / r["duration_s"], rel=1e-2)
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
        assert r["itl_per"] == "chunk" and r["cache_hit_rate"] is None  # no per-chunk usage, no /metrics
    assert sum(r["output_tokens"] for r in rows) == sum(b["max_tokens"] for b in timed) == stub.tokens_sent - 5
    assert all(5 <= b["max_tokens"] <= 9 for b in timed) and len({b["max_tokens"] for b in timed}) > 1
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True, "continuous_usage_stats": True} and b["ignore_eos"] is True
               and b["temperature"] == 0 and b["model"] == "stub-model" for b in timed)
    parts = [b["messages"][0]["content"] for b in timed]
    texts = [p[-1]["text"] for p in parts]
    assert len(set(texts)) == 24  # every prompt unique, across levels too
    images = [p[0]["image_url"]["url"] for p in parts if p[0]["type"] == "image_url"]
    assert len(images) == 12 and len(set(images)) == 12 and [r["image_requests"] for r in rows] == [6, 6]
    for url_ in images:
        assert url_.startswith("data:image/jpeg;base64,")
        size = Image.open(io.BytesIO(base64.b64decode(url_.split(",", 1)[1]))).size
        assert all(384 <= s <= 1152 for s in size)
    assert "| 6 | 12 | 0 |" in err  # the table, on stderr


def test_latencies_follow_the_servers_delays(capsys):
    """TTFT holds the first-token delay; ITL the gap per token, per chunk when usage comes only at the
    end, spread over the chunk's tokens when every chunk carries usage."""
    with serving(Stub(first_s=0.08, token_s=0.02, per_chunk=2)) as url:
        (chunked,), _ = run_cli(capsys, url, "--concurrency", "2", "--requests", "4", "--min-tokens", "8",
                                "--max-tokens", "8", "--image-share", "0", "--warmup", "none")
    with serving(Stub(first_s=0.08, token_s=0.02, per_chunk=2, usage_every_chunk=True)) as url:
        (per_token,), _ = run_cli(capsys, url, "--concurrency", "2", "--requests", "4", "--min-tokens", "8",
                                  "--max-tokens", "8", "--image-share", "0", "--warmup", "none")
    # lower bounds are loose: on a busy machine a late chunk shortens the gap after it
    for r in (chunked, per_token):
        assert r["output_tokens"] == 32 and 80 <= r["ttft_p50_ms"] < 200
        assert 7 <= r["tpot_p50_ms"] < 15  # 3 gaps of 20 ms over 7 tokens: 8.6 ms
    assert chunked["itl_per"] == "chunk" and 15 <= chunked["itl_p50_ms"] < 40
    assert per_token["itl_per"] == "token" and 7.5 <= per_token["itl_p50_ms"] < 20
    assert per_token["itl_p50_ms"] < chunked["itl_p50_ms"]


def test_failed_requests_are_counted(capsys):
    stub = Stub(fail_every=3)
    with serving(stub) as url:
        (row,), err = run_cli(capsys, url, "--concurrency", "4", "--requests", "12", "--min-tokens", "4",
                              "--max-tokens", "4", "--image-share", "0", "--warmup", "none", "--model", "mine")
    assert row["errors"] == stub.failed == 4 and row["first_error"].startswith("HTTP 500")
    assert err.strip().splitlines()[-1] == "warning: 4 of 12 requests failed (the first: HTTP 500: stub failure)"
    assert "stub failure" in row["first_error"] and row["errors_by_kind"] == {"HTTP 500": 4}
    assert row["output_tokens"] == row["requested_tokens"] == 8 * 4 == stub.tokens_sent
    # (duration_s is rounded to the millisecond: up to 0.5 ms / duration of relative error on a short run)
    rounding = 0.0005 / row["duration_s"]
    assert row["requests"] == 12 and row["requests_per_s"] == pytest.approx(8 / row["duration_s"], rel=1e-3 + rounding)
    assert {b["model"] for b in stub.bodies} == {"mine"}


def test_a_slow_request_times_out_and_a_failed_warmup_only_warns(capsys):
    with serving(Stub(first_s=0.6)) as url:
        (row,), err = run_cli(capsys, url, "--concurrency", "2", "--requests", "2", "--min-tokens", "2",
                              "--max-tokens", "2", "--image-share", "0", "--timeout", "0.2", status=1)
    assert row["errors"] == 2 and row["first_error"] == "timed out after 0.2 s (--timeout)"
    assert row["errors_by_kind"] == {"timeout": 2}
    assert row["output_tokens"] == 0 and row["ttft_p50_ms"] is None and row["duration_s"] < 0.6  # not the stub's 0.6 s
    assert "warning: the warm-up request failed: timed out after 0.2 s (--timeout)" in err
    assert err.strip().splitlines()[-1] == "error: every request failed (the first: timed out after 0.2 s (--timeout))"


def test_a_url_without_v1_gets_a_hint(capsys):
    with serving(Stub()) as url:
        root = url.removesuffix("/v1")
        assert loadtest.main(["--url", root, "--quiet", "--requests", "1"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: GET {root}/models answered 404; the OpenAI API is under /v1: pass --url {root}/v1"]


def test_repeat_scenario_reports_the_servers_hit_rate(capsys):
    stub = Stub(metrics=True, models=False)
    with serving(stub) as url:
        rows, _ = run_cli(capsys, url, "--scenario", "repeat", "--distinct", "2", "--concurrency", "1,2",
                          "--requests", "6", "--min-tokens", "2", "--max-tokens", "2", "--warmup", "first")
    # level 1: the two conversations miss once each, then four hits; level 2: all six hit
    assert [r["cache_hit_rate"] for r in rows] == [pytest.approx(4 / 6, abs=1e-4), 1.0]
    assert {b["model"] for b in stub.bodies} == {"default"}  # no model list: the fallback name
    conversations = {json.dumps(b["messages"]) for b in stub.bodies[1:]}
    assert len(conversations) == 2
    assert sum('"image_url"' in c for c in conversations) == 1  # --image-share 0.5 of 2
    assert rows[0]["ttft_repeat_p50_ms"] is not None and rows[1]["ttft_repeat_ratio"] is not None


def test_repeat_scenario_compares_each_conversations_first_token_with_its_repeats(capsys):
    with serving(Stub(first_s=0.1, seen_first_s=0.02)) as url:
        (row,), _ = run_cli(capsys, url, "--scenario", "repeat", "--distinct", "2", "--concurrency", "1",
                            "--requests", "6", "--min-tokens", "2", "--max-tokens", "2", "--warmup", "none")
        (unique,), _ = run_cli(capsys, url, "--concurrency", "1", "--requests", "3", "--min-tokens", "2",
                               "--max-tokens", "2", "--warmup", "none")
    # (lower bounds: the stub's sleeps; upper: ordering, which a busy machine does not upset)
    assert row["ttft_first_p50_ms"] >= 100 and 20 <= row["ttft_repeat_p50_ms"] < row["ttft_first_p50_ms"]
    assert 0.2 <= row["ttft_repeat_ratio"] < 0.9
    assert unique["ttft_first_p50_ms"] is None and unique["ttft_repeat_ratio"] is None  # nothing repeats


def test_cache_counters_from_prometheus_text():
    text = ('# TYPE vllm:prefix_cache_hits_total counter\nvllm:prefix_cache_hits_total{engine="0"} 30\n'
            'vllm:prefix_cache_hits_total{engine="1"} 12.5\nvllm:prefix_cache_queries_total{engine="0"} 100\n'
            "vllm:prefix_cache_hits_created 1.7e9\n")
    assert loadtest.cache_counters(text) == (42.5, 100.0)
    assert loadtest.cache_counters(text + "vl2_prefix_cache_hits_total 1\nvl2_prefix_cache_queries_total 2\n") == (1, 2)
    assert loadtest.cache_counters("vl2_prefix_cache_hits_total 1\n") is None
    assert loadtest.metrics_url("http://h:1/v1/") == "http://h:1/metrics"
    assert loadtest.metrics_url("http://h:1/api/v1") == "http://h:1/api/metrics"
    assert loadtest.hit_rate((1, 10), (3, 10)) is None and loadtest.hit_rate(None, (1, 1)) is None


def test_unreachable_url_is_one_error_line(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"  # bound, not listening: refused
        assert loadtest.main(["--url", url, "--quiet", "--requests", "1"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"error: no server answers at {url}; start one with `python -m vl2_jax.serve --model MODEL` where --url "
        "points, or pass the --url of a running one"]


def test_more_tokens_than_the_server_s_context_is_refused_before_sending(capsys):
    stub = Stub(context=128)
    with serving(stub) as url:
        rows, err = run_cli(capsys, url, "--requests", "1", "--max-tokens", "128", status=1)
        assert stub.bodies == [] and rows == []
        assert err.strip().splitlines()[-1] == (
            "error: --max-tokens 128 leaves no room for a prompt in the server's context of 128 tokens (max_model_len); "
            "pass a smaller --max-tokens.")
        (row,), err = run_cli(capsys, url, "--concurrency", "1", "--requests", "1", "--min-tokens", "4", "--max-tokens", "4")
        assert row["errors"] == 0 and row["errors_by_kind"] == {} and "warning" not in err
        # the warm-up's prompt (the stub's usage: 5 tokens) and --max-tokens 124 are more than the context
        _, err = run_cli(capsys, url, "--concurrency", "1", "--requests", "1", "--min-tokens", "4", "--max-tokens", "124")
        assert "warning: the warm-up's prompt took 5 tokens, and with up to --max-tokens 124 new ones prompts like it " \
               "do not fit the server's context of 128 tokens (max_model_len)" in err
        assert "Pass --max-tokens 123 or less (images" in err
        _, err = run_cli(capsys, url, "--concurrency", "1,1", "--requests", "1", "--min-tokens", "124", "--max-tokens",
                         "124", "--warmup", "each")
    assert err.count("warning: the warm-up's prompt") == 1  # (said once, whatever the warm-ups)
    assert "Pass --max-tokens 123 or less (and --min-tokens 123 or less)" in err


def test_a_server_that_does_not_answer_is_not_called_absent():
    with serving(Stub(models_s=0.5)) as url:
        client = loadtest.openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        with pytest.raises(loadtest.Unreachable, match=r"accepted a connection but did not answer GET /models within 0.1 s"):
            asyncio.run(loadtest.preflight(client, url, timeout=0.1))


def test_min_tokens_defaults_to_64_or_max_tokens_where_fewer():
    assert (loadtest.parse_args([]).min_tokens, loadtest.parse_args(["--max-tokens", "16"]).min_tokens) == (64, 16)


@pytest.mark.parametrize("flags, message", [
    (["--concurrency", "1,0"], "each level must be at least 1"),
    (["--concurrency", "1,x"], "each level must be a whole number"),
    (["--requests", "0"], "must be at least 1"),
    (["--image-share", "1.5"], "must be between 0.0 and 1.0"),
    (["--min-tokens", "10", "--max-tokens", "5"], "--max-tokens (5) must be at least --min-tokens (10)"),
    (["--max-tokens", "16", "--min-tokens", "64"], "--max-tokens (16) must be at least --min-tokens (64)"),
    (["--timeout", "0"], "must be at least 0.001"),
    (["--url", "127.0.0.1:30000"], "--url must be an http:// or https:// URL"),
])
def test_bad_arguments_are_refused_by_the_parser(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        loadtest.main(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err
