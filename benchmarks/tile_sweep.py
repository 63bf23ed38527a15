"""Tile sizes of the MoE kernels, swept at the real sizes. (GPU; ragged: Hopper)

    python benchmarks/tile_sweep.py --kernel matvec [--models tiny,small,base] [--tokens 1] [--dense] [--weights int8]
    python benchmarks/tile_sweep.py --kernel ragged [--models tiny,small,base] [--tokens 1042]
        [--block-m 64,128] [--block-n 64,128] [--block-k 64] [--steps 2,4] [--grid-block-n 1,4]
    python benchmarks/tile_sweep.py --kernel blocked [--models tiny,small,base] [--tokens 1042] [--weights int8]

`--kernel matvec`: the decode step's gathered matrix-vector kernel (`vl2_jax.kernels.gathered_matvec`).
For each model's routed-expert projections at a decode batch of `--tokens` (gate/up: [X, D] rows against
experts [E, D, 2F]; down: [X, F] against [E, F, D]; X = tokens * top-k chosen experts), times every tile
configuration (block_k, block_n, warps, stages, k_split) over 8 different random expert choices (so the
experts' weights do not sit in the L2 cache), host-timed, and checks each against a float32 reference.
The table gives the best configuration per shape, its bandwidth and the library's default.
`--weights int8|fp8` sweeps the kernel on quantized values with per-column scales (`scales_EN`), block_n
128 tried too (a row of 64 one-byte values is half the bytes a bf16 program reads).
`--dense` also times the other batch-1 matrix-vector products (shared experts, attention projections)
as XLA's dot against the kernel with one "expert" (8 weight copies rotated), at the best tiles and at
the library's `dense_matvec_tiles`; with `--weights int8|fp8` the kernel reads quantized values (XLA's dot
still on bf16 weights, what an unquantized model runs). Standalone calls can mislead: whether the kernel wins inside the
decode step is for `python -m vl2_jax.bench` to say.

`--kernel ragged`: the prefill's Mosaic GPU grouped matmul (JAX's `ragged_dot_mgpu`, which
`vl2_jax.kernels.ragged_dot` runs). For each model's expert projections (gate/up [A, D] x [E, D, 2F] and
down [A, F] x [E, F, D], with A = tokens * top-k rows routed evenly, or skewed onto 8 experts as random
weights route image tokens), times every tile configuration (the product of the values given:
block_m, block_n, block_k, steps, grid_block_n) as calls dispatched back to back, checks it against
`lax.ragged_dot` (float32 accumulation), and tabulates the best configuration next to `lax.ragged_dot`.

`--kernel blocked`: prefill's kernel for quantized experts (`vl2_jax.kernels.blocked_matmul`): the same
rows in blocks of `moe.block_rows` rows per expert (at least 16), against int8 (or fp8) values and
column scales, every tile configuration (block_n, block_k, warps, stages) timed as calls dispatched back
to back and checked against a float32 reference; beside it the two ways the grouped matmul runs the
same rows: on bf16 weights (an unquantized model's prefill) and on the values cast to bf16 first (the
cast timed with it: what quantized experts cost without this kernel).

Prints one JSON line per case, then a table.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from vl2_jax import kernels
from vl2_jax.bench import median_time, pipelined_time
from vl2_jax.config import PRESETS

# matvec tiles: block_k, block_n, warps, stages, k_split
MATVEC_CONFIGS = list(itertools.product((128, 256), (32, 64), (4, 8), (4,), (1, 2, 4)))
QUANT_MATVEC_CONFIGS = list(itertools.product((128, 256), (64, 128), (4, 8), (4,), (1, 2, 4)))
ROUNDS = 8
# ragged tiles to try by default: block_m, block_n, block_k, steps, grid_block_n
RAGGED_DEFAULTS = {"block_m": "64,128", "block_n": "64,128", "block_k": "64", "steps": "2,4", "grid_block_n": "1,4"}


def _error_row(row: dict, tiles, e: Exception) -> None:
    """A configuration that does not build or fit is reported, not fatal."""
    print(json.dumps(row | {"tiles": tiles, "error": f"{type(e).__name__}: {str(e)[:200]}"}), flush=True)


# --- matvec: the gathered matrix-vector kernel at decode ---------------------------------------------


def _matvec_case(rows: int, per: int, k: int, n: int, e: int, weights: str = "bf16"):
    """(inputs, weights or quantized values, ids [ROUNDS, rows * per], column scales or None)."""
    kx, kw, ki = jax.random.split(jax.random.key(0), 3)
    inputs = jax.random.normal(kx, (rows, k), jnp.bfloat16)
    w = 0.05 * jax.random.normal(kw, (e, k, n), jnp.float32)
    ids = jnp.stack([jax.random.permutation(kk, e)[: rows * per] for kk in jax.random.split(ki, ROUNDS)])
    if weights == "bf16":
        return inputs, w.astype(jnp.bfloat16), ids.astype(jnp.int32), None
    values, scales = _quantized(w, weights)
    return inputs, values, ids.astype(jnp.int32), scales


def _quantized(w_EKN: jax.Array, weights: str) -> tuple[jax.Array, jax.Array]:
    """Float experts as int8/fp8 values and per-column scales [E, N] (max |w| / 127)."""
    scales = jnp.max(jnp.abs(w_EKN), axis=1) / 127.0
    values = jnp.clip(jnp.round(w_EKN / scales[:, None]), -127, 127)
    return values.astype(jnp.dtype(weights.replace("fp8", "float8_e4m3fn"))), scales


def _time_matvec(inputs, w, ids, per: int, tiles, scales=None) -> float:
    def rounds(inputs, w, ids, scales):
        return sum(kernels.gathered_matvec(inputs, w, ids[i], per, tiles=tiles, scales_EN=scales).sum()
                   for i in range(ROUNDS))
    fn = jax.jit(rounds)
    return 1e3 * median_time(lambda: fn(inputs, w, ids, scales), 5) / ROUNDS


def _matvec_sweep(row: dict, inputs, w, ids, scales, per: int) -> dict:
    dequantized = np.asarray(w[ids[0]], np.float32) * (1 if scales is None else np.asarray(scales)[ids[0]][:, None, :])
    want = np.einsum("ak,akn->an", np.asarray(inputs, np.float32)[np.arange(ids.shape[1]) // per], dequantized)
    k, n = w.shape[1:]
    results = {}
    configs = MATVEC_CONFIGS if scales is None else QUANT_MATVEC_CONFIGS
    for tiles in [t for t in configs if k % (t[0] * t[4]) == 0 and n % t[1] == 0]:
        try:
            got = np.asarray(kernels.gathered_matvec(inputs, w, ids[0], per, tiles=tiles, scales_EN=scales))
            err = float(np.abs(got - want).max() / np.abs(want).max())
            ms = _time_matvec(inputs, w, ids, per, tiles, scales)
        except Exception as e:  # noqa: BLE001
            _error_row(row, tiles, e)
            continue
        gbps = ids.shape[1] * k * n * w.dtype.itemsize / (ms * 1e-3) / 1e9
        results[tiles] = (ms, gbps, err)
        print(json.dumps(row | {"tiles": tiles, "ms": ms, "gb_per_s": gbps, "rel_err": err}), flush=True)
    best = min(results, key=lambda t: results[t][0])
    default = (*kernels.matvec_tiles(k, n, scales is not None), 1)[:5]
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


def _dense(model: str, name: str, k: int, n: int, weights: str = "bf16") -> dict:
    """XLA's batch-1 dot on bf16 weights against the kernel with E = 1 on `weights`, over 8 rotated
    weight copies."""
    x = jax.random.normal(jax.random.key(1), (1, k), jnp.bfloat16)
    w = 0.05 * jax.random.normal(jax.random.key(2), (ROUNDS, k, n), jnp.float32)
    ws = w.astype(jnp.bfloat16)
    xla = jax.jit(lambda x, ws: sum(jnp.einsum("mk,kn->mn", x, ws[i]).sum() for i in range(ROUNDS)))
    row = {"model": model, "dense": name, "weights": weights, "k": k, "n": n,
           "xla_ms": 1e3 * median_time(lambda: xla(x, ws), 5) / ROUNDS}
    values, scales = (ws, None) if weights == "bf16" else _quantized(w, weights)
    zero = jnp.zeros((1,), jnp.int32)

    def kernel_ms(tiles) -> float:
        fn = jax.jit(lambda x, vs, ss: sum(kernels.gathered_matvec(
            x, vs[i][None], zero, tiles=tiles, scales_EN=None if ss is None else ss[i][None]).sum() for i in range(ROUNDS)))
        return 1e3 * median_time(lambda: fn(x, values, scales), 5) / ROUNDS

    configs = MATVEC_CONFIGS if scales is None else QUANT_MATVEC_CONFIGS
    for tiles in [t for t in configs if k % (t[0] * t[4]) == 0 and n % t[1] == 0 and t[2:4] == (4, 4)]:
        try:
            ms = kernel_ms(tiles)
        except Exception as e:  # noqa: BLE001
            _error_row(row, tiles, e)
            continue
        if ms < row.get("kernel_ms", float("inf")):
            row |= {"kernel_ms": ms, "kernel_tiles": tiles}
    library = kernels.dense_matvec_tiles(k, n)
    try:
        row |= {"library_ms": kernel_ms(library), "library_tiles": library}
    except Exception as e:  # noqa: BLE001
        _error_row(row, library, e)
    print(json.dumps(row), flush=True)
    return row


def matvec(models: list[str], tokens: int, dense: bool, weights: str = "bf16") -> None:
    table, dense_rows = [], []
    for model in models:
        c = PRESETS[model].language
        e, d, f, x = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
        for proj, rows, per, k, n in (("gate_up", tokens, x, d, 2 * f), ("down", tokens * x, 1, f, d)):
            row = {"model": model, "proj": proj, "weights": weights, "rows": rows * per, "k": k, "n": n}
            table.append(_matvec_sweep(row, *_matvec_case(rows, per, k, n, e, weights), per))
        if dense:
            dense_rows += [_dense(model, *shape, weights) for shape in _dense_shapes(c)]
    print(f"\n{jax.devices()[0].device_kind}, JAX {jax.__version__}, {tokens} token(s), {weights} weights")
    print("| model | projection | rows x K x N | best (block_k, block_n, warps, stages, k_split) | ms | GB/s | default ms |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} | {r['proj']} | {r['rows']} x {r['k']} x {r['n']} | {r['best']} | {r['best_ms']:.4f} | "
              f"{r['best_gb_per_s']:.0f} | {r['default_ms']:.4f} |")
    if dense_rows:
        print("\n| model | batch-1 product | K x N | XLA ms | kernel ms (best tiles) | kernel ms (library tiles) |")
        print("|---|---|---|---|---|---|")
        for r in dense_rows:
            print(f"| {r['model']} | {r['dense']} | {r['k']} x {r['n']} | {r['xla_ms']:.4f} | "
                  f"{r.get('kernel_ms', float('nan')):.4f} {r.get('kernel_tiles', '')} | "
                  f"{r.get('library_ms', float('nan')):.4f} {r.get('library_tiles', '')} |")


# --- ragged: the Mosaic GPU grouped matmul at prefill ------------------------------------------------


def _ragged_case(m: int, k: int, n: int, e: int, skewed: bool):
    kx, kw, ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (0.05 * jax.random.normal(kw, (e, k, n), jnp.float32)).astype(jnp.bfloat16)
    p = jnp.ones(e).at[:8].set(100.0) if skewed else jnp.ones(e)
    ids = jnp.sort(jax.random.categorical(ks, jnp.log(p), shape=(m,)))
    ids = jnp.where(jnp.arange(m) >= m - 4, e, ids)  # 4 rows in no group, as the MoE's padding
    sizes = jnp.sum(ids[:, None] == jnp.arange(e), 0, dtype=jnp.int32)
    return x, w, sizes


def _ragged_sweep(row: dict, e: int, configs) -> dict:
    """Every configuration (block_m, block_n, block_k, steps, grid_block_n) on one shape: JSON lines,
    then the row with the best one."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    m, kk, n = row["m"], row["k"], row["n"]
    x, w, sizes = _ragged_case(m, kk, n, e, row["skewed"])
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
        except Exception as ex:  # noqa: BLE001
            _error_row(row, case["config"], ex)
            continue
        print(json.dumps({**case, "ms": ms, "max_rel_err": err}), flush=True)
        if not best or ms < best["ms"]:
            best = {"config": case["config"], "ms": ms, "tflops": 2 * m * kk * n / ms / 1e9}
    return {**row, **best}


