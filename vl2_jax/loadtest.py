"""Load test of an OpenAI-compatible server: streaming chat completions at several concurrency levels.

    python -m vl2_jax.loadtest --url http://127.0.0.1:30000/v1 --concurrency 1,8,32,64 --requests 128
    python -m vl2_jax.loadtest --scenario repeat --distinct 4 --requests 64     # the server's prefix cache

Works with any OpenAI-compatible server (`python -m vl2_jax.serve`, SGLang, vLLM) through the official
`openai` client (`AsyncOpenAI`, `stream=True`, `stream_options={"include_usage": True,
"continuous_usage_stats": True}` (the latter vLLM's extension, which servers without it ignore), no retries).

Requests. Every request is built before its level's clock starts. Scenario `unique` (default): each
request has a prompt of its own (a serial number, then random words) and, for `--image-share` of them
(exactly round(share x requests), at seeded positions), an image of its own: smooth random colours,
width and height each drawn from 384-1152 px, sent inline as a `data:image/jpeg;base64,...` (or png)
URL in an `image_url` content part before the text. Scenario `repeat`: `--distinct` fixed
conversations (the first round(share x distinct) with an image) sent in turn at every level, so every
request after the first round can reuse the server's prefix cache. Each request asks for `max_tokens`
drawn from [--min-tokens, --max-tokens], with `temperature: 0` and the extension field `ignore_eos: true`
(SGLang's and vLLM's name), so the server should produce exactly that many tokens. The same `--seed`
sends the same requests; a server that keeps its cache between runs answers a repeated run's prompts
from it: change `--seed` for a cold run.

Warm-up: one request (text and, if --image-share > 0, an image; --min-tokens tokens) before the first
level (`--warmup first`, default), before every level (`each`) or none; it is not timed, and a failed
one is reported on stderr without stopping the run.

Metrics, one JSON line per level on stdout (the Markdown table at the end goes to stderr, so stdout is
pure JSON lines); latencies are of successful requests only:
- `duration_s`: wall time from the level's first request sent to its last one finished.
- `requests_per_s`, `output_tokens_per_s`: successful requests and their output tokens over `duration_s`.
- `output_tokens`: the sum of the final usage chunks' `completion_tokens` (a request without usage counts
  its non-empty content chunks); `requested_tokens`: the sum of those requests' `max_tokens`, equal to
  `output_tokens` when the server honours `ignore_eos`.
- `ttft_p50_ms`, `ttft_p99_ms`: time from sending the request to its first content chunk: one that carries
  text or, where the server reports usage in every chunk, new tokens (whose text may be held back, e.g. a
  partial UTF-8 character).
- `itl_p50_ms`, `itl_p99_ms`: inter-token latency, pooled over every request of the level. When the
  server reports usage in every chunk (`itl_per: "token"`), each gap between successive content chunks
  is divided by the tokens that chunk added and counted once per token (as SGLang's bench_serving does);
  otherwise (`itl_per: "chunk"`) each gap counts once, whatever the chunk holds.
- `tpot_p50_ms`: per request, (last content chunk - first content chunk, as above) / (output tokens - 1), its
  median over requests: the decode time per token whatever the server's chunking.
- `cache_hit_rate`: the change of the server's prefix-cache hit counter over the change of its query
  counter during the level, read from `GET <url without /v1>/metrics` (Prometheus text; counters whose
  names end in `prefix_cache_hits_total` and `prefix_cache_queries_total`, summed over labels, e.g.
  `vl2_prefix_cache_*` or vLLM's tokens-based `vllm:prefix_cache_*`); null when the server has none.
- `ttft_first_p50_ms`, `ttft_repeat_p50_ms`, `ttft_repeat_ratio` (scenario `repeat`; null where no
  conversation repeats within the level): the first token of each conversation's first request in the
  level (p50 over conversations), of its later requests (p50), and the median over conversations of
  (its later requests' median / its first): a prefix cache's gain where the first requests were cold,
  i.e. at the run's first level on a fresh server (the conversations are the same at every level) and
  with concurrency below `--distinct` (else a conversation's first and later requests run together).
- `errors`, `errors_by_kind`, `first_error`: failed requests (HTTP status, connection, timeout, a broken
  stream), their counts by kind (`{"HTTP 429": 5, "timeout": 1}`) and the first one's message;
  `max_in_flight`: the most requests this client had open at once; `image_requests`: how many of the
  level's requests carried an image.
The client is one Python process: past some thousands of chunks per second its own parsing starts to
show in the latencies. Exit status 1 when every request failed (or no server answers), else 0 (with a
warning on stderr where some failed). Where the warm-up request's prompt and --max-tokens together do
not fit the server's context (its `max_model_len`), a warning says so after that warm-up (so none with
`--warmup none`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import dataclasses
import io
import json
import re
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import openai
from PIL import Image
from tqdm import tqdm

from vl2_jax.errors import InputError, VL2Error, command_parser, guarded, number, number_list

WORDS = ("image picture scene colour shape light shadow edge corner texture pattern object person animal "
         "building sky water tree road window door table chair left right top bottom centre small large "
         "bright dark red green blue yellow near far").split()
QUESTIONS = ("Describe it in detail.", "What stands out?", "List what you see.", "Write a long story about it.")
IMAGE_SIDES = (384, 1152)


# -- requests -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
    """One chat completion request: the user message's content parts and the tokens to ask for."""

    content: tuple[dict, ...]
    max_tokens: int

    @property
    def has_image(self) -> bool:
        return any(part["type"] == "image_url" for part in self.content)


