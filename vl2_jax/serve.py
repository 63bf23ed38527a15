"""Serve DeepSeek-VL2 over HTTP, OpenAI- and SGLang-compatible.

    python -m vl2_jax.serve --model deepseek-ai/deepseek-vl2-tiny --port 30000 --max-batch 8
    python -m vl2_jax.serve --model random:test --no-warmup            # offline, for trying the API

Loads the model, compiles every program (progress on stderr; --no-warmup compiles on first use
instead), starts the scheduler and serves `vl2_jax.serving.api`'s routes; prints the URL on stdout when
it accepts requests. SIGTERM or Ctrl-C: no new connections are accepted and idle ones are closed (a
request that arrives meanwhile gets 503), those in flight get up to --drain-seconds to finish (then
they are cancelled: 503, or an error event in a stream; a second Ctrl-C cancels them at once), the
scheduler stops, the process exits. A malformed flag prints a usage line and
exits with status 2; a model that does not load, or an argument it refuses, prints one `error: ...` line,
exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import signal
import socket
import sys
import time

import uvicorn

from vl2_jax.config import ATTENTION_IMPLS, MAX_DECODE_STEPS, MOE_IMPLS, QUANTS, Runtime
from vl2_jax.errors import command_parser, given, number

DEFAULT_PORT = 30000  # SGLang's
ANSWER_SECONDS = 8.0  # past the drain time: for the scheduler to end its last step and the 503s to be written


def parser() -> argparse.ArgumentParser:
    p = command_parser("python -m vl2_jax.serve", __doc__)
    p.add_argument("--model", type=given, required=True,
                   help="a local checkpoint folder (Hugging Face or converted), a hub id, or random:tiny|small|base|test")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's name in the API (`model` of requests, /v1/models; default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=number(int, 0, 65535), default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free one")
    p.add_argument("--max-batch", type=number(int, 1), default=8, help="answers decoded together: slots (default 8)")
    p.add_argument("--max-seq-len", type=number(int, 1), default=None,
                   help="tokens a slot holds, prompt included (default: the model's context)")
    p.add_argument("--decode-steps", type=number(int, 1, MAX_DECODE_STEPS), default=Runtime.decode_steps, metavar="N",
                   help="tokens per decode call over up to 8 slots, half as many over 9-16, a quarter beyond (default "
                        f"{Runtime.decode_steps}): fewer shorten the wait of a prompt that arrives while answers decode")
    p.add_argument("--max-queue", type=number(int, 1), default=256,
                   help="requests waiting for a slot before new ones get 429 (default 256)")
    p.add_argument("--prefill-chunk", type=number(int, 1), default=None,
                   help="write prompts into the cache this many tokens at a time (default: the runtime's chunks)")
    p.add_argument("--prefill-tokens", type=number(int, 0), default=Runtime.prefill_tokens, metavar="N",
                   help="prompt tokens prefilled between two decode calls, the first chunks of one length of "
                        "prompts that wait together going through the model in one call (default "
                        f"{Runtime.prefill_tokens}; 0: one prompt per call, at most one chunk between decode calls)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="default: bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--mesh", default=None, metavar="SPEC",
                   help="shard over devices: 'auto' or sizes such as expert=4,tensor=2 (axes data, expert, tensor)")
    p.add_argument("--quant", default=None, choices=QUANTS,
                   help="language-model weights as int8 or fp8 (e4m3) with float32 scales (default: as the checkpoint holds them)")
    p.add_argument("--moe", default="auto", choices=MOE_IMPLS, help="routed-expert dispatch (default auto)")
    p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS, help="attention form (default auto)")
    p.add_argument("--kernels", default="on", choices=["on", "off"], help="accelerator kernels (default on)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep compiled programs in DIR between runs (default: $VL2_JAX_COMPILE_CACHE, else "
                        "~/.cache/vl2_jax/xla, under $XDG_CACHE_HOME where set; '' turns it off)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt from its start (default: a prompt continues from the longest prefix a "
                        "free slot still holds of an earlier one, e.g. the same images or the chat so far)")
    p.add_argument("--feature-cache-mb", type=number(int, 0), default=1024, metavar="MB",
                   help="with the prefix cache: device memory for the vision tower's output of recently seen image "
                        "tiles, so an image seen before is not encoded again (default 1024; 0: off)")
    p.add_argument("--tile-cache-mb", type=number(int, 0), default=256, metavar="MB",
                   help="host memory for the tiles of recently seen images, so an image sent again (each turn of a "
                        "chat sends its images again) is not resampled (default 256; 0: off)")
    p.add_argument("--no-warmup", action="store_true",
                   help="serve at once and compile each program on first use (the first requests are slow)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health, /health_generate and "
                        "/metrics (default: $VL2_API_KEY; none: no key needed)")
    p.add_argument("--image-dir", default=None, metavar="DIR",
                   help="image references may name local files inside DIR, relative paths starting there (default: no "
                        "local files)")
    p.add_argument("--allow-fetch", action="store_true",
                   help="fetch http(s) image URLs (public addresses only; default: data URLs and base64 only)")
    p.add_argument("--max-images", type=number(int, 1), default=8, help="images per request (default 8)")
    p.add_argument("--max-image-pixels", type=number(int, 1), default=40_000_000,
                   help="pixels (width x height) an image may have (default 40,000,000)")
    p.add_argument("--max-body-mb", type=number(int, 1), default=64, help="request body size limit (default 64 MB)")
    p.add_argument("--request-timeout", type=number(float, 0), default=600.0, metavar="S",
                   help="cancel a request still running S seconds after it arrived, answering 504 (default 600; "
                        "0: no limit)")
    p.add_argument("--drain-seconds", type=number(float, 0), default=20.0,
                   help="on SIGTERM, how long requests in flight may take to finish before they are cancelled "
                        "(answered 503; default 20)")
    p.add_argument("--profile-dir", default=None, metavar="DIR",
                   help="enable SGLang's /start_profile and /stop_profile (GET or POST): a JAX profiler trace of the server "
                        "between the two, written into a new folder under DIR (default: off)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level; info adds one line per request (default warning)")
    return p


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use fails in a second, not after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from vl2_jax.errors import InputError

        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host.") from None
    return sock


def _warmup_progress(log, clock=time.perf_counter):
    """model.warmup's progress callback: a line at each tenth of the programs, and the last; until the
    last, the time left at the pace so far (a first-ever warmup compiles for minutes)."""
    start, shown = clock(), [-1]

    def progress(done: int, total: int, name) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth > shown[0] or done == total:
            shown[0] = tenth
            elapsed = clock() - start
            left = f", about {_minutes(elapsed / done * (total - done))} left" if 0 < done < total else ""
            log(f"warming up: {done}/{total} programs ready ({elapsed:.0f} s{left})")

    return progress


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def run(args, log) -> int:
    from vl2_jax.errors import InputError, interrupts_held

    with interrupts_held():  # (importing JAX; then SIGTERM ends loading or warmup until uvicorn takes it over)
        from vl2_jax import executables, load
        from vl2_jax.images import ImageLimits
        from vl2_jax.processor import TileCache
        from vl2_jax.serving.api import ServerSettings, create_app
        from vl2_jax.serving.metrics import Metrics
        from vl2_jax.serving.scheduler import Scheduler

    if args.image_dir is not None and not os.path.isdir(args.image_dir):
        what = "is not a folder" if os.path.exists(args.image_dir) else "does not exist"
        raise InputError(f"--image-dir {args.image_dir} {what}.")
    if args.profile_dir is not None:
        try:
            os.makedirs(args.profile_dir, exist_ok=True)
        except OSError as e:
            raise InputError(f"--profile-dir {args.profile_dir}: cannot make that folder ({e.strerror or e}).") from None
    settings = ServerSettings(
        api_key=args.api_key if args.api_key is not None else os.environ.get("VL2_API_KEY") or None,
        max_body_bytes=args.max_body_mb << 20, max_images=args.max_images,
        request_timeout_s=args.request_timeout or None, profile_dir=args.profile_dir, model_path=args.model,
        image_limits=ImageLimits(max_pixels=args.max_image_pixels, allow_fetch=args.allow_fetch,
                                 local_dir=args.image_dir))
    sock = _listen(args.host, args.port)
    cache_dir = executables.use_compile_cache(executables.cache_dir(args.compile_cache), log,
                                              jax_cache=args.mesh is not None)
    chunks = {} if args.prefill_chunk is None else {"prefill_chunks": (args.prefill_chunk,)}
    runtime = Runtime(moe=args.moe, attention=args.attention, kernels=args.kernels == "on", max_batch=args.max_batch,
                      max_seq_len=args.max_seq_len, prefill_tokens=args.prefill_tokens,
                      prefix_cache=not args.no_prefix_cache, decode_steps=args.decode_steps, **chunks)
    model = load.load_model(args.model, args.dtype, runtime=runtime, mesh=args.mesh, progress=log, quant=args.quant,
                            programs=cache_dir)
    store = model.engine.executables
    shortest = len(model.processor([{"role": "user", "content": "x"}]).input_ids)  # (a one-character chat)
    if shortest >= model.engine.max_seq_len:
        log(f"warning: a slot of {model.engine.max_seq_len} tokens (--max-seq-len) leaves no room for a chat: a "
            f"one-character message takes {shortest} with the chat template, so chat requests will be refused (400).")
    if args.tile_cache_mb:
        model.processor.tile_cache = TileCache(args.tile_cache_mb << 20)
    if not args.no_warmup:
        report = model.warmup(_warmup_progress(log))
        kept = "" if store is None else "; {loaded} executables loaded from the cache, {compiled} compiled: the " \
            "programs and the one that makes the engine's state".format(**store.report())
        log(f"warm: {report['programs']} programs in {report['seconds']:.0f} s ({report['compile_seconds']:.0f} s "
            f"compiling or loading them, the rest running each once{kept})")
    metrics = Metrics()
    scheduler = Scheduler(model, max_queue=args.max_queue, metrics=metrics.scheduler_hooks(),
                          feature_cache_bytes=args.feature_cache_mb << 20).start()
    name = args.served_model_name or args.model
    app = create_app(scheduler, name, model.processor, settings, metrics)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # (stdout carries the URL line alone)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level in ("debug", "info"),
                            log_config=log_config,
                            timeout_graceful_shutdown=args.drain_seconds, lifespan="off")
    server = _Server(config, app.state.server, scheduler, log)
    # uvicorn raises the signal that stopped it again once it has shut down: after a clean stop that
    # ends this process with status 0, not as killed.
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        if not server.stopped:
            raise
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server that prints the URL once it listens, answers 503 from the first signal on, and
    stops the scheduler after the requests in flight have finished or been cancelled."""

    def __init__(self, config, api, scheduler, log):
        super().__init__(config)
        self.api, self.scheduler, self.log = api, scheduler, log
        self.stopped = False

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.should_exit:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"http://{shown}:{port}", flush=True)
        self.log(f"serving {self.api.name} at http://{shown}:{port} (OpenAI: /v1, SGLang: /generate; "
                 f"SIGTERM or Ctrl-C stops)")

    def handle_exit(self, sig, frame):
        self.api.draining = True  # a request on a connection still open gets 503 while those in flight finish
        if self.should_exit and sig == signal.SIGINT:  # a second Ctrl-C: uvicorn stops waiting, the scheduler too
            self.log("a second Ctrl-C: the requests in flight are cancelled now")
            self.scheduler.hurry()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None):
        drain = self.config.timeout_graceful_shutdown
        self.log(f"stopping: requests in flight get {drain:g} s to finish")
        self.api.stop_reading()
        # The scheduler cancels what still runs when the drain time is up, and those requests are
        # answered 503 (an error event in a stream); uvicorn waits a little longer than the drain before
        # it cancels its own tasks, so that those answers are written. On a thread, so that requests
        # cancelled by their clients can still reach the scheduler through this loop.
        stopping = asyncio.ensure_future(asyncio.to_thread(self.scheduler.stop, drain))
        self.config.timeout_graceful_shutdown = drain + ANSWER_SECONDS
        await super().shutdown(sockets)
        await stopping
        profiler = self.api.profiler
        if profiler is not None and profiler.running:  # (a trace started and never stopped is written now)
            folder, _ = await asyncio.to_thread(profiler.stop)
            self.log(f"the profile under way was stopped: {folder}")
        self.stopped = True
        self.log("stopped")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    log = lambda line: print(line, file=sys.stderr, flush=True)
    from vl2_jax.errors import guarded

    return guarded(lambda: run(args, log), log)


def exit_with_main() -> None:
    """`python -m vl2_jax.serve` and `vl2-serve`: `main()`, then out of the process at once (`leave`: an
    interrupted warmup does not wait for the compiles under way)."""
    from vl2_jax.errors import leave

    leave(main())


if __name__ == "__main__":
    exit_with_main()