def ragged(models: list[str], tokens: int, configs) -> None:
    rows = []
    for model in models:
        c = PRESETS[model].language
        e, d, f, k = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
        m = -(-tokens * k // 8) * 8
        rows += [_ragged_sweep({"model": model, "proj": proj, "m": m, "k": kk, "n": n, "skewed": skewed}, e, configs)
                 for proj, (kk, n) in (("gate_up", (d, 2 * f)), ("down", (f, d))) for skewed in (False, True)]
    print(f"\n{jax.devices()[0].device_kind}, JAX {jax.__version__}, {tokens} tokens; "
          "config = block_m, block_n, block_k, steps, grid_block_n")
    print("| model | projection | routing | lax.ragged_dot ms | Mosaic best ms | TFLOP/s | config |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['proj']} | {'skewed' if r['skewed'] else 'even'} | {r['lax_ragged_dot_ms']:.3f} | "
              f"{r.get('ms', float('nan')):.3f} | {r.get('tflops', 0):.0f} | {r.get('config')} |")


# --- blocked: prefill's kernel for quantized experts -------------------------------------------------

BLOCKED_CONFIGS = list(itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (3, 4)))


def _blocked_case(a: int, k: int, n: int, e: int, weights: str):
    """Routed rows grouped as the blocked dispatch groups them, and the same rows for the grouped matmul:
    (xs [Z, M, K], expert [Z], used [Z], values [E, K, N], scales [E, N], x [A', K], sizes [E], w bf16)."""
    from vl2_jax.kernels import BLOCKED_ROWS
    from vl2_jax.modules.moe import block_rows

    kx, kw, ks = jax.random.split(jax.random.key(0), 3)
    sizes = np.bincount(np.asarray(jax.random.randint(ks, (a,), 0, e)), minlength=e)
    m = max(block_rows(a, e), BLOCKED_ROWS[0])
    per = -(-sizes // m)
    z = -(-a // m) + e
    expert = np.minimum(np.searchsorted(np.cumsum(per), np.arange(z), side="right"), e - 1).astype(np.int32)
    used = (np.arange(z) < per.sum()).astype(np.int32)
    xs = jax.random.normal(kx, (z, m, k), jnp.bfloat16)
    w = 0.05 * jax.random.normal(kw, (e, k, n), jnp.float32)
    values, scales = _quantized(w, weights)
    rows = -(-a // 8) * 8
    x = jax.random.normal(kx, (rows, k), jnp.bfloat16)
    return xs, jnp.asarray(expert), jnp.asarray(used), values, scales, x, jnp.asarray(sizes, jnp.int32), w.astype(jnp.bfloat16)


def _blocked_sweep(row: dict, e: int, weights: str) -> dict:
    xs, expert, used, values, scales, x, sizes, w16 = _blocked_case(row["a"], row["k"], row["n"], e, weights)
    ex, u = np.asarray(expert), np.asarray(used).astype(bool)
    dequantized = np.asarray(values, np.float32) * np.asarray(scales)[:, None, :]
    probe = np.flatnonzero(u)[:: max(1, u.sum() // 8)]  # a few used blocks checked against float32
    want = np.einsum("zmk,zkn->zmn", np.asarray(xs, np.float32)[probe], dequantized[ex[probe]])
    grouped = jax.jit(lambda x, w: kernels.ragged_dot(x, w, sizes))
    widened = jax.jit(lambda x, v: kernels.ragged_dot(x, v.astype(jnp.bfloat16), sizes))
    row = {**row, "blocks": int(u.sum()), "rows_per_block": xs.shape[1],
           "grouped_bf16_ms": 1e3 * pipelined_time(lambda: grouped(x, w16), calls=5, repeats=3),
           "grouped_widened_ms": 1e3 * pipelined_time(lambda: widened(x, values), calls=5, repeats=3)}
    best = {}
    for tiles in BLOCKED_CONFIGS:
        if row["k"] % tiles[1] or row["n"] % tiles[0]:
            continue
        fn = jax.jit(functools.partial(kernels.blocked_matmul, tiles=tiles))
        try:
            out = np.asarray(fn(xs, values, scales, expert, used), np.float32)[probe]
            err = float(np.abs(out - want).max() / np.abs(want).max())
            ms = 1e3 * pipelined_time(lambda fn=fn: fn(xs, values, scales, expert, used), calls=5, repeats=3)
        except Exception as ex_:  # noqa: BLE001
            _error_row(row, tiles, ex_)
            continue
        print(json.dumps({**row, "tiles": tiles, "ms": ms, "max_rel_err": err}), flush=True)
        if not best or ms < best["ms"]:
            best = {"tiles": tiles, "ms": ms, "max_rel_err": err}
    return {**row, **best}


def blocked(models: list[str], tokens: int, weights: str) -> None:
    rows = []
    for model in models:
        c = PRESETS[model].language
        e, d, f, k = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
        rows += [_blocked_sweep({"model": model, "proj": proj, "a": tokens * k, "k": kk, "n": n}, e, weights)
                 for proj, (kk, n) in (("gate_up", (d, 2 * f)), ("down", (f, d)))]
    print(f"\n{jax.devices()[0].device_kind}, JAX {jax.__version__}, {tokens} tokens, {weights} values; "
          f"tiles = block_n, block_k, warps, stages (default {kernels.BLOCKED_TILES})")
    print("| model | projection | blocks x rows | grouped, bf16 ms | grouped, widened ms | blocked best ms | tiles |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['proj']} | {r['blocks']} x {r['rows_per_block']} | {r['grouped_bf16_ms']:.3f} | "
              f"{r['grouped_widened_ms']:.3f} | {r.get('ms', float('nan')):.3f} | {r.get('tiles')} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", required=True, choices=["matvec", "ragged", "blocked"],
                   help="matvec: the decode step's gathered matrix-vector kernel; ragged: the prefill's grouped "
                        "matmul; blocked: prefill's kernel for quantized experts")
    p.add_argument("--models", default="tiny,small,base")
    p.add_argument("--tokens", type=int, default=None,
                   help="matvec: decode batch (rows = tokens * top-k; default 1); ragged, blocked: prompt tokens "
                        "(default 1042)")
    p.add_argument("--dense", action="store_true", help="matvec: also time the other batch-1 matrix-vector products")
    p.add_argument("--weights", default="bf16", choices=["bf16", "int8", "fp8"],
                   help="matvec: the experts' weights (int8/fp8: quantized values with column scales); blocked: "
                        "the values (default int8)")
    ints = lambda text: [int(v) for v in text.split(",")]
    for name, default in RAGGED_DEFAULTS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=ints, default=None,
                       help=f"ragged: values to try (default {default})")
    args = p.parse_args(argv)
    models = args.models.split(",")
    given = [f"--{n.replace('_', '-')}" for n in RAGGED_DEFAULTS if getattr(args, n) is not None]
    if args.kernel == "blocked":
        if given or args.dense:
            p.error(f"{', '.join(given or ['--dense'])} do not go with --kernel blocked")
        blocked(models, 1042 if args.tokens is None else args.tokens, "int8" if args.weights == "bf16" else args.weights)
    elif args.kernel == "matvec":
        if given:
            p.error(f"{', '.join(given)} go with --kernel ragged")
        matvec(models, 1 if args.tokens is None else args.tokens, args.dense, args.weights)
    else:
        if args.dense or args.weights != "bf16":
            p.error("--dense and --weights go with --kernel matvec")
        values = [ints(d) if getattr(args, n) is None else getattr(args, n) for n, d in RAGGED_DEFAULTS.items()]
        ragged(models, 1042 if args.tokens is None else args.tokens, list(itertools.product(*values)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
