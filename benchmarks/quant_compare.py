"""int8 and fp8 weights against unquantized ones (bf16 on a GPU): decode speed, first token, memory,
and how far the logits move.

    python benchmarks/quant_compare.py --model random:tiny                      # on a GPU: none (bf16), int8, fp8
    python benchmarks/quant_compare.py --model random:small --quants int8       # speed and memory only
    python benchmarks/quant_compare.py --model random:test --max-seq-len 1024   # CPU smoke (float32)

Each quantization runs in a process of its own (so that `memory_stats()`'s peak is that model's alone):
it loads `--model` (random weights drawn from the same seed, so every run quantizes the same draw),
answers one 768 px image prompt three times with 128 new tokens (EOS ignored, max_batch 1) and reports
the third run's first token and decode speed, the parameters' bytes, the peak device memory, and the
compiled decode program's `cost_analysis` bytes beside the language model's weight bytes, and the
expert kernels that ran (quantized experts' kernels pass a GPU self-check of their own, else the plain
path runs). With none in
`--quants` (first), the full-forward logits of the prompt of every other run are compared with its:
cosine similarity per position (min, mean) and how often the top token agrees. Prints one JSON line per
run, then a table. bf16 on accelerators, float32 on a CPU (whose dot products refuse bf16 x bf16 ->
float32 under int8).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def one_run(spec: str, quant: str, max_seq_len: int, logits_dir: Path) -> dict:
    """Loads, times and measures one quantization (in this process) -> its JSON row."""
    import jax
    from PIL import Image

    from vl2_jax import load
    from vl2_jax.bench import active_kernels
    from vl2_jax.config import Runtime
    from vl2_jax.quant import QTYPES

    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    t0 = time.perf_counter()
    m = load.load_model(spec, dtype, runtime=Runtime(max_batch=1, max_seq_len=max_seq_len),
                        quant=None if quant == "none" else quant)
    load_s = time.perf_counter() - t0
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 768, 3), dtype=np.uint8))
    batch = m.processor.batchify([m.processor([{"role": "user", "content": "<image>\nDescribe the image."}], [image])])
    runs = [m.generate(batch, max_new_tokens=128, ignore_eos=True) for _ in range(3)]
    last = runs[-1]
    engine = m.engine
    state, lm = m.take_state(), engine.language_params(m.params)
    # the first key bucket: 512 keys (past a capacity of 512), or the capacity where the decode attention
    # kernel runs (it reads each slot's own keys; XLA's cost analysis counts the whole cache it is handed)
    decode = engine._decode.lower(lm, state, np.zeros((engine.max_batch,), bool), 1, engine.decode_key_buckets[0],
                                  True).compile()
    m.give_state(state)
    cost = decode.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    row = {"model": spec, "quant": quant, "dtype": dtype, "load_s": round(load_s, 1),
           "ttft_ms": round(last.ttft_s * 1e3, 1), "decode_tokens_per_s": round(last.decode_tokens_per_s, 1),
           "param_gb": round(sum(x.nbytes for x in jax.tree.leaves(m.params)) / 1e9, 3),
           "language_param_gb": round(sum(x.nbytes for x in jax.tree.leaves(lm)) / 1e9, 3),
           "peak_gb": round((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 1e9, 2),
           "decode_bytes_accessed_gb": round(cost.get("bytes accessed", -1) / 1e9, 3),
           "same_tokens_each_run": runs[0].token_ids == last.token_ids,
           "kernels": active_kernels(m.cfg.language, m.dtype, Runtime(), QTYPES.get(quant))}
    logits = np.asarray(m.logits(batch)[0], np.float32)
    np.save(logits_dir / f"{quant}.npy", logits)
    reference = logits_dir / "none.npy"
    if quant != "none" and reference.exists():
        ref = np.load(reference)
        cos = (logits * ref).sum(-1) / (np.linalg.norm(logits, axis=-1) * np.linalg.norm(ref, axis=-1))
        row.update(cosine_min=round(float(cos.min()), 5), cosine_mean=round(float(cos.mean()), 5),
                   top1_agreement=round(float(np.mean(logits.argmax(-1) == ref.argmax(-1))), 4), positions=len(cos))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--quants", default="none,int8,fp8", help="comma-separated, of none, int8, fp8 (default: all)")
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="tokens per slot (default 2048; at most the model's context: random:test's is 1024)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # (a child process: one quantization)
    p.add_argument("--logits-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        from vl2_jax.errors import VL2Error

        try:
            print(json.dumps(one_run(args.model, args.one, args.max_seq_len, Path(args.logits_dir))), flush=True)
        except VL2Error as e:  # (a bad model or setting: its one line, which the parent passes on)
            sys.exit(f"error: {e}")
        return
    quants = [q for q in args.quants.split(",") if q]
    if unknown := set(quants) - {"none", "int8", "fp8"}:
        p.error(f"unknown quantization {sorted(unknown)}; use none, int8 or fp8")
    rows = []
    with tempfile.TemporaryDirectory() as logits_dir:
        for quant in quants:
            r = subprocess.run([sys.executable, __file__, "--model", args.model, "--max-seq-len", str(args.max_seq_len),
                                "--one", quant, "--logits-dir", logits_dir], capture_output=True, text=True)
            if r.returncode:
                errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
                sys.exit(f"{quant}: {errors[-1]}" if errors else f"{quant} failed:\n{r.stderr[-3000:]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| quant | decode tok/s | first token ms | params GB | peak GB | decode bytes GB | cosine min / mean | top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cos = f"{r['cosine_min']} / {r['cosine_mean']}" if "cosine_min" in r else ""
        print(f"| {r['quant']} | {r['decode_tokens_per_s']} | {r['ttft_ms']} | {r['param_gb']} | {r['peak_gb']} | "
              f"{r['decode_bytes_accessed_gb']} | {cos} | {r.get('top1_agreement', '')} |")


if __name__ == "__main__":
    main()
