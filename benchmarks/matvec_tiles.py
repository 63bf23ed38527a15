"""Tiles of the decode step's gathered matrix-vector kernel (`vl2_jax.kernels.gathered_matvec`). (GPU)

    python benchmarks/matvec_tiles.py [--models tiny,small,base] [--tokens 1] [--dense]

For each model's routed-expert projections at batch-1 decode (gate/up: [X, D] rows against experts
[E, D, 2F]; down: [X, F] against [E, F, D]; X = top-k chosen experts), times every tile configuration
(block_k, block_n, warps, stages, k_split) over 8 different random expert choices (so the experts'
weights do not sit in the L2 cache), checks it against a float32 reference, and prints one JSON line
per case, then a table of the best configuration per shape with its bandwidth and the default's.

With --dense it also times the batch-1 matrix-vector products that XLA runs today (shared experts,
attention projections) as XLA's dot against the kernel with one "expert" (8 weight copies rotated).
Standalone calls mislead there: the kernel won most of them on 2026-11-29, yet small's decode step
ran slower with it on those products (BENCHMARKS.md, fifth session), so the library keeps XLA's.
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from vl2_jax import kernels
from vl2_jax.bench import median_time
from vl2_jax.config import PRESETS

# block_k, block_n, warps, stages, k_split
CONFIGS = list(itertools.product((128, 256), (32, 64), (4, 8), (4,), (1, 2, 4)))
ROUNDS = 8


def _case(rows: int, per: int, k: int, n: int, e: int):
    kx, kw, ki = jax.random.split(jax.random.key(0), 3)
    inputs = jax.random.normal(kx, (rows, k), jnp.bfloat16)
    w = (0.05 * jax.random.normal(kw, (e, k, n), jnp.float32)).astype(jnp.bfloat16)
    ids = jnp.stack([jax.random.permutation(kk, e)[: rows * per] for kk in jax.random.split(ki, ROUNDS)])
    return inputs, w, ids.astype(jnp.int32)


def _time_kernel(inputs, w, ids, per: int, tiles) -> float:
    def rounds(inputs, w, ids):
        return sum(kernels.gathered_matvec(inputs, w, ids[i], per, tiles=tiles).sum() for i in range(ROUNDS))
    fn = jax.jit(rounds)
    return 1e3 * median_time(lambda: fn(inputs, w, ids), 5) / ROUNDS


def _sweep(row: dict, inputs, w, ids, per: int) -> dict:
    want = np.einsum("ak,akn->an", np.asarray(inputs, np.float32)[np.arange(ids.shape[1]) // per],
                     np.asarray(w[ids[0]], np.float32))
    k, n = w.shape[1:]
    results = {}
    for tiles in [t for t in CONFIGS if k % (t[0] * t[4]) == 0 and n % t[1] == 0]:
        try:
            got = np.asarray(kernels.gathered_matvec(inputs, w, ids[0], per, tiles=tiles))
            err = float(np.abs(got - want).max() / np.abs(want).max())
            ms = _time_kernel(inputs, w, ids, per, tiles)
        except Exception as e:  # noqa: BLE001 - a configuration that does not build is reported, not fatal
            print(json.dumps(row | {"tiles": tiles, "error": f"{type(e).__name__}: {str(e)[:120]}"}), flush=True)
            continue
        gbps = ids.shape[1] * k * n * w.dtype.itemsize / (ms * 1e-3) / 1e9
        results[tiles] = (ms, gbps, err)
        print(json.dumps(row | {"tiles": tiles, "ms": ms, "gb_per_s": gbps, "rel_err": err}), flush=True)
    best = min(results, key=lambda t: results[t][0])
    default = (kernels.matvec_block_k(k), kernels.MATVEC_BLOCK_N, kernels.MATVEC_WARPS, kernels.MATVEC_STAGES, 1)
    return row | {"best": best, "best_ms": results[best][0], "best_gb_per_s": results[best][1],
                  "best_rel_err": results[best][2], "default_ms": results.get(default, (float("nan"),))[0]}


def _dense_shapes(c) -> list[tuple[str, int, int]]:
    """(name, K, N) of a decoder layer's batch-1 matrix-vector products outside the routed experts."""
    d, h = c.hidden_size, c.num_attention_heads
    shapes = []
    if c.n_shared_experts:
        s = c.n_shared_experts * c.moe_intermediate_size
        shapes += [("shared gate/up", d, 2 * s), ("shared down", s, d)]
    if c.use_mla:
        shapes += [("q", d, h * (c.qk_nope_head_dim + c.qk_rope_head_dim)),
                   ("kv_a", d, c.kv_lora_rank + c.qk_rope_head_dim), ("o", h * c.v_head_dim, d)]
    else:
        shapes += [("q", d, h * c.head_dim), ("kv", d, 2 * c.num_key_value_heads * c.head_dim), ("o", h * c.head_dim, d)]
    return shapes


