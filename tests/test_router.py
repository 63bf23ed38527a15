"""Two `python -m vl2_jax.serve` instances behind SGLang's router (`sglang-router`, a Rust load balancer):
the unmodified openai client and SGLang's /generate, through the router, get the answer each instance
gives directly (greedy; both instances load the same random weights, seed 0), every request succeeds,
and both instances serve some of them. The router registers a worker through its /health,
/server_info and /model_info, and reads /get_load for its load report."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import selectors
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import free_ports

ROOT = Path(__file__).resolve().parents[1]
MODEL = "random:test"
SERVE = ["--model", MODEL, "--port", "0", "--no-warmup", "--max-batch", "4", "--max-seq-len", "256",
         "--compile-cache", ""]


def _why_the_router_cannot_run() -> str | None:
    """Why the router cannot run here (its package or its compiled binary is missing or does not load)."""
    try:
        import sglang_router.sglang_router_rs  # noqa: F401
    except (ImportError, OSError) as e:
        return f"sglang-router cannot run on this machine ({type(e).__name__}: {e}); pip install sglang-router"
    return None


WHY_NOT = _why_the_router_cannot_run()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


def _png_data_url(seed=0, size=(70, 50)) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE = _png_data_url()
TEXT = "What is in it? " + "Look closely. " * 9  # with the image, over one prefix-cache block
CHATS = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": TEXT}]}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Count."}],
]
GENERATE = {"text": "<|User|>: <image>\nWhat is it?\n\n<|Assistant|>:", "image_data": IMAGE,
            "sampling_params": {"max_new_tokens": 24, "temperature": 0}}


def _first_line(proc: subprocess.Popen, seconds: float) -> str:
    """The first line of proc's stdout, or '' if none comes within `seconds` or the process ends."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(seconds):
            return ""
    return proc.stdout.readline().strip()


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    """The URLs of two servers, each on a free port, loading at once."""
    logs = tmp_path_factory.mktemp("router-logs")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # (one CPU device)
    procs = []
    try:
        for i in range(2):
            with open(logs / f"serve{i}.log", "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "vl2_jax.serve", *SERVE], stdout=subprocess.PIPE,
                                              stderr=log, text=True, env=env, cwd=ROOT))
        urls = [_first_line(proc, 120) for proc in procs]
        for i, url in enumerate(urls):
            assert url.startswith("http://127.0.0.1:"), (logs / f"serve{i}.log").read_text()[-2000:]
        yield urls
    finally:
        _stop(procs)


@contextlib.contextmanager
def router(workers: list[str], policy: str, logs: Path):
    """`python -m sglang_router.launch_router` in front of `workers` -> its URL, once it has registered
    every worker as healthy."""
    port, metrics_port = free_ports(2)
    log = logs / f"router-{policy}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *workers, "--policy", policy,
             "--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1",
             "--prometheus-port", str(metrics_port), "--log-level", "warn"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            with contextlib.suppress(httpx2.HTTPError, ValueError):
                listed = httpx2.get(url + "/workers", timeout=2).json()["workers"]
                if sorted(w["url"] for w in listed if w["is_healthy"]) == sorted(workers):
                    break
            assert time.monotonic() < deadline, "the router did not register both workers:\n" + log.read_text()[-2000:]
            time.sleep(0.2)
        yield url
    finally:
        _stop([proc])


def served(url: str) -> dict[str, int]:
    """Answered requests (HTTP 200) by route, from an instance's /metrics."""
    text = httpx2.get(url + "/metrics").text
    pairs = re.findall(r'^vl2_requests_total\{route="([^"]+)",status="200"\} (\S+)$', text, re.M)
    return {route: int(float(n)) for route, n in pairs}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def chat(url: str, messages: list[dict], **kwargs) -> openai.types.chat.ChatCompletion:
    return client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0, **kwargs)


def answer(out) -> tuple[str, int]:
    """A chat answer's text and its prompt's length (the random model answers many prompts alike; the
    length shows that the prompt, its image included, arrived whole)."""
    return out.choices[0].message.content, out.usage.prompt_tokens


def generate(url: str) -> dict:
    r = httpx2.post(url + "/generate", json=GENERATE, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def direct(instances):
    """Each instance's own answers to CHATS and GENERATE, which must agree."""
    def ask(url):
        return [answer(chat(url, m)) for m in CHATS], generate(url)["output_ids"]

    with ThreadPoolExecutor(2) as pool:  # (each compiles its programs on first use: both at once)
        (answers, ids), other = pool.map(ask, instances)
    assert (answers, ids) == other, "the two instances do not load the same weights"
    return answers, ids


def test_cache_aware_router_serves_every_request_with_each_instance_s_answer(instances, direct, tmp_path):
    answers, ids = direct
    before = [served(url) for url in instances]
    with router(instances, "cache_aware", tmp_path) as url:
        # At once: the router sends a request to the worker with the fewest requests in flight when no
        # worker holds a long enough prefix of it, so a burst spreads over both instances.
        with ThreadPoolExecutor(2 * len(CHATS)) as pool:
            outs = list(pool.map(lambda m: chat(url, m), CHATS + CHATS))
        assert [answer(o) for o in outs] == answers + answers
        streamed = "".join(c.choices[0].delta.content or "" for c in chat(url, CHATS[2], stream=True) if c.choices)
        assert streamed == answers[2][0]
        assert generate(url)["output_ids"] == ids
        # The same question again goes where its prefix went, and that instance's prefix cache serves it.
        again = chat(url, CHATS[2])
        assert answer(again) == answers[2] and again.usage.prompt_tokens_details.cached_tokens > 0
        loads = httpx2.get(url + "/get_loads").json()["workers"]  # each instance's /get_load, as the router reads it
        assert sorted(w["worker"] for w in loads) == sorted(instances) and all(w["load"] == 0 for w in loads), loads
    after = [served(u) for u in instances]
    new = [{route: a.get(route, 0) - b.get(route, 0) for route in ("/v1/chat/completions", "/generate")}
           for a, b in zip(after, before)]
    assert sum(n["/v1/chat/completions"] for n in new) == 2 * len(CHATS) + 2 and sum(n["/generate"] for n in new) == 1
    assert all(n["/v1/chat/completions"] > 0 for n in new), f"one instance served every request: {new}"


def test_round_robin_router_alternates(instances, direct, tmp_path):
    answers, _ = direct
    before = [served(url)["/v1/chat/completions"] for url in instances]
    with router(instances, "round_robin", tmp_path) as url:
        assert [answer(chat(url, m)) for m in CHATS] == answers
    after = [served(url)["/v1/chat/completions"] for url in instances]
    assert [a - b for a, b in zip(after, before)] == [len(CHATS) // 2] * 2
