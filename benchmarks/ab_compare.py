"""Two checkouts of vl2-jax timed side by side, alternating, on the same GPU: did a change move speed?

    git worktree add /tmp/old <commit>           # or: git archive <commit> vl2_jax | tar -x -C /tmp/old
    python benchmarks/ab_compare.py --a /tmp/old --b . --model random:tiny --rounds 5
    python benchmarks/ab_compare.py --a /tmp/old --b /tmp/mid --b .     # --b again: each compared with A
    python benchmarks/ab_compare.py --a . --b ".@chunks=128,256,512,1024,1152,1536,2048,3072,4096"
    python benchmarks/ab_compare.py --a . --b ".@xla=--xla_gpu_graph_min_graph_size=1"

A side is a checkout, optionally with settings after `@` (several: `@k=v@k=v`): `chunks=` the prefill
chunk lengths (`Runtime(prefill_chunks=...)`), any other `Runtime` field by its name (`max_seq_len=1536`,
`max_batch=16`, `kernels=false`: values read as JSON, else as text; checkouts with `Runtime`), `xla=` flags
added to the worker's XLA_FLAGS. The same checkout on both sides with different settings compares the settings.

Each checkout runs in its own worker process (its `vl2_jax` first on `sys.path`, checked); the workers load the
model and warm it up side by side; then the driver asks A, B, A, B, ... for one round each: the first token of the
image prompt (768 px, one sentence) and decode speed at batch 1 and 8 (`--new-tokens`, EOS ignored),
computed the same way for each (rows x (new tokens - 1) / decode seconds, as each version's generate
reports them), and the whole call's speed (rows x new tokens / its wall time, prefill included: versions
may split a batch's time between first token and decode differently). Medians per checkout and
the ratio B / A are printed as JSON lines and a table. The worker uses only the API both sides share
(`load_model` from `vl2_jax` or, in older checkouts, `vl2_jax.hub`; `model.generate`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import sys
sys.path.insert(0, sys.argv[4])  # the checkout before the working directory, which `python -c` puts first
import json
import time
import numpy as np
from PIL import Image
runtime = json.loads(sys.argv[5])
try:
    from vl2_jax import load_model
except ImportError:
    from vl2_jax.hub import load_model
if runtime:
    from vl2_jax import Runtime
    model = load_model(sys.argv[1], "bfloat16", runtime=Runtime(**runtime))
else:
    model = load_model(sys.argv[1], "bfloat16")
new, batches = int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 768, 3), dtype=np.uint8))
one = model.processor([{"role": "user", "content": "<image>\nDescribe this image in detail."}], [image])
single = model.processor.batchify([one])
runs = {b: model.processor.batchify([one] * b) for b in batches}

def round_():
    row = {"ttft_ms": 1e3 * model.generate(single, max_new_tokens=1).ttft_s}
    for b, batch in runs.items():
        start = time.perf_counter()
        r = model.generate(batch, max_new_tokens=new, ignore_eos=True)
        wall = time.perf_counter() - start
        # (0 s in a round whose decode programs compiled: their time is left out, and may cover the rest)
        row[f"decode_b{b}"] = b * (new - 1) / r.decode_s if r.decode_s > 0 else float("nan")
        row[f"whole_b{b}"] = b * new / wall  # (the call end to end: prefill, first tokens and decode)
    return row

round_(); round_()  # compile, then one untimed round
import vl2_jax
print("ready", vl2_jax.__file__, flush=True)
for line in sys.stdin:
    print(json.dumps(round_()), flush=True)
"""


def side(spec: str) -> tuple[str, dict, str]:
    """"PATH[@chunks=N,N,...][@xla=FLAGS][@FIELD=VALUE] -> (the checkout, Runtime keyword arguments, XLA flags)."""
    checkout, *settings = spec.split("@")
    runtime, xla = {}, ""
    for setting in settings:
        key, _, value = setting.partition("=")
        if key == "chunks":
            runtime["prefill_chunks"] = [int(n) for n in value.split(",")]
        elif key == "xla":
            xla = value
        elif key.isidentifier():  # a Runtime field: the worker's Runtime(**...) refuses an unknown one
            try:
                runtime[key] = json.loads(value)
            except json.JSONDecodeError:
                runtime[key] = value
        else:
            raise SystemExit(f"ab_compare: no setting {key!r} in {spec!r}; use chunks=, xla= or a Runtime field")
    return checkout, runtime, xla


def start(spec: str, args, share: int) -> subprocess.Popen:
    checkout, runtime, xla = side(spec)
    # the processes share the GPU: each takes under 1 / share of its memory (JAX's default takes 75%)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / share:.3f}"}
    if xla:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla}".strip()
    return subprocess.Popen([sys.executable, "-c", WORKER, args.model, str(args.new_tokens), args.batches,
                             os.path.abspath(checkout), json.dumps(runtime)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def ready(proc: subprocess.Popen, spec: str) -> subprocess.Popen:
    """Waits for the worker's "ready" line; refuses one that imported another checkout's vl2_jax."""
    checkout = side(spec)[0]
    root = os.path.abspath(checkout)
    for line in proc.stdout:
        if line.startswith("ready"):
            imported = os.path.abspath(line.split(maxsplit=1)[1].strip())
            if not imported.startswith(os.path.join(root, "vl2_jax") + os.sep):
                proc.kill()
                raise RuntimeError(f"the worker for {checkout} imported {imported}, not its own vl2_jax")
            return proc
    raise RuntimeError(f"the worker for {checkout} ended before it was ready (exit {proc.wait()})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="the reference checkout (a folder holding vl2_jax/), with settings "
                   "after @ (see above)")
    p.add_argument("--b", required=True, action="append",
                   help="a checkout to compare with it, with settings after @ (again for several, each compared with A)")
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    args = p.parse_args(argv)
    checkouts = {"A": args.a, **{f"B{i + 1}" if len(args.b) > 1 else "B": b for i, b in enumerate(args.b)}}
    procs = {name: start(path, args, len(checkouts)) for name, path in checkouts.items()}
    try:
        workers = {name: ready(proc, checkouts[name]) for name, proc in procs.items()}
    except RuntimeError:
        for proc in procs.values():
            proc.kill()
        raise
    rounds: dict[str, list[dict]] = {name: [] for name in workers}
    for _ in range(args.rounds):
        for name, proc in workers.items():
            proc.stdin.write("go\n")
            proc.stdin.flush()
            rounds[name].append(json.loads(proc.stdout.readline()))
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    others = [name for name in workers if name != "A"]
    print("| metric | A | " + " | ".join(f"{n} | {n} / A" for n in others) + " |")
    print("|---|---|" + "---|---|" * len(others))
    for metric in rounds["A"][0]:
        median = {name: statistics.median(r[metric] for r in rows) for name, rows in rounds.items()}
        a = median["A"]
        for name in others:
            print(json.dumps({"metric": metric, "model": args.model, "a": a, "b": median[name], "side": name,
                              "checkout": checkouts[name], "ratio": median[name] / a, "rounds": args.rounds}),
                  file=sys.stderr)
        print(f"| {metric} | {a:.2f} | " + " | ".join(f"{median[n]:.2f} | {median[n] / a:.3f}" for n in others) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
