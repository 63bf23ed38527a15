"""Two checkouts of vl2-jax timed side by side, alternating, on the same GPU: did a change move speed?

    git worktree add /tmp/old <commit>           # or: git archive <commit> vl2_jax | tar -x -C /tmp/old
    python benchmarks/ab_compare.py --a /tmp/old --b . --model random:tiny --rounds 5

Each checkout runs in its own worker process (its `vl2_jax` first on `sys.path`, checked), loads the model and warms it
up once; then the driver asks A, B, A, B, ... for one round each: the first token of the benchmark's
image prompt (768 px, one sentence) and decode speed at batch 1 and 8 (`--new-tokens`, EOS ignored),
computed the same way for both (rows x (new tokens - 1) / decode seconds). Medians per checkout and
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
import numpy as np
from PIL import Image
try:
    from vl2_jax import load_model
    model = load_model(sys.argv[1], "bfloat16")
except ImportError:
    from vl2_jax.hub import load_model
    model = load_model(sys.argv[1], "bfloat16")
new, batches = int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 768, 3), dtype=np.uint8))
one = model.processor([{"role": "user", "content": "<image>\nDescribe this image in detail."}], [image])
single = model.processor.batchify([one])
runs = {b: model.processor.batchify([one] * b) for b in batches}

def round_():
    row = {"ttft_ms": 1e3 * model.generate(single, max_new_tokens=1).ttft_s}
    for b, batch in runs.items():
        r = model.generate(batch, max_new_tokens=new, ignore_eos=True)
        row[f"decode_b{b}"] = b * (new - 1) / r.decode_s
    return row

round_(); round_()  # compile, then one untimed round
import vl2_jax
print("ready", vl2_jax.__file__, flush=True)
for line in sys.stdin:
    print(json.dumps(round_()), flush=True)
"""


def worker(checkout: str, args) -> subprocess.Popen:
    # two processes share the GPU: each may take under half of its memory (JAX's default takes 75%)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}
    root = os.path.abspath(checkout)
    proc = subprocess.Popen([sys.executable, "-c", WORKER, args.model, str(args.new_tokens), args.batches, root],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
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
    p.add_argument("--a", required=True, help="the reference checkout (a folder holding vl2_jax/)")
    p.add_argument("--b", required=True, help="the checkout to compare with it")
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    args = p.parse_args(argv)
    rounds: dict[str, list[dict]] = {"a": [], "b": []}
    workers = {}
    for name in ("a", "b"):  # one at a time: each holds its own copy of the weights
        workers[name] = worker(getattr(args, name), args)
    for _ in range(args.rounds):
        for name, proc in workers.items():
            proc.stdin.write("go\n")
            proc.stdin.flush()
            rounds[name].append(json.loads(proc.stdout.readline()))
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    print("| metric | A | B | B / A |\n|---|---|---|---|")
    for metric in rounds["a"][0]:
        a = statistics.median(r[metric] for r in rounds["a"])
        b = statistics.median(r[metric] for r in rounds["b"])
        print(json.dumps({"metric": metric, "model": args.model, "a": a, "b": b, "ratio": b / a, "rounds": args.rounds}),
              file=sys.stderr)
        print(f"| {metric} | {a:.2f} | {b:.2f} | {b / a:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
