"""Two checkouts of vl2-jax served side by side, alternating: did a change move serving speed?

    git worktree add /tmp/old <commit>
    python benchmarks/serve_ab.py --a /tmp/old --b . --model random:tiny --max-batch 32 --rounds 2
    python benchmarks/serve_ab.py --a /tmp/old --b . --cpu            # random:test on the CPU
    python benchmarks/serve_ab.py --a /tmp/old --only a > a.jsonl     # one side at a time, then
    python benchmarks/serve_ab.py --table a.jsonl b.jsonl             # the table of both

Each round starts A's server (`python -m vl2_jax.serve`, PYTHONPATH = that checkout, warmed up, with a
compile cache of its own under --cache-dir, so later rounds load their programs), drives it at every
--concurrency level with checkout B's `python -m vl2_jax.loadtest` (one driver for both), stops it,
and then does the same for B. One server runs at a time (it may take the whole GPU). Prints one JSON
line per checkout, round and level (output tokens/s, first-token and inter-token p50/p99, errors), then
per level the medians over rounds with the ratio B / A.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

FIELDS = ("output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
# kept in each line but not compared: a level of few requests per client is over before the batch
# reaches a steady state (its duration is the last request's first token plus its whole answer)
KEPT = ("requests", "duration_s", "output_tokens", "tpot_p50_ms", "max_in_flight")


def _path(checkout: Path) -> str:
    """PYTHONPATH with `checkout` first (and whatever the caller had after it)."""
    return os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))


def serve(checkout: Path, args, log: Path) -> subprocess.Popen:
    """A warmed-up server of `checkout` (its URL is the first line of its stdout)."""
    env = {**os.environ, "PYTHONPATH": _path(checkout), "PYTHONUNBUFFERED": "1"}
    if args.cpu:
        env["JAX_PLATFORMS"] = "cpu"
    cache = Path(args.cache_dir) / hashlib.sha256(str(checkout).encode()).hexdigest()[:12]  # (one per checkout)
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vl2_jax.serve", "--model", args.model, "--port", "0", "--max-batch",
             str(args.max_batch), "--compile-cache", str(cache), *args.serve_args],
            stdout=subprocess.PIPE, stderr=out, text=True, env=env, cwd=checkout)


def one_run(checkout: Path, loadtest_checkout: Path, args, log: Path) -> list[dict]:
    proc = serve(checkout, args, log)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            sys.exit(f"the server of {checkout} did not start:\n{log.read_text()[-2000:]}")
        r = subprocess.run(
            [sys.executable, "-m", "vl2_jax.loadtest", "--url", url + "/v1", "--concurrency", args.concurrency,
             "--requests", str(args.requests), "--min-tokens", str(args.min_tokens), "--max-tokens",
             str(args.max_tokens), "--quiet"],
            capture_output=True, text=True, cwd=loadtest_checkout, env={**os.environ, "PYTHONPATH": _path(loadtest_checkout)})
        rows = []
        for line in r.stdout.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "concurrency" in row:
                rows.append(row)
        if not rows or r.returncode:
            sys.exit(f"the load test of {checkout} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", default=None, help="the checkout to compare against (a folder; needed but with --table)")
    p.add_argument("--b", default=".", help="the checkout under test (default: this one)")
    p.add_argument("--model", default=None, help="default: random:tiny, or random:test with --cpu")
    p.add_argument("--cpu", action="store_true", help="run the servers on the CPU (JAX_PLATFORMS=cpu)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--concurrency", default="1,8,32", help="the load test's levels (default 1,8,32)")
    p.add_argument("--requests", type=int, default=96, help="requests per level (default 96)")
    p.add_argument("--min-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cache-dir", default="/tmp/vl2-serve-ab", help="compile caches, one per checkout")
    p.add_argument("--only", choices=["a", "b"], default=None,
                   help="run one side alone (its JSON lines; a first-ever warmup of both may not fit one sitting)")
    p.add_argument("--table", nargs="+", default=None, metavar="JSONL",
                   help="no runs: the table of the JSON lines saved from earlier runs (e.g. one --only a, one --only b)")
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then more arguments for python -m vl2_jax.serve")
    args = p.parse_args(argv)
    if args.table:
        rows = [json.loads(line) for file in args.table for line in Path(file).read_text().splitlines()
                if line.startswith("{")]
        seen: dict[tuple[str, int], list[dict]] = {}
        for row in rows:
            if "side" in row and "concurrency" in row:  # (other lines, e.g. a file's header, pass)
                seen.setdefault((row["side"], row["concurrency"]), []).append(row)
        print_table(seen)
        return 0
    if args.a is None:
        p.error("--a is needed (the checkout to compare against), unless --table")
    args.model = args.model or ("random:test" if args.cpu else "random:tiny")
    args.serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    checkouts = {"a": Path(args.a).resolve(), "b": Path(args.b).resolve()}
    if checkouts["a"] == checkouts["b"] and checkouts["a"].name:
        print("note: --a and --b are the same checkout", file=sys.stderr)
    logs = Path(args.cache_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    seen: dict[tuple[str, int], list[dict]] = {}
    for round_ in range(args.rounds):
        for side, checkout in checkouts.items():
            if args.only not in (None, side):
                continue
            for row in one_run(checkout, checkouts["b"], args, logs / f"serve-{side}-{round_}.log"):
                out = {"side": side, "checkout": str(checkout), "round": round_, "concurrency": row["concurrency"],
                       "errors": row["errors"], **{k: row[k] for k in FIELDS},
                       **{k: row.get(k) for k in KEPT}}
                print(json.dumps(out), flush=True)
                seen.setdefault((side, row["concurrency"]), []).append(out)
    if args.only is None:
        print_table(seen)
    return 0


def print_table(seen: dict[tuple[str, int], list[dict]]) -> None:
    """Per level, the medians over rounds of A and B and the ratio B / A (levels both sides ran)."""
    print("\n| concurrency | " + " | ".join(f"{f} A / B (B/A)" for f in FIELDS) + " |")
    print("|---|" + "---|" * len(FIELDS))
    for level in sorted({c for side, c in seen if (("a", c) in seen and ("b", c) in seen)}):
        cells = []
        for f in FIELDS:
            a, b = (statistics.median(r[f] for r in seen[(s, level)]) for s in ("a", "b"))
            cells.append(f"{a:.4g} / {b:.4g} ({b / a:.2f})" if a else f"{a:.4g} / {b:.4g}")
        print(f"| {level} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
