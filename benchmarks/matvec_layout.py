"""Batch-1 decode is matrix-vector work: which weight layout does XLA run near HBM speed? (GPU)

    python benchmarks/matvec_layout.py

Times `x [1, D] @ W` with W stored [D, F] (our einsum-natural layout: XLA reduces over the major axis)
and stored [F, D] (PyTorch's [out, in]: reduction over the minor axis), for the tiny/small shapes of a
dense MLP, of the 6 gathered experts and of the LM head. Each op runs 100 times inside one jitted
`fori_loop`, each iteration depending on the last, so dispatch does not count. Prints one JSON line per
case and a table: microseconds per matvec and the bandwidth it reaches reading W once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

REPS = 100


def bench(spec: str, x_shape, w_shape, take: int) -> float:
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, x_shape, jnp.bfloat16)
    w = (0.02 * jax.random.normal(kw, w_shape, jnp.float32)).astype(jnp.bfloat16)

    @jax.jit
    def loop(x, w):
        def body(_, x):
            y = jnp.einsum(spec, x, w)
            return x + 1e-3 * y.reshape(x.shape[0], -1)[:, :take].reshape(x.shape)

        return jax.lax.fori_loop(0, REPS, body, x)

    jax.block_until_ready(loop(x, w))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(loop(x, w))
        times.append(time.perf_counter() - t)
    return statistics.median(times) / REPS


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    cases = []
    for name, d, f in (("tiny dense MLP", 1280, 6848), ("small dense MLP", 2048, 10944),
                       ("tiny LM head", 1280, 129280), ("small LM head", 2048, 102400)):
        cases.append((name, "[D,F]", "ND,DF->NF", (1, d), (d, f), d, d * f))
        cases.append((name, "[F,D]", "ND,FD->NF", (1, d), (f, d), d, d * f))
    for name, d, f in (("tiny 6 experts", 1280, 896), ("small 6 experts", 2048, 1408)):
        cases.append((name, "[X,D,F]", "ND,XDF->NXF", (1, d), (6, d, f), d, 6 * d * f))
        cases.append((name, "[X,F,D]", "ND,XFD->NXF", (1, d), (6, f, d), d, 6 * d * f))
    rows = []
    for name, layout, spec, xs, ws, take, n in cases:
        s = bench(spec, xs, ws, take)
        row = {"case": name, "weight_layout": layout, "us": 1e6 * s, "tb_per_s": 2 * n / s / 1e12,
               "device": jax.devices()[0].device_kind, "jax": jax.__version__}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| case | W layout | us | TB/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['weight_layout']} | {r['us']:.1f} | {r['tb_per_s']:.2f} |")


if __name__ == "__main__":
    main()
