"""The HTTP layer: OpenAI- and SGLang-compatible routes over a `Scheduler`, with no model logic.

    app = create_app(scheduler, "deepseek-vl2-tiny", model.processor, ServerSettings(api_key="..."))

Routes:
    GET|HEAD /health              200 while the scheduler runs, 503 when it is down or draining
    GET  /health_generate         200 when the busy scheduler finishes a step, or when idle a one-token
                                  generation completes, within `health_timeout_s`
    GET  /v1/models, /v1/models/{id}
    POST /v1/chat/completions     OpenAI chat: text and image_url parts, streaming (SSE), usage
    POST /v1/completions          OpenAI completions: a raw prompt (text or token ids)
    POST|PUT /generate            SGLang: text with <image> placeholders + image_data, or input_ids
    GET  /get_model_info, /get_server_info (and /model_info, /server_info, as SGLang's router asks)
    GET  /get_load                SGLang's load report, one entry per data-parallel rank (here one):
                                  [{"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}]
    GET|POST /flush_cache
    GET|POST /start_profile, /stop_profile   SGLang's: a device trace of the window between them, where
                                  the server has a profile directory (`profiling.Profiler`; else 400)
    GET  /metrics                 Prometheus text format (`metrics.Metrics`)

A request's path: the body is read within `max_body_bytes` (413), parsed (`protocol`; 400 names the
field), and the host work (image references -> images with `images.load_image` within
`image_limits`, the processor, the engine's size check) runs on worker threads, off the event loop;
then the job goes to the scheduler (429 with Retry-After when its queue is full). Streams are SSE
`data: {...}` lines ending with `data: [DONE]`; an error after the stream began ends it with a `data:
{"error": {...}}` line. A client that goes away cancels its job at once (a stream's task is cancelled by
the server; a plain request watches for the disconnect while it waits).

Authentication: with `api_key` set, every route but /health, /health_generate and /metrics needs
`Authorization: Bearer <key>` (401 otherwise), as SGLang's server does: load balancers and Prometheus
probe those without the key, and they reveal no prompts.

Errors are OpenAI's JSON shape (`protocol.APIError`) on every route, unknown routes (404) included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.metadata
import json
import re
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from vl2_jax.engine import Request as EngineRequest
from vl2_jax.engine import check_token_ids
from vl2_jax.errors import InputError
from vl2_jax.generation import Job, sign
from vl2_jax.images import ImageLimits, load_image
from vl2_jax.sampling import RowSampling
from vl2_jax.serving.metrics import Metrics
from vl2_jax.serving.profiling import Profiler
from vl2_jax.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    Sampling,
    bad_request,
    parse,
)
from vl2_jax.serving.scheduler import Event, Handle, QueueFull

OPEN_ROUTES = frozenset({"/health", "/health_generate", "/metrics"})
ROUTES = frozenset({*OPEN_ROUTES, "/v1/models", "/v1/chat/completions", "/v1/completions", "/generate",
                    "/get_model_info", "/get_server_info", "/model_info", "/server_info", "/get_load",
                    "/flush_cache", "/start_profile", "/stop_profile"})
DONE = b"data: [DONE]\n\n"
ROUTER_NO_MODEL = "unknown"  # `model` as SGLang's router fills it in where a request left it out
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OUTCOME = "vl2.outcome"  # the request scope's key for a stream's outcome, an HTTP status (`_Server.stream`)


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What the HTTP layer allows. api_key: None = no authentication. max_images: per request.
    image_limits: what an image reference may be (`images.ImageLimits`; by default no fetching and no
    local files: data URLs and base64 only). default_max_tokens: an answer's limit when the request sets
    none (None: the route's default: 16 on /v1/completions, 128 on /generate, else until the slot is
    full). host_threads: requests whose images and prompt are processed at once. retry_after_s: the
    Retry-After of a 429. request_timeout_s: how long a request may take from its arrival to its
    answer's end (None: no limit); one that runs longer is cancelled and answered with a 504
    (mid-stream: an error event). profile_dir: where /start_profile and /stop_profile write device
    traces (None: those routes answer 400). model_path: the model as loaded (a folder, a hub id), for
    /get_model_info and /get_server_info's model_path and tokenizer_path (None: the served name)."""

    api_key: str | None = None
    max_body_bytes: int = 64 << 20
    max_images: int = 8
    image_limits: ImageLimits = dataclasses.field(default_factory=lambda: ImageLimits(allow_fetch=False))
    default_max_tokens: int | None = None
    health_timeout_s: float = 20.0
    host_threads: int = 4
    retry_after_s: int = 1
    request_timeout_s: float | None = 600.0
    profile_dir: str | None = None
    model_path: str | None = None