def _dense(model: str, name: str, k: int, n: int) -> dict:
    """XLA's batch-1 dot against the kernel with E = 1, over 8 rotated weight copies."""
    x = jax.random.normal(jax.random.key(1), (1, k), jnp.bfloat16)
    ws = (0.05 * jax.random.normal(jax.random.key(2), (ROUNDS, k, n), jnp.float32)).astype(jnp.bfloat16)
    xla = jax.jit(lambda x, ws: sum(jnp.einsum("mk,kn->mn", x, ws[i]).sum() for i in range(ROUNDS)))
    row = {"model": model, "dense": name, "k": k, "n": n,
           "xla_ms": 1e3 * median_time(lambda: xla(x, ws), 5) / ROUNDS}
    zero = jnp.zeros((1,), jnp.int32)
    for tiles in [t for t in CONFIGS if k % (t[0] * t[4]) == 0 and n % t[1] == 0 and t[2:4] == (4, 4)]:
        fn = jax.jit(lambda x, ws, tiles=tiles: sum(
            kernels.gathered_matvec(x, ws[i][None], zero, tiles=tiles).sum() for i in range(ROUNDS)))
        try:
            ms = 1e3 * median_time(lambda fn=fn: fn(x, ws), 5) / ROUNDS
        except Exception as e:  # noqa: BLE001
            print(json.dumps(row | {"tiles": tiles, "error": f"{type(e).__name__}: {str(e)[:120]}"}), flush=True)
            continue
        if ms < row.get("kernel_ms", float("inf")):
            row |= {"kernel_ms": ms, "kernel_tiles": tiles}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,small,base")
    p.add_argument("--tokens", type=int, default=1, help="decode batch (rows = tokens * top-k)")
    p.add_argument("--dense", action="store_true", help="also time the other batch-1 matrix-vector products")
    args = p.parse_args(argv)
    table, dense = [], []
    for model in args.models.split(","):
        c = PRESETS[model].language
        e, d, f, x = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
        for proj, rows, per, k, n in (("gate_up", args.tokens, x, d, 2 * f), ("down", args.tokens * x, 1, f, d)):
            row = {"model": model, "proj": proj, "rows": rows * per, "k": k, "n": n}
            table.append(_sweep(row, *_case(rows, per, k, n, e), per))
        if args.dense:
            dense += [_dense(model, *shape) for shape in _dense_shapes(c)]
    print("| model | projection | rows x K x N | best (block_k, block_n, warps, stages, k_split) | ms | GB/s | default ms |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} | {r['proj']} | {r['rows']} x {r['k']} x {r['n']} | {r['best']} | {r['best_ms']:.4f} | "
              f"{r['best_gb_per_s']:.0f} | {r['default_ms']:.4f} |")
    if dense:
        print("\n| model | batch-1 product | K x N | XLA ms | kernel ms (best tiles) |")
        print("|---|---|---|---|---|")
        for r in dense:
            print(f"| {r['model']} | {r['dense']} | {r['k']} x {r['n']} | {r['xla_ms']:.4f} | "
                  f"{r.get('kernel_ms', float('nan')):.4f} {r.get('kernel_tiles', '')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
