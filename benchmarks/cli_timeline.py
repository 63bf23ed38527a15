"""Where a fresh `python -m generate` spends its wall time: each stderr line stamped with the seconds since
the process started, the answer's JSON timings, and the exit.

    PYTHONPATH=. python benchmarks/cli_timeline.py --repeats 3 --evict FOLDER -- \\
        --model FOLDER --image tests/data/cat.png --prompt "Describe the image." --max-new-tokens 32

Everything after `--` goes to `python -m generate` (`--json` is added). Each repeat runs it in a fresh
process; with `--evict FOLDER` the files under FOLDER leave the page cache first
(posix_fadvise, as `benchmarks/load_speed.py --evict fadvise` does), so the load reads the disk; with
`--evict-all` too, every cached file does (drop_caches, as root: Python, the libraries and the compiled
programs are read from the disk as well, as after a reboot). Prints one JSON line per repeat: "wall_s"
(start to exit), "lines" ([seconds, stderr line] as they came), "answered_s" (when the answer's JSON
reached stdout), "exit_s" (answered to exit) and the answer's own "load_s", "compile_s", "ttft_s",
"decode_tokens_per_s" and "programs_*" (loaded from the compile cache, compiled, seconds loading);
then a "summary" line with the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_speed import evict, repo_env  # noqa: E402 - the same page-cache eviction and child environment


def run_once(generate_args: list[str], env: dict) -> dict:
    """One `python -m generate --json ...` in a fresh process, timed line by line."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "generate", *generate_args, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[tuple[float, str]] = []

    def read_stderr():
        for line in proc.stderr:
            lines.append((round(time.perf_counter() - start, 3), line.rstrip("\n")))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    answer, answered = None, None
    for line in proc.stdout:
        if line.startswith("{"):
            answer, answered = json.loads(line), time.perf_counter() - start
    code = proc.wait()
    wall = time.perf_counter() - start
    reader.join(5)
    record = {"returncode": code, "wall_s": round(wall, 3), "lines": lines}
    if answer is not None:
        record.update(answered_s=round(answered, 3), exit_s=round(wall - answered, 3),
                      **{k: v for k, v in answer.items()
                         if k in ("load_s", "compile_s", "ttft_s", "decode_tokens_per_s") or k.startswith("programs_")})
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--evict", default=None, metavar="FOLDER", help="drop FOLDER's files from the page cache first")
    p.add_argument("--evict-all", action="store_true",
                   help="with --evict: drop every cached file (drop_caches; needs root), not only FOLDER's")
    p.add_argument("generate_args", nargs=argparse.REMAINDER, help="-- then python -m generate's arguments")
    args = p.parse_args()
    generate_args = args.generate_args[1:] if args.generate_args[:1] == ["--"] else args.generate_args
    if not generate_args:
        p.error("give python -m generate's arguments after --")
    env = repo_env()
    records = []
    for i in range(args.repeats):
        cache = "warm"
        if args.evict:
            cache = evict([f for f in Path(args.evict).rglob("*") if f.is_file()],
                          "drop_caches" if args.evict_all else "fadvise")
        record = {"repeat": i, "cache": cache, **run_once(generate_args, env)}
        records.append(record)
        print(json.dumps(record), flush=True)
    done = [r for r in records if r["returncode"] == 0]
    summary = {"metric": "summary", "runs": len(records), "ok": len(done)}
    for key in ("wall_s", "answered_s", "exit_s", "load_s", "compile_s", "ttft_s", "decode_tokens_per_s",
                "programs_load_s"):
        values = [r[key] for r in done if key in r]
        if values:
            summary[key] = round(statistics.median(values), 3)
    print(json.dumps(summary), flush=True)
    sys.exit(0 if len(done) == len(records) else 1)


if __name__ == "__main__":
    main()
