"""How often a greedy answer is the same alone and beside other requests (continuous batching).

    python benchmarks/alone_vs_together.py --model random:tiny                # on a GPU, bf16
    python benchmarks/alone_vs_together.py --model random:test --requests 4 --new-tokens 8   # CPU smoke

`--requests` conversations (every other one with a random image of 200-900 px a side, text of growing
length) are answered one by one with `model.generate`, then all in one call over `--max-batch` slots,
where they join and leave slots as the server's requests do. Greedy, EOS ignored. Prints one JSON line:
how many answers are identical and, per request, the first token where they differ (null: none).
In float32 every answer must be identical (the tests check it); in bf16 a batch runs other kernels and
sums in another order, and on random weights near-tied routing choices flip (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import jax
import numpy as np
from PIL import Image

from vl2_jax import load
from vl2_jax.config import Runtime


def conversations(processor, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    words = "the a cat dog image shows what where why colour large small red blue green tree house".split()
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words, 5 + 3 * i)) + "?"
        if i % 2:
            w, h = int(rng.integers(200, 900)), int(rng.integers(200, 900))
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            out.append(processor([{"role": "user", "content": "<image>\n" + text}], [image]))
        else:
            out.append(processor([{"role": "user", "content": text}]))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=2048)
    args = p.parse_args(argv)
    start = time.perf_counter()
    model = load.load_model(args.model, args.dtype, runtime=Runtime(max_batch=args.max_batch, max_seq_len=args.max_seq_len))
    proc = model.processor
    convs = conversations(proc, args.requests)
    alone = [model.generate(proc.batchify([c]), max_new_tokens=args.new_tokens, ignore_eos=True).token_ids[0]
             for c in convs]
    together = model.generate(proc.batchify(convs), max_new_tokens=args.new_tokens, ignore_eos=True).token_ids
    first = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(alone, together)]
    print(json.dumps({
        "metric": "alone_vs_together", "model": args.model, "dtype": str(model.dtype), "requests": args.requests,
        "new_tokens": args.new_tokens, "max_batch": args.max_batch, "identical": sum(f is None for f in first),
        "first_difference": first, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "date": datetime.date.today().isoformat(), "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
