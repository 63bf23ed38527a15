"""Where a server's device time goes under load: a trace window summed by program (GPU).

    python -m vl2_jax.serve --model random:small --max-batch 64 --profile-dir /tmp/traces &
    python -m vl2_jax.loadtest --concurrency 64 --requests 256 &     # the load, meanwhile
    python benchmarks/serve_profile.py --seconds 5                     # a window of it
    python benchmarks/serve_profile.py --trace /tmp/traces/trace-.../plugins/profile/.../host.trace.json.gz

Records `--seconds` of the server through its `POST /start_profile` and `/stop_profile` (the server runs
with `--profile-dir`), reads its `/metrics` before and after (answer tokens made in the window), and
sums the device's kernels by the program they belong to (the engine's jitted functions: `jit_decode`,
`jit_prefill`, `jit_extend`, `jit_insert`, `jit_encode`, ...): busy ms in the window and per answer
token, the share of the window, and the device's idle time with its longest gaps (the host's turn:
reading tokens, admitting prompts, or waiting for requests). Prints one JSON line per result, then a
table. The trace stays where the server wrote it (Perfetto opens it).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time

import httpx2

from vl2_jax.traces import idle_gaps, read_trace

GENERATED = re.compile(r"^vl2_generated_tokens_total (\S+)$", re.M)


def generated_tokens(client: httpx2.Client) -> float | None:
    """The server's answer tokens so far (its /metrics), or None where it does not say."""
    found = GENERATED.search(client.get("/metrics").text)
    return float(found.group(1)) if found else None


def record(url: str, seconds: float, api_key: str | None) -> tuple[str, float, float | None]:
    """A trace of `seconds` of the server at `url` -> (its device trace file, wall seconds, answer tokens)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx2.Client(base_url=url, headers=headers, timeout=300) as client:
        start = client.post("/start_profile")
        if start.status_code != 200:
            sys.exit(f"error: /start_profile answered {start.status_code}: {start.text.strip()}")
        before, t0 = generated_tokens(client), time.perf_counter()
        time.sleep(seconds)
        after, wall = generated_tokens(client), time.perf_counter() - t0
        stop = client.post("/stop_profile")  # (writing the trace takes a while: outside the window counted)
    if stop.status_code != 200:
        sys.exit(f"error: /stop_profile answered {stop.status_code}: {stop.text.strip()}")
    files = [f for f in stop.json()["files"] if f.endswith(".trace.json.gz")]
    if not files:
        sys.exit(f"error: the server wrote no *.trace.json.gz under {stop.json()['trace_dir']}")
    tokens = None if before is None or after is None else after - before
    return files[0], wall, tokens


def summarize(path: str, wall: float | None = None, tokens: float | None = None, top: int = 12) -> list[dict]:
    intervals, keys = [], set()
    kernels, busy, programs = read_trace(path, intervals=intervals, arg_keys=keys)
    gaps = idle_gaps(intervals)
    span_ms = gaps["span_ms"]
    rate = tokens / wall if tokens and wall else None
    # (a program's share of the trace's span, at the window's answer tokens per second)
    per_token = (lambda us: us / 1e3 / span_ms * 1e3 / rate) if rate and span_ms else (lambda us: None)
    rows = [{"metric": "window", "trace": path, "wall_s": wall, "answer_tokens": tokens,
             "tokens_per_s": rate, "kernel_span_ms": span_ms,
             "device_busy_ms": sum(busy.values()) / 1e3, "device_idle_ms": gaps["idle_ms"],
             "idle_share": gaps["idle_ms"] / span_ms if span_ms else None, "launches": sum(kernels.values()),
             "kernel_arg_keys": sorted(keys)}]
    for program, us in programs.most_common():
        launched = sum(1 for *_, p in intervals if p == program)
        rows.append({"metric": "program", "program": program, "busy_ms": us / 1e3, "launches": launched,
                     "share": us / 1e3 / span_ms if span_ms else None, "ms_per_answer_token": per_token(us)})
    rows += [{"metric": "idle_gap", **g} for g in gaps["largest_gaps"]]
    for name, us in busy.most_common(top):
        rows.append({"metric": "kernel", "name": name[:80], "launches": kernels[name], "busy_ms": us / 1e3,
                     "ms_per_answer_token": per_token(us)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:30000", help="the server (default http://127.0.0.1:30000)")
    p.add_argument("--seconds", type=float, default=5.0, help="the window to record (default 5)")
    p.add_argument("--api-key", default=os.environ.get("VL2_API_KEY"), help="the server's key, if it has one")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="summarize this trace (a *.trace.json.gz, or a folder holding one) instead of recording")
    p.add_argument("--top", type=int, default=12, help="kernels listed (default 12)")
    args = p.parse_args(argv)
    if args.trace:
        found = [args.trace] if os.path.isfile(args.trace) else glob.glob(
            os.path.join(args.trace, "**", "*.trace.json.gz"), recursive=True)
        if not found:
            p.error(f"--trace {args.trace}: no *.trace.json.gz there")
        rows = summarize(found[0], top=args.top)
    else:
        rows = summarize(*record(args.url, args.seconds, args.api_key), top=args.top)
    for r in rows:
        print(json.dumps(r), flush=True)
    for r in rows:
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                         if k != "trace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
