"""Serving on several devices, measured on simulated CPU devices: one server, one server whose slots are
split over two devices (`--mesh data=2`, one scheduler), and two servers behind SGLang's router.

    python benchmarks/replicas_cpu.py                                   # random:test, about 5 minutes
    python benchmarks/replicas_cpu.py --concurrency 1,8 --requests 32 --policy round_robin

Each setup starts its servers (`python -m vl2_jax.serve --model random:test`, warmed up, CPU only; the
mesh setup on `--xla_force_host_platform_device_count=2`), waits for them, drives them with `python -m
vl2_jax.loadtest` at each concurrency, and stops them. The two-server setup puts `sglang-router` (a
test dependency) in front, with `--policy` (default cache_aware). Prints the load test's JSON lines
with a `setup` field, then a table of output tokens/s and first-token p50 per setup and concurrency.
On a CPU the numbers say that each setup serves correctly under load and how the host's cores are
shared; the speed of GPUs is another matter (each replica there has a device of its own).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def servers(model: str, count: int, devices: int, max_batch: int, logs: Path):
    """`count` warmed-up servers, each over `devices` simulated CPU devices (data-parallel slots when 2+)
    -> their URLs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""}
    mesh = ["--mesh", f"data={devices}"] if devices > 1 else []
    procs = []
    try:
        for i in range(count):
            with open(logs / f"serve-{devices}-{i}.log", "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "vl2_jax.serve", "--model", model, "--port", "0", "--max-batch",
                     str(max_batch), "--compile-cache", "", *mesh], stdout=subprocess.PIPE, stderr=log, text=True,
                    env=env, cwd=ROOT))
        urls = [proc.stdout.readline().strip() for proc in procs]  # (printed once warm)
        for i, url in enumerate(urls):
            if not url.startswith("http://"):
                sys.exit(f"a server did not start:\n{(logs / f'serve-{devices}-{i}.log').read_text()[-2000:]}")
        yield urls
    finally:
        stop(procs)


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def router(workers: list[str], policy: str, logs: Path):
    """sglang-router in front of `workers` -> its URL, once every worker is registered as healthy."""
    port = free_port()
    with open(logs / "router.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *workers,
                                 "--policy", policy, "--host", "127.0.0.1", "--port", str(port),
                                 "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
                                 "--log-level", "warn"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the router did not come up:\n{(logs / 'router.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx2.HTTPError, ValueError, KeyError):
                listed = httpx2.get(url + "/workers", timeout=2).json()["workers"]
                if sorted(w["url"] for w in listed if w["is_healthy"]) == sorted(workers):
                    break
            time.sleep(0.2)
        yield url
    finally:
        stop([proc])


def load(url: str, setup: str, args) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "vl2_jax.loadtest", "--url", url + "/v1", "--concurrency",
                        args.concurrency, "--requests", str(args.requests), "--min-tokens", "16", "--max-tokens", "32",
                        "--quiet"], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows = []
    for line in r.stdout.splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict) and "concurrency" in row:
                rows.append({"setup": setup, **row})
                print(json.dumps(rows[-1]), flush=True)
    if not rows:
        sys.exit(f"the load test failed:\n{r.stderr[-2000:]}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:test")
    p.add_argument("--concurrency", default="1,8", help="comma-separated levels (default 1,8)")
    p.add_argument("--requests", type=int, default=24, help="requests per level (default 24)")
    p.add_argument("--max-batch", type=int, default=8, help="slots per server (default 8)")
    p.add_argument("--policy", default="cache_aware", help="the router's policy (default cache_aware)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        with servers(args.model, 1, 1, args.max_batch, logs) as (url,):
            rows += load(url, "one server, one device", args)
        with servers(args.model, 1, 2, args.max_batch, logs) as (url,):
            rows += load(url, "one server, data=2", args)
        with servers(args.model, 2, 1, args.max_batch, logs) as urls, router(urls, args.policy, logs) as url:
            rows += load(url, f"two servers, router ({args.policy})", args)
    print("\n| setup | concurrency | output tok/s | first token p50 ms | errors |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['concurrency']} | {r['output_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | "
              f"{r['errors']} |")


if __name__ == "__main__":
    main()