def image_url(rng: np.random.Generator, fmt: str = "jpeg") -> str:
    """A seeded random image (smooth colours upsampled from a few random pixels, so it encodes to a
    realistic size) of width and height each in IMAGE_SIDES, as a base64 data URL."""
    w, h = (int(s) for s in rng.integers(IMAGE_SIDES[0], IMAGE_SIDES[1] + 1, 2))
    grid = rng.integers(0, 256, (int(rng.integers(3, 12)), int(rng.integers(3, 12)), 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def conversation(rng: np.random.Generator, tag: str, with_image: bool, fmt: str) -> tuple[dict, ...]:
    """A user message's content parts: an image (when asked) and then a prompt that starts with `tag`."""
    words = " ".join(rng.choice(WORDS, int(rng.integers(12, 40))))
    text = {"type": "text", "text": f"Request {tag}: {words}. {QUESTIONS[int(rng.integers(len(QUESTIONS)))]}"}
    if not with_image:
        return (text,)
    return ({"type": "image_url", "image_url": {"url": image_url(rng, fmt)}}, text)


def with_image(n: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """Which of n requests carry an image: exactly round(share * n) of them, at seeded positions."""
    mask = np.zeros(n, bool)
    mask[: round(share * n)] = True
    return rng.permutation(mask)


def plan(args, level: int, n: int, templates: list[tuple[dict, ...]] | None = None) -> list[Job]:
    """The n requests of level `level` (1, 2, ...): unique conversations, or the `repeat` scenario's
    `templates` in turn; each with its own max_tokens. Seeded by (--seed, level)."""
    rng = np.random.default_rng([args.seed, level])
    tokens = [int(t) for t in rng.integers(args.min_tokens, args.max_tokens + 1, n)]
    if templates is not None:
        return [Job(templates[i % len(templates)], tokens[i]) for i in range(n)]
    images = with_image(n, args.image_share, rng)
    return [Job(conversation(rng, f"{args.seed}.{level}.{i}", bool(images[i]), args.image_format), tokens[i])
            for i in range(n)]


def repeat_templates(args) -> list[tuple[dict, ...]]:
    """The `repeat` scenario's fixed conversations: --distinct of them, the first round(share * distinct)
    with an image."""
    rng = np.random.default_rng([args.seed, 1 << 30])
    return [conversation(rng, f"{args.seed}.r{i}", i < round(args.image_share * args.distinct), args.image_format)
            for i in range(args.distinct)]


# -- one request --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    """What one request measured; times are `time.perf_counter()` seconds."""

    start: float
    end: float = 0.0
    error: str | None = None
    ttft: float | None = None
    first: float | None = None  # first content chunk
    last: float | None = None  # last content chunk
    chunks: int = 0  # non-empty content chunks
    usage_tokens: int | None = None  # completion_tokens of the last usage seen
    prompt_tokens: int | None = None  # prompt_tokens of the last usage seen
    per_token: bool = False  # usage came with every content chunk
    itl: list[float] = dataclasses.field(default_factory=list)
    max_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks


def describe(error: BaseException, timeout: float) -> str:
    """One line for a failed request."""
    if isinstance(error, (openai.APITimeoutError, asyncio.TimeoutError)):
        return f"timed out after {timeout:g} s (--timeout)"
    if isinstance(error, openai.APIStatusError):
        body = error.body if isinstance(error.body, dict) else {}  # (the client's `message` repeats the status)
        text = f"HTTP {error.status_code}: {body.get('message') or error.message}"
    elif isinstance(error, openai.APIConnectionError):
        text = f"connection failed: {error.__cause__ or error}"
    else:
        text = f"{type(error).__name__}: {error}"
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def error_kind(error: str) -> str:
    """A failed request's kind, from its `describe` line: "HTTP 400", "timeout", "connection", or the
    exception's name."""
    if error.startswith("timed out"):
        return "timeout"
    if error.startswith("connection failed"):
        return "connection"
    return error.split(":", 1)[0]


async def send(client: openai.AsyncOpenAI, model: str, job: Job, timeout: float) -> Result:
    """Streams one chat completion and times its content chunks; never raises (a failure, including
    taking longer than `timeout` in all, is the result's `error`)."""
    r = Result(start=time.perf_counter(), max_tokens=job.max_tokens)

    async def stream_it():
        seen = 0  # completion tokens up to the previous content chunk, while every chunk carries usage
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": list(job.content)}], max_tokens=job.max_tokens,
            temperature=0, stream=True, extra_body={"ignore_eos": True},
            # usage in every chunk, and a chunk for every step that made tokens (vLLM's extension, which
            # vl2_jax.serve has): tokens are timed even while their text is held back (a partial UTF-8
            # character, random weights' byte soup)
            stream_options={"include_usage": True, "continuous_usage_stats": True})
        async with stream:  # closes the connection on every exit, a timeout's cancellation included
            async for chunk in stream:
                now = time.perf_counter()
                usage = chunk.usage.completion_tokens if chunk.usage is not None else None
                if usage is not None:
                    r.usage_tokens, r.prompt_tokens = usage, chunk.usage.prompt_tokens
                text = "".join(c.delta.content or "" for c in chunk.choices if c.delta is not None)
                if not (text or (chunk.choices and usage is not None and usage > seen)):
                    continue
                r.chunks += 1
                if r.first is None:
                    r.first, r.ttft, r.per_token = now, now - r.start, usage is not None
                elif r.per_token and usage is not None:
                    added = max(1, usage - seen)  # the gap, spread over the tokens this chunk added
                    r.itl.extend([(now - r.last) / added] * added)
                else:
                    r.per_token = False
                    r.itl.append(now - r.last)
                r.last, seen = now, usage or 0

    try:
        await asyncio.wait_for(stream_it(), timeout)
    except Exception as e:  # noqa: BLE001 - a failed request is a measurement, not the end of the run
        r.error = describe(e, timeout)
    r.end = time.perf_counter()
    return r


# -- one level ----------------------------------------------------------------------------------------

async def run_level(client, model: str, jobs: list[Job], concurrency: int, timeout: float,
                    progress: tqdm | None = None) -> tuple[list[Result], int]:
    """Sends `jobs` with `concurrency` of them in flight (workers pulling from one queue); returns the
    results in job order and the most requests open at once."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(jobs)):
        queue.put_nowait(i)
    results: list[Result | None] = [None] * len(jobs)
    open_now, most = 0, 0

    async def worker():
        nonlocal open_now, most
        while not queue.empty():
            i = queue.get_nowait()
            open_now += 1
            most = max(most, open_now)
            results[i] = await send(client, model, jobs[i], timeout)
            open_now -= 1
            if progress is not None:
                progress.update()
                if results[i].error:
                    progress.set_postfix(errors=sum(r is not None and r.error is not None for r in results))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(jobs)))))
    return results, most


def summarize(jobs: list[Job], results: list[Result], concurrency: int, most: int, hit_rate: float | None) -> dict:
    """The level's JSON line: milliseconds and tokens per second rounded to 0.01, requests per second
    to 0.001, seconds to 0.001. Where conversations repeat (`--scenario repeat`): the first token of each
    one's first request in the level (p50 over them), of its later requests (p50), and per conversation
    its later requests' median over its first, the median of those ratios (e.g. a prefix cache's gain;
    None without repeats)."""
    ok = [r for r in results if r.error is None]
    failed = [r for r in results if r.error is not None]
    duration = max(r.end for r in results) - min(r.start for r in results)
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [x for r in ok for x in r.itl]
    tpot = [(r.last - r.first) / (r.tokens - 1) for r in ok if r.first is not None and r.tokens > 1]

    def ms(values, q):
        return None if not values else round(1e3 * float(np.percentile(values, q)), 2)

    # the `repeat` scenario: each conversation's first request in the level against its later ones
    sent: dict[int, list[float]] = {}
    for job, r in zip(jobs, results):
        if r.error is None and r.ttft is not None:
            sent.setdefault(id(job.content), []).append(r.ttft)
    repeated = [ttfts for ttfts in sent.values() if len(ttfts) > 1]
    ratios = [float(np.median(ttfts[1:])) / ttfts[0] for ttfts in repeated if ttfts[0] > 0]

    return {
        "concurrency": concurrency,
        "requests": len(results),
        "output_tokens_per_s": round(tokens / duration, 2),
        "requests_per_s": round(len(ok) / duration, 3),
        "ttft_p50_ms": ms(ttft, 50),
        "ttft_p99_ms": ms(ttft, 99),
        "itl_p50_ms": ms(itl, 50),
        "itl_p99_ms": ms(itl, 99),
        "cache_hit_rate": None if hit_rate is None else round(hit_rate, 4),
        "ttft_first_p50_ms": ms([ttfts[0] for ttfts in repeated], 50),
        "ttft_repeat_p50_ms": ms([t for ttfts in repeated for t in ttfts[1:]], 50),
        "ttft_repeat_ratio": round(float(np.median(ratios)), 4) if ratios else None,
        "errors": len(failed),
        "errors_by_kind": dict(collections.Counter(error_kind(r.error) for r in failed)),
        "duration_s": round(duration, 3),
        "output_tokens": tokens,
        "requested_tokens": sum(r.max_tokens for r in ok),
        "tpot_p50_ms": ms(tpot, 50),
        "itl_per": "token" if ok and all(r.per_token for r in ok) else "chunk",
        "image_requests": sum(job.has_image for job in jobs),
        "max_in_flight": most,
        "first_error": failed[0].error if failed else None,
    }


# -- the server's prefix-cache counters ---------------------------------------------------------------

METRIC_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)")


def cache_counters(text: str) -> tuple[float, float] | None:
    """(hits, queries) from Prometheus text: the counters whose names end in `prefix_cache_hits_total`
    and `prefix_cache_queries_total` (the `vl2_` ones first if several servers' names appear), each
    summed over its labels; None when either is missing."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line.strip())
        if m:
            try:
                sums[m.group(1)] = sums.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                continue

    def pick(suffix: str) -> float | None:
        names = sorted((n for n in sums if n.endswith(suffix)), key=lambda n: (not n.startswith("vl2_"), n))
        return sums[names[0]] if names else None

    hits, queries = pick("prefix_cache_hits_total"), pick("prefix_cache_queries_total")
    return None if hits is None or queries is None else (hits, queries)


def metrics_url(url: str) -> str:
    """`http://host:port/v1` -> `http://host:port/metrics` (a trailing /v1 is dropped, any other path kept)."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    path = path[:-3] if path.endswith("/v1") else path
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path + "/metrics", "", ""))


async def read_counters(url: str, api_key: str) -> tuple[float, float] | None:
    """The server's prefix-cache counters now, or None (no /metrics, no such counters, any failure)."""

    def get():
        request = urllib.request.Request(metrics_url(url), headers={"Authorization": f"Bearer {api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return cache_counters(response.read().decode("utf-8", "replace"))
        except (OSError, ValueError):
            return None

    return await asyncio.to_thread(get)


def hit_rate(before, after) -> float | None:
    if before is None or after is None or after[1] - before[1] <= 0:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


# -- the run ------------------------------------------------------------------------------------------

class Unreachable(VL2Error):
    """The server did not answer the first request; the message is the one line to print."""


async def preflight(client: openai.AsyncOpenAI, url: str, timeout: float = 30.0) -> tuple[str | None, int | None]:
    """Checks that a server answers at `url` (GET /models, within `timeout` seconds whatever --timeout
    says); returns the first model it serves and its context (`max_model_len`, as vLLM and vl2_jax.serve
    state it), each None where not said."""
    try:
        models = await client.with_options(timeout=timeout).models.list()
    except openai.AuthenticationError as e:
        raise Unreachable(f"the server at {url} refused the API key (HTTP {e.status_code}); pass --api-key") from e
    except openai.APIStatusError as e:
        if e.status_code == 404 and not url.rstrip("/").endswith("/v1"):
            raise Unreachable(f"GET {url.rstrip('/')}/models answered 404; the OpenAI API is under /v1: pass "
                              f"--url {url.rstrip('/')}/v1") from e
        return None, None  # a server that answers, without a model list
    except openai.APITimeoutError as e:
        raise Unreachable(f"the server at {url} accepted a connection but did not answer GET /models "
                          f"within {timeout:g} s") from e
    except openai.APIConnectionError as e:
        raise Unreachable(f"no server answers at {url}; start one with `python -m vl2_jax.serve --model MODEL` "
                          "where --url points, or pass the --url of a running one") from e
    if not models.data:
        return None, None
    context = (models.data[0].model_extra or {}).get("max_model_len")
    return models.data[0].id, context if isinstance(context, int) else None


async def run(args) -> list[dict]:
    """Every level in turn; prints each level's JSON line to stdout as soon as it is measured."""
    client = openai.AsyncOpenAI(base_url=args.url, api_key=args.api_key, timeout=args.timeout, max_retries=0)
    try:
        served, context = await preflight(client, args.url)
        if context is not None and args.max_tokens >= context:
            raise InputError(f"--max-tokens {args.max_tokens} leaves no room for a prompt in the server's context of "
                             f"{context} tokens (max_model_len); pass a smaller --max-tokens.")
        model = args.model or served or "default"
        templates = repeat_templates(args) if args.scenario == "repeat" else None
        rows, overflow_said = [], False
        for level, concurrency in enumerate(args.concurrency, start=1):
            if args.warmup == "each" or (args.warmup == "first" and level == 1):
                rng = np.random.default_rng([args.seed, 0, level])
                warm = Job(conversation(rng, f"{args.seed}.w{level}", args.image_share > 0, args.image_format), args.min_tokens)
                result = await send(client, model, warm, args.timeout)
                if result.error:
                    print(f"warning: the warm-up request failed: {result.error}", file=sys.stderr, flush=True)
                elif (not overflow_said and context is not None and result.prompt_tokens
                      and result.prompt_tokens + args.max_tokens > context):
                    room = max(context - result.prompt_tokens, 1)
                    also = f" (and --min-tokens {room} or less)" if args.min_tokens > room else ""
                    print(f"warning: the warm-up's prompt took {result.prompt_tokens} tokens, and with up to "
                          f"--max-tokens {args.max_tokens} new ones prompts like it do not fit the server's context "
                          f"of {context} tokens (max_model_len): such requests will fail (HTTP 400). Pass "
                          f"--max-tokens {room} or less{also} (images take more tokens the larger they are), or "
                          f"serve a longer context.", file=sys.stderr, flush=True)
                    overflow_said = True
            jobs = plan(args, level, args.requests, templates)
            before = await read_counters(args.url, args.api_key)
            with tqdm(total=len(jobs), desc=f"concurrency {concurrency}", unit="req", file=sys.stderr,
                      disable=True if args.quiet else None, leave=False) as bar:  # (None: off where stderr is no terminal)
                results, most = await run_level(client, model, jobs, concurrency, args.timeout, bar)
            after = await read_counters(args.url, args.api_key)
            row = {"model": model, "scenario": args.scenario,
                   **summarize(jobs, results, concurrency, most, hit_rate(before, after))}
            rows.append(row)
            print(json.dumps(row), flush=True)
        return rows
    finally:
        await client.close()


def table(rows: list[dict]) -> str:
    """The JSON lines as a Markdown table."""

    def f(v, digits=1):
        return "-" if v is None else f"{v:.{digits}f}"

    lines = ["| concurrency | requests | errors | output tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
             "| TPOT p50 ms | cache hits | duration s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hits = "-" if r["cache_hit_rate"] is None else f"{100 * r['cache_hit_rate']:.0f}%"
        if r["ttft_repeat_ratio"] is not None:  # (repeats' first token against each conversation's first)
            hits += f", TTFT x{r['ttft_repeat_ratio']:.2f}"
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {f(r['output_tokens_per_s'])} "
                     f"| {f(r['requests_per_s'], 2)} | {f(r['ttft_p50_ms'])} / {f(r['ttft_p99_ms'])} "
                     f"| {f(r['itl_p50_ms'], 2)} / {f(r['itl_p99_ms'], 2)} ({r['itl_per']}) | {f(r['tpot_p50_ms'], 2)} "
                     f"| {hits} | {f(r['duration_s'])} |")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------------

def _levels(text: str) -> list[int]:
    """An argparse type: comma-separated concurrency levels, each a whole number of at least 1."""
    levels = number_list(int, 1, "level")(text)
    if not levels:
        raise argparse.ArgumentTypeError("needs at least one level, e.g. 1,8,32")
    return levels


def parser() -> argparse.ArgumentParser:
    p = command_parser("python -m vl2_jax.loadtest", __doc__)
    p.add_argument("--url", default="http://127.0.0.1:30000/v1", help="the server's OpenAI base URL (default: %(default)s)")
    p.add_argument("--concurrency", type=_levels, default=[1, 8, 32, 64],
                   help="requests in flight, one level per comma-separated value (default: 1,8,32,64)")
    p.add_argument("--requests", type=number(int, 1), default=128, help="requests per level (default: %(default)s)")
    p.add_argument("--model", default=None, help="model name to send (default: the first of GET /models, else 'default')")
    p.add_argument("--api-key", default="none", help="sent as the bearer token (default: %(default)s)")
    p.add_argument("--scenario", choices=["unique", "repeat"], default="unique",
                   help="unique: every prompt and image new; repeat: --distinct conversations in turn (default: unique)")
    p.add_argument("--distinct", type=number(int, 1), default=4, help="conversations of the repeat scenario (default: 4)")
    p.add_argument("--image-share", type=number(float, 0.0, 1.0, "a number"), default=0.5,
                   help="fraction of requests with an image, 0 to 1 (default: 0.5)")
    p.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg", help="how images are encoded (default: jpeg)")
    p.add_argument("--min-tokens", type=number(int, 1), default=None,
                   help="fewest new tokens asked for (default: 64, or --max-tokens where that is fewer)")
    p.add_argument("--max-tokens", type=number(int, 1), default=256, help="most new tokens asked for (default: 256)")
    p.add_argument("--seed", type=number(int, 0), default=0, help="seeds prompts, images and token counts (default: 0)")
    p.add_argument("--timeout", type=number(float, 0.001, what="a number of seconds"), default=600.0,
                   help="seconds a request may take, and may wait between chunks (default: 600)")
    p.add_argument("--warmup", choices=["first", "each", "none"], default="first",
                   help="one untimed request before the first level, before each, or none (default: first)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (there are none where stderr is not a terminal)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.min_tokens is None:
        args.min_tokens = min(64, args.max_tokens)
    if args.max_tokens < args.min_tokens:
        p.error(f"--max-tokens ({args.max_tokens}) must be at least --min-tokens ({args.min_tokens})")
    if urllib.parse.urlsplit(args.url).scheme not in ("http", "https") or not urllib.parse.urlsplit(args.url).netloc:
        p.error(f"--url must be an http:// or https:// URL such as http://127.0.0.1:30000/v1 (got {args.url!r})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    def body() -> int:
        rows = asyncio.run(run(args))
        print(table(rows), file=sys.stderr, flush=True)
        if rows and all(r["errors"] == r["requests"] for r in rows):
            print(f"error: every request failed (the first: {rows[0]['first_error']})", file=sys.stderr, flush=True)
            return 1
        failed = [r for r in rows if r["errors"]]
        if failed:
            print(f"warning: {sum(r['errors'] for r in failed)} of {sum(r['requests'] for r in rows)} requests "
                  f"failed (the first: {failed[0]['first_error']})", file=sys.stderr, flush=True)
        return 0

    return guarded(body, lambda line: print(line, file=sys.stderr, flush=True))


if __name__ == "__main__":
    sys.exit(main())
