"""Tile sizes of the Mosaic GPU grouped matmul (`vl2_jax.kernels.ragged_dot`) at prefill shapes. (Hopper)

    python benchmarks/ragged_dot_tiles.py [--models tiny,small,base] [--tokens 1042]
        [--block-m 64,128] [--block-n 64,128] [--block-k 64] [--steps 2,4] [--grid-block-n 1,4]

For each model's expert projections (gate/up [A, D] x [E, D, 2F] and down [A, F] x [E, F, D], with
A = tokens * top-k rows routed evenly or skewed onto 8 experts, as random weights route image tokens),
times every tile configuration (the product of the values given) of JAX's `ragged_dot_mgpu` kernel as
calls dispatched back to back, checks it against `lax.ragged_dot` (float32 accumulation), and prints
one JSON line per case and a table of the best configuration per shape next to `lax.ragged_dot`.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

from vl2_jax.bench import pipelined_time
from vl2_jax.config import PRESETS


def _case(m: int, k: int, n: int, e: int, skewed: bool):
    kx, kw, ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (0.05 * jax.random.normal(kw, (e, k, n), jnp.float32)).astype(jnp.bfloat16)
    p = jnp.ones(e).at[:8].set(100.0) if skewed else jnp.ones(e)
    ids = jnp.sort(jax.random.categorical(ks, jnp.log(p), shape=(m,)))
    ids = jnp.where(jnp.arange(m) >= m - 4, e, ids)  # 4 rows in no group, as the MoE's padding
    sizes = jnp.sum(ids[:, None] == jnp.arange(e), 0, dtype=jnp.int32)
    return x, w, sizes


def _sweep(row: dict, e: int, configs) -> dict:
    """Every configuration (block_m, block_n, block_k, steps, grid_block_n) on one shape: JSON lines,
    then the row with the best one."""
    m, kk, n = row["m"], row["k"], row["n"]
    x, w, sizes = _case(m, kk, n, e, row["skewed"])
    ref_fn = jax.jit(lambda x, w, s: jax.lax.ragged_dot(x, w, s, preferred_element_type=jnp.float32))
    ref = ref_fn(x, w, sizes)
    covered, scale = m - 4, float(jnp.max(jnp.abs(ref)))
    row = {**row, "lax_ragged_dot_ms": 1e3 * pipelined_time(lambda: ref_fn(x, w, sizes), calls=5, repeats=3)}
    best = {}
    for bm, bn, bk, steps, gbn in configs:
        if n % bn or kk % bk:
            continue
        fn = jax.jit(functools.partial(ragged_dot_mgpu.ragged_dot, block_m=bm, block_n=bn, block_k=bk,
                                       max_concurrent_steps=steps, grid_block_n=gbn))
        case = {**row, "config": [bm, bn, bk, steps, gbn]}
        try:
            out = fn(x, w, group_sizes=sizes)
            err = float(jnp.max(jnp.abs(out[:covered].astype(jnp.float32) - ref[:covered]))) / scale
            ms = 1e3 * pipelined_time(lambda fn=fn: fn(x, w, group_sizes=sizes))
        except Exception as ex:  # noqa: BLE001 - a configuration that does not fit is reported and skipped
            print(json.dumps({**case, "error": str(ex)[:200]}), flush=True)
            continue
        print(json.dumps({**case, "ms": ms, "max_rel_err": err}), flush=True)
        if not best or ms < best["ms"]:
            best = {"config": case["config"], "ms": ms, "tflops": 2 * m * kk * n / ms / 1e9}
    return {**row, **best}


def run(model: str, tokens: int, configs) -> list[dict]:
    c = PRESETS[model].language
    e, d, f, k = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
    m = -(-tokens * k // 8) * 8
    return [_sweep({"model": model, "proj": proj, "m": m, "k": kk, "n": n, "skewed": skewed}, e, configs)
            for proj, (kk, n) in (("gate_up", (d, 2 * f)), ("down", (f, d))) for skewed in (False, True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,small,base")
    p.add_argument("--tokens", type=int, default=1042)
    ints = lambda text: [int(v) for v in text.split(",")]
    for name, default in (("block-m", "64,128"), ("block-n", "64,128"), ("block-k", "64"), ("steps", "2,4"),
                          ("grid-block-n", "1,4")):
        p.add_argument(f"--{name}", type=ints, default=ints(default), help=f"values to try (default {default})")
    args = p.parse_args()
    configs = list(itertools.product(args.block_m, args.block_n, args.block_k, args.steps, args.grid_block_n))
    rows = [r for model in args.models.split(",") for r in run(model, args.tokens, configs)]
    print(f"\n{jax.devices()[0].device_kind}, JAX {jax.__version__}, {args.tokens} tokens; "
          "config = block_m, block_n, block_k, steps, grid_block_n")
    print("| model | projection | routing | lax.ragged_dot ms | Mosaic best ms | TFLOP/s | config |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['proj']} | {'skewed' if r['skewed'] else 'even'} | {r['lax_ragged_dot_ms']:.3f} | "
              f"{r.get('ms', float('nan')):.3f} | {r.get('tflops', 0):.0f} | {r.get('config')} |")


if __name__ == "__main__":
    main()