def create_app(scheduler, model_name: str, processor, settings: ServerSettings | None = None,
               metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app over a started `Scheduler` (its `model` gives the engine's limits and the EOS id;
    `processor` turns conversations into ids). `metrics`: the one the scheduler reports to
    (`Metrics.scheduler_hooks()`), else a new one with the API's metrics alone. The caller starts and
    stops the scheduler; during a shutdown, `app.state.server.stop_reading()` (on the event loop) refuses new
    work with 503, and so answers requests whose bodies are still arriving."""
    server = _Server(scheduler, model_name, processor, settings or ServerSettings(), metrics or Metrics())
    app = FastAPI(title="vl2-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_Gate, server=server)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        detail = f"no route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        allowed = next((v for k, v in (e.headers or {}).items() if k.lower() == "allow"), None)
        if e.status_code == 405 and allowed:
            detail = f"{request.url.path} takes {' or '.join(allowed.split(', '))}, not {request.method}"
        return _error_response(APIError(e.status_code, detail, kind, headers={"Allow": allowed} if allowed else None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return _error_response(bad_request(str(e)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    @app.api_route("/health", methods=["GET", "HEAD"])  # (HEAD: load balancers probe with it)
    async def health():
        if server.draining or not server.scheduler.stats().get("alive", True):
            raise APIError(503, "the server is not serving (starting, stopping or its scheduler is down).",
                           "service_unavailable")
        return {"status": "ok"}

    @app.get("/health_generate")
    async def health_generate():
        return await server.health_generate()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        server.check_model(model)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await server.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.completions(request)

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        return await server.generate(request)

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def model_info():
        return server.model_info()

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info():
        return server.server_info()

    @app.get("/get_load")
    async def get_load():
        return [server.load()]

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        await anyio.to_thread.run_sync(server.scheduler.flush_cache)
        if getattr(processor, "tile_cache", None) is not None:  # (vl2_jax's processor; a caller's may have none)
            processor.tile_cache.clear()
        return PlainTextResponse("Cache flushed.\n")

    @app.api_route("/start_profile", methods=["GET", "POST"])
    async def start_profile(request: Request):
        return await server.profile(request, start=True)

    @app.api_route("/stop_profile", methods=["GET", "POST"])
    async def stop_profile(request: Request):
        return await server.profile(request, start=False)

    @app.get("/metrics")
    async def metrics_text():
        body, content_type = server.metrics.exposition()
        return Response(body, media_type=content_type)

    return app


# -- responses ---------------------------------------------------------------------------------------------
def _stopping() -> APIError:
    return APIError(503, "the server is shutting down; send the request elsewhere.", "service_unavailable")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # (JSON's escape of a UTF-16 surrogate, paired or not)


def _holds_lone_surrogate(data) -> bool:
    """Whether a decoded JSON value holds a string with an unpaired surrogate (valid JSON, but no text
    that UTF-8 can carry: the tokenizer and every response would fail on it). Walked without recursion."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _usage(event: Event) -> dict:
    p, c = event.prompt_tokens, event.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": event.cached_tokens}}


def _failure(event: Event) -> APIError | None:
    """The error an answer's last event means, if it ended otherwise than by "stop" or "length"."""
    if event.finish_reason == "error":
        return APIError(500, f"the generation failed: {event.error}", "server_error")
    if event.finish_reason == "abort":
        return APIError(503, "the request was cancelled: the server is shutting down.", "service_unavailable")
    if event.finish_reason == "timeout":
        return APIError(504, f"the request was cancelled: {event.error}", "timeout")
    return None


class _Gate:
    """ASGI middleware: the bearer key (all routes but OPEN_ROUTES) and the request counts by route and
    HTTP status (499: the client left before an answer began; 500: an error raised before it began; a
    stream counts under its outcome, `_Server.stream`)."""

    def __init__(self, app, server: _Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "/v1/models" if path.startswith("/v1/models/") else "other"
        status = {"code": 499}

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            key = self.server.settings.api_key
            if key and path not in OPEN_ROUTES and not _authorized(scope, key):
                error = APIError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'.",
                                 "authentication_error", code="invalid_api_key")
                return await _error_response(error)(scope, receive, tracked_send)
            await self.app(scope, receive, tracked_send)
        except Exception:  # (answered 500 by the outermost error handler, after this middleware)
            if status["code"] == 499:
                status["code"] = 500
            raise
        finally:
            self.server.metrics.answered(route, scope.get(OUTCOME, status["code"]))


def _authorized(scope, key: str) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body must have been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- the server ----------------------------------------------------------------------------------------
class _Server:
    def __init__(self, scheduler, model_name: str, processor, settings: ServerSettings, metrics: Metrics):
        self.scheduler, self.name, self.processor = scheduler, model_name, processor
        self.model_path = settings.model_path or model_name  # (SGLang's model_path and tokenizer_path)
        self.settings, self.metrics = settings, metrics
        model = scheduler.model
        self.engine, self.cfg = model.engine, model.cfg
        # the weights as SGLang names them: "quantization" None for float ones
        self.weights = {"dtype": np.dtype(model.dtype).name, "quantization": None if model.quant == "none" else model.quant}
        self.side, self.eos = model.cfg.tokens_per_tile_side, model.cfg.language.eos_token_id
        self.created = int(time.time())
        self.draining = False
        self._reading: set[anyio.CancelScope] = set()  # the bodies being received (`stop_reading` ends them)
        self._limiter: anyio.CapacityLimiter | None = None
        self._tokens: dict[int, int] = {}  # id(handle) -> tokens an answer in progress holds (prompt + answer)
        self.profiler = None if settings.profile_dir is None else Profiler(settings.profile_dir)

    # -- input ---------------------------------------------------------------------------------------
    async def read_json(self, request: Request, empty=None):
        """The request's JSON body (`empty`, where given, for a body of no bytes)."""
        limit = self.settings.max_body_bytes
        too_big = APIError(413, f"the request body is over {limit:,} bytes; send smaller or fewer images.",
                           "invalid_request_error", code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        with anyio.CancelScope() as reading:
            self._reading.add(reading)
            try:
                if self.draining:
                    reading.cancel()
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_big
                    chunks.append(chunk)
            except ClientDisconnect:
                raise APIError(499, "the client disconnected while sending the request.") from None
            finally:
                self._reading.discard(reading)
        if reading.cancelled_caught:
            raise _stopping()
        body = b"".join(chunks)
        if not body and empty is not None:
            return empty
        try:  # (UTF-8 alone, strictly: json.loads would take UTF-16/32 and raw surrogate bytes)
            data = json.loads(body.decode("utf-8"))
        except RecursionError:
            raise bad_request("the request body nests arrays or objects too deeply to be read.") from None
        except (ValueError, UnicodeDecodeError) as e:
            if "integer string conversion" in str(e):  # (Python's guard against quadratic int parsing)
                raise bad_request(f"the request body holds an integer of more than {sys.get_int_max_str_digits()} "
                                  f"digits; no field takes one.") from None
            raise bad_request(f"the request body is not valid JSON ({e}).") from None
        if _SURROGATE_ESCAPE.search(body) and _holds_lone_surrogate(data):
            raise bad_request("the request body holds a lone UTF-16 surrogate (an escape from \\ud800 to \\udfff "
                              "without its pair): its text is not valid Unicode.")
        return data

    def stop_reading(self) -> None:
        """A shutdown: refuses new work, and a request whose body is still arriving gets its 503 now rather
        than holding the shutdown until the client has sent it (call on the event loop)."""
        self.draining = True
        for reading in self._reading:
            reading.cancel()

    def check_model(self, model: str | None) -> None:
        """Refuses a request for another model (404). SGLang's router sends "unknown" for a request that
        named none, which counts as none."""
        if model not in (None, ROUTER_NO_MODEL, self.name):
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.name!r}.",
                           "invalid_request_error", "model", "model_not_found")

    async def host(self, fn: Callable, *args):
        """`fn(*args)` on a worker thread (images, the processor: CPU work off the event loop); an
        `InputError` becomes a 400."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.settings.host_threads)
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except InputError as e:
            raise bad_request(str(e)) from None

    def images(self, refs: list[str]) -> list:
        if len(refs) > self.settings.max_images:
            raise InputError(f"the request has {len(refs)} images; at most {self.settings.max_images} are allowed.")
        return [load_image(ref, self.settings.image_limits) for ref in refs]

    def conversation_job(self, conversation: list[dict], refs: list[str], sampling: Sampling) -> Job:
        return self.job(EngineRequest.from_output(self.processor(conversation, self.images(refs)), self.side), sampling)

    def prompt_job(self, prompt: str | list[int], refs: list[str], sampling: Sampling) -> Job:
        if isinstance(prompt, str):
            return self.job(EngineRequest.from_output(self.processor.raw(prompt, self.images(refs)), self.side), sampling)
        check_token_ids(prompt, self.cfg.language.vocab_size)  # (before int32 could wrap one)
        ids = np.asarray(prompt, np.int32)
        return self.job(EngineRequest(ids, np.zeros(ids.shape, np.int32), np.zeros(ids.shape, bool), None), sampling)

    def job(self, request: EngineRequest, sampling: Sampling) -> Job:
        self.engine.check(request)
        room = self.engine.max_seq_len - len(request.ids)
        asked = sampling.max_tokens is not None and not sampling.max_tokens_default
        if asked and sampling.max_tokens > room:  # (a 400, as OpenAI, vLLM and SGLang answer it)
            unlimited = (f", or {sampling.no_limit} (the answer then ends where the context does)"
                         if sampling.no_limit and not self.settings.default_max_tokens else "")
            raise bad_request(f"the model's context here is {self.engine.max_seq_len} tokens: {len(request.ids)} in "
                              f"the prompt and {sampling.max_tokens} new ones asked for are more; ask for at most "
                              f"{room}{unlimited}.", sampling.max_tokens_param)
        limit = (sampling.max_tokens if asked else self.settings.default_max_tokens or sampling.max_tokens) or room
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(32)
        row = RowSampling.make(sampling.temperature, sampling.top_k, sampling.top_p, sampling.repetition_penalty, seed)
        job = Job(request, max(1, min(limit, room)), row, sampling.stop, -1 if sampling.ignore_eos else self.eos)
        if self.engine.runtime.prefix_cache:
            sign(job, self.side)  # (hashing the tiles here, on a host thread, not on the device's)
        return job

    def submit(self, job: Job, measured: bool = True) -> Handle:
        if self.draining:
            raise _stopping()
        try:
            return self.scheduler.submit(job, measured)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later.", "rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None

    # -- output --------------------------------------------------------------------------------------
    async def events(self, handle: Handle, t0: float) -> AsyncIterator[Event]:
        """The job's events, observed for the metrics; the job is cancelled if the consumer stops early
        (a client that went away cancels the task that iterates)."""
        first, finished = True, False
        key = id(handle)
        self._tokens[key] = len(handle.job.request.ids)
        try:
            async for event in self._until(handle, t0):
                self._tokens[key] = event.prompt_tokens + event.completion_tokens
                if first and event.token_ids and handle.measured:
                    self.metrics.first_token(time.perf_counter() - t0, event.prompt_tokens)
                    first = False
                if event.finish_reason == "timeout":  # cancelled now: a consumer that stops at this event
                    handle.cancel()                    # closes this generator only later
                    finished = True
                elif event.finish_reason is not None:
                    finished = True
                    if handle.measured:
                        self.metrics.finished(time.perf_counter() - t0)
                yield event
        finally:
            self._tokens.pop(key, None)
            if not finished:
                handle.cancel()

    async def _until(self, handle: Handle, t0: float) -> AsyncIterator[Event]:
        """The job's events up to `request_timeout_s` after `t0`; then a last event "timeout" (the
        caller's `events` cancels the job)."""
        limit = self.settings.request_timeout_s
        events = handle.events()
        tokens = [len(handle.job.request.ids), 0]
        while True:
            left = None if limit is None else t0 + limit - time.perf_counter()
            try:
                event = await asyncio.wait_for(anext(events), left)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                yield Event("", [], "timeout", *tokens, error=f"it ran longer than the server's limit of {limit:g} s "
                            "(--request-timeout); ask for fewer tokens or raise the limit.")
                return
            tokens = [event.prompt_tokens, event.completion_tokens]
            yield event

    async def collect(self, handle: Handle, t0: float, request: Request) -> tuple[str, list[int], Event]:
        """(text, token ids, last event) of a whole answer; cancels the job if the client leaves first."""

        async def gather():
            text, ids, last = [], [], None
            async for event in self.events(handle, t0):
                text.append(event.text)
                ids += event.token_ids
                last = event
            return "".join(text), ids, last

        answer, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()
                handle.cancel()
        if not answer.done() or answer.cancelled():
            raise APIError(499, "the client disconnected.")
        text, ids, last = answer.result()
        error = _failure(last)
        if error:
            raise error
        return text, ids, last

    def stream(self, request: Request, chunks: AsyncIterator[bytes]) -> StreamingResponse:
        """An SSE response of `chunks`; the request's count (`_Gate`) takes the stream's outcome: the
        status of an error event it ended with (`stream_error`), 499 where the client left before its
        end, else 200."""
        async def watched():
            ended = False
            try:
                async for piece in chunks:
                    yield piece
                ended = True
            finally:
                if not ended:
                    request.scope.setdefault(OUTCOME, 499)

        return StreamingResponse(watched(), media_type="text/event-stream", headers=SSE_HEADERS)

    @staticmethod
    def stream_error(request: Request, error: APIError) -> bytes:
        """The error event that ends a stream; the request counts under its status."""
        request.scope[OUTCOME] = error.status
        return _sse(error.body())

    # -- OpenAI --------------------------------------------------------------------------------------
    async def chat(self, request: Request):
        t0 = time.perf_counter()
        body = parse(ChatCompletionRequest, await self.read_json(request))
        self.check_model(body.model)
        sampling = body.sampling()
        conversation, refs = body.conversation()
        handle = self.submit(await self.host(self.conversation_job, conversation, refs, sampling))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": self.name}
        if not body.stream:
            text, _, last = await self.collect(handle, t0, request)
            return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "logprobs": None, "finish_reason": last.finish_reason}],
                    "usage": _usage(last)}
        head["object"] = "chat.completion.chunk"
        usage, continuous = body.include_usage, body.continuous_usage

        def chunk(delta: dict, finish: str | None = None, event: Event | None = None) -> bytes:
            out = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return _sse({**out, "usage": _usage(event) if continuous and event else None} if usage or continuous else out)

        async def chunks():
            yield chunk({"role": "assistant", "content": ""})
            async for event in self.events(handle, t0):
                if (error := _failure(event)) is not None:
                    yield self.stream_error(request, error)
                    break
                if event.text or (continuous and event.token_ids):
                    yield chunk({"content": event.text}, event=event)
                if event.finish_reason is not None:
                    yield chunk({}, event.finish_reason, event)
                    if usage:
                        yield _sse({**head, "choices": [], "usage": _usage(event)})
            yield DONE

        return self.stream(request, chunks())

    async def completions(self, request: Request):
        t0 = time.perf_counter()
        body = parse(CompletionRequest, await self.read_json(request))
        self.check_model(body.model)
        sampling = body.sampling()
        handle = self.submit(await self.host(self.prompt_job, body.single_prompt(), [], sampling))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        if not body.stream:
            text, _, last = await self.collect(handle, t0, request)
            return {**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                         "finish_reason": last.finish_reason}], "usage": _usage(last)}
        usage, continuous = body.include_usage, body.continuous_usage

        def chunk(text: str, finish: str | None = None, event: Event | None = None) -> bytes:
            out = {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            return _sse({**out, "usage": _usage(event) if continuous and event else None} if usage or continuous else out)

        async def chunks():
            async for event in self.events(handle, t0):
                if (error := _failure(event)) is not None:
                    yield self.stream_error(request, error)
                    break
                if event.text or event.finish_reason is not None or (continuous and event.token_ids):
                    yield chunk(event.text, event.finish_reason, event)
                if event.finish_reason is not None and usage:
                    yield _sse({**head, "choices": [], "usage": _usage(event)})
            yield DONE

        return self.stream(request, chunks())

    # -- SGLang --------------------------------------------------------------------------------------
    async def generate(self, request: Request):
        t0 = time.perf_counter()
        body = parse(GenerateRequest, await self.read_json(request))
        sampling = body.sampling()
        prompt, refs = body.single_prompt()
        handle = self.submit(await self.host(self.prompt_job, prompt, refs, sampling))
        rid = body.request_id or uuid.uuid4().hex

        def meta(event: Event, ids: list[int]) -> dict:
            reason = event.finish_reason
            finish = None if reason is None else (
                {"type": "stop", "matched": event.matched if event.matched is not None else
                 ids[-1] if ids and ids[-1] == self.eos else None} if reason == "stop" else
                {"type": "length", "length": event.completion_tokens} if reason == "length" else
                {"type": "abort", "message": event.error or "cancelled"})
            out = {"id": rid, "finish_reason": finish, "prompt_tokens": event.prompt_tokens,
                   "completion_tokens": event.completion_tokens, "cached_tokens": event.cached_tokens}
            return {**out, "e2e_latency": time.perf_counter() - t0} if reason is not None else out

        if not body.stream:
            text, ids, last = await self.collect(handle, t0, request)
            out = {"text": text, "output_ids": ids, "meta_info": meta(last, ids)}
            return [out] if body.batched else out

        async def chunks():
            text, ids = "", []
            async for event in self.events(handle, t0):
                if (error := _failure(event)) is not None:
                    yield self.stream_error(request, error)
                    break
                text, ids = text + event.text, ids + event.token_ids
                if event.text or event.token_ids or event.finish_reason is not None:
                    out = {"text": text, "output_ids": ids, "meta_info": meta(event, ids)}
                    yield _sse({**out, "index": 0} if body.batched else out)  # (SGLang numbers a batch's pieces)
            yield DONE

        return self.stream(request, chunks())

    # -- the rest ------------------------------------------------------------------------------------
    async def health_generate(self):
        """200 once the server shows it can generate: where requests run or wait, once the scheduler
        finishes a step (as SGLang's check, which does not queue behind them); where it is idle, once a
        one-token generation finishes. 503 otherwise, or after `health_timeout_s`."""
        stats = self.scheduler.stats()
        if not stats["alive"]:
            raise APIError(503, "the scheduler is not running.", "service_unavailable")
        if stats["queued"] or stats["running"]:
            since = time.monotonic()
            while time.monotonic() - since < self.settings.health_timeout_s:
                if self.scheduler.stepped_at > since:
                    return {"status": "ok"}
                await asyncio.sleep(0.01)
            raise APIError(503, f"requests are in flight, but no scheduler step finished within "
                                f"{self.settings.health_timeout_s} s.", "service_unavailable")
        job = Job(EngineRequest(np.asarray([self.processor.bos_id], np.int32), np.zeros(1, np.int32),
                                np.zeros(1, bool), None), 1, RowSampling.make(), (), -1)
        try:
            handle = self.submit(job, measured=False)  # (a load balancer's probe: not a request to count)
        except APIError as e:
            raise APIError(503, f"the health check could not run: {e.message}", "service_unavailable") from None
        last = None

        async def run():
            nonlocal last
            async for event in self.events(handle, time.perf_counter()):
                last = event

        try:
            await asyncio.wait_for(run(), self.settings.health_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(503, f"a one-token generation did not finish within {self.settings.health_timeout_s} s.",
                           "service_unavailable") from None
        if last is None or last.finish_reason not in ("stop", "length"):
            raise APIError(503, f"the health check's generation ended with {last and last.finish_reason!r} "
                                f"({last and last.error}).", "service_unavailable")
        return {"status": "ok"}

    async def profile(self, request: Request, start: bool) -> dict:
        """/start_profile (`start`) or /stop_profile. SGLang's body fields that choose where and for how
        long are refused (the server's profile directory holds every trace; /stop_profile ends one);
        `with_stack: true` records Python's calls too (JAX's Python tracer: off unless asked, where SGLang's
        default is on, since it slows the server while it runs and makes the trace several times larger);
        the others (activities,
        record_shapes, ...) are ignored: JAX's profiler records what it records."""
        if self.profiler is None:
            raise bad_request("profiling is off on this server; start it with --profile-dir DIR to record device "
                              "traces with /start_profile and /stop_profile.")
        data = await self.read_json(request, empty={})
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object (or empty).")
        for field in ("output_dir", "num_steps", "start_step"):
            if data.get(field) is not None:
                raise bad_request(f"{field} is not supported here: traces go to the server's --profile-dir, and a "
                                  f"trace ends with POST /stop_profile.", field)
        if start:
            stack = data.get("with_stack")
            if stack is not None and not isinstance(stack, bool):
                raise bad_request("with_stack must be true or false.", "with_stack")
            folder = await self.host(self.profiler.start, bool(stack))
            return {"message": "profiling started", "trace_dir": str(folder)}
        folder, files = await self.host(self.profiler.stop)
        return {"message": "profiling stopped", "trace_dir": str(folder), "files": [str(f) for f in files]}

    def load(self) -> dict:
        """SGLang's load entry, which its router's power-of-two policy compares (`num_tokens`): every request
        the server holds (answering or waiting for a slot), those still waiting, and the tokens they hold
        (prompt and answer so far)."""
        return {"dp_rank": 0, "num_reqs": len(self._tokens), "num_waiting_reqs": self.scheduler.stats()["queued"],
                "num_tokens": sum(self._tokens.values())}

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "vl2-jax",
                "root": self.name, "max_model_len": self.engine.max_seq_len, **self.weights}

    def model_info(self) -> dict:
        return {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
                "has_image_understanding": True, "max_seq_len": self.engine.max_seq_len,
                "max_batch": self.engine.max_batch, "eos_token_id": self.eos, **self.weights}

    def server_info(self) -> dict:
        s = self.settings
        stats = self.scheduler.stats()
        return {"model_path": self.model_path, "served_model_name": self.name, **self.weights, "tp_size": 1, "dp_size": 1,
                "max_batch": self.engine.max_batch, "max_seq_len": self.engine.max_seq_len,
                "max_queue": getattr(self.scheduler, "max_queue", None), "api_key_required": bool(s.api_key),
                "max_body_bytes": s.max_body_bytes, "max_images": s.max_images,
                "image_limits": {k: str(v) if k == "local_dir" and v is not None else v
                                 for k, v in dataclasses.asdict(s.image_limits).items()},
                "default_max_tokens": s.default_max_tokens, "internal_states": [stats], "version": _version()}


def _version() -> str | None:
    try:
        return importlib.metadata.version("vl2-jax")
    except importlib.metadata.PackageNotFoundError:
        return None
