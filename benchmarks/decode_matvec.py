"""How XLA compiles the decode step's dense matrix-vector products, by how they are written (GPU).

    python benchmarks/decode_matvec.py --model small --layers 8 --steps 32

At batch 1, XLA's GPU compiler may rewrite a dot with a vector operand into an elementwise multiply and
a reduction ("dot strength reduction"). Where the multiply is not fused into the reduction, it writes
the whole weight-sized product out and reads it back: three passes over the weight's bytes instead of
one, and the products rounded to bf16 before they are summed. This times the non-expert projections of
`--layers` decoder layers (distinct weights, so they stream from HBM as in the model) inside a
`while_loop`, as the decode step runs them, in each form:

  einsum     `jnp.einsum` on [B, T, ...] activations (B = T = 1): XLA's dot, what the model ran before
             `layers.einsum` sent these products to the kernel
  matrix     the same products as 2-D [B*T, K] x [K, N] dots (weights reshaped, not copied)
  f32_out    `matrix` with a float32 result (`preferred_element_type`), cast back after
  weight_lhs `matrix` written as (w^T x^T)^T
  kernel     `vl2_jax.kernels.dense_matvec` (the Triton matrix-vector kernel), what the model runs now
             for every projection here but the shared gate/up (over its 10M-element limit: cuBLAS)

and reports per form the time per layer, the effective bandwidth over the weights' bytes, and how many
weight-sized elementwise fusions the optimized HLO holds (0: no strength-reduced product written out).
Prints one JSON line per form, then a short table.
"""

from __future__ import annotations

import argparse
import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from vl2_jax.bench import median_time
from vl2_jax.kernels import dense_matvec
from vl2_jax.modules.layers import one_row_product

# per projection: (name, activation shape after B, T, weight shape, einsum on [B, T, ...] activations)
PROJECTIONS = {
    "small": [
        ("q", (2048,), (2048, 16, 192), "BTD,DHK->BTHK"),
        ("kv_a", (2048,), (2048, 576), "BTD,DR->BTR"),
        ("o", (16, 128), (16, 128, 2048), "BTHU,HUD->BTD"),
        ("shared_gate_up", (2048,), (2048, 2, 2816), "BTD,DWF->BTWF"),
        ("shared_down", (2816,), (2816, 2048), "BTF,FD->BTD"),
    ],
    "test": [  # a CPU smoke test's sizes
        ("q", (256,), (256, 2, 64), "BTD,DHK->BTHK"),
        ("o", (2, 64), (2, 64, 128), "BTHU,HUD->BTD"),
    ],
}


def _project(form: str, spec: str, x, w):
    if form == "einsum":
        return jnp.einsum(spec, x, w)
    k, n, out_shape = one_row_product(spec, x, w)
    x2, w2 = x.reshape(1, k), w.reshape(k, n)
    if form == "matrix":
        y = jnp.dot(x2, w2)
    elif form == "f32_out":
        y = jnp.dot(x2, w2, preferred_element_type=jnp.float32).astype(x.dtype)
    elif form == "weight_lhs":
        y = jnp.dot(w2.T, x2.T).T
    elif form == "kernel":
        y = dense_matvec(x2, w2, interpret=jax.default_backend() != "gpu").astype(x.dtype)
    else:
        raise ValueError(form)
    return y.reshape(out_shape)


def _time_form(form, projections, weights, steps) -> tuple[float, int]:
    """(seconds per step, weight-sized elementwise fusions) of `projections` over every layer's weights."""
    width = max(int(np.prod(xs)) for _, xs, _, _ in projections)

    def step(x, ws):
        acc = jnp.zeros((), jnp.float32)
        for layer in ws:
            for (_, xs, _, spec), w in zip(projections, layer):
                h = x[: int(np.prod(xs))].reshape(1, 1, *xs)
                y = _project(form, spec, jax.nn.silu(h) * h, w)  # an elementwise producer, as in the model
                acc = acc + jnp.sum(y.astype(jnp.float32))
        return (x * (1 + 1e-9 * acc)).astype(x.dtype)  # the next step depends on this one's outputs

    loop = jax.jit(lambda ws, x: jax.lax.fori_loop(0, steps, lambda i, x: step(x, ws), x))
    x0 = jnp.ones((width,), jnp.bfloat16)
    compiled = loop.lower(weights, x0).compile()
    big = [m for m in re.findall(r"= bf16\[([\d,]+)\]\{[^}]*\} fusion\([^\n]*kind=kLoop", compiled.as_text())
           if np.prod([int(d) for d in m.split(",")]) >= 2**20]
    return median_time(lambda: compiled(weights, x0), 5) / steps, len(big)


def run(model: str, layers: int, steps: int, forms: list[str]) -> list[dict]:
    projections = PROJECTIONS[model]
    keys = iter(jax.random.split(jax.random.key(0), layers * len(projections)))
    weights = [[jax.random.normal(next(keys), shape, jnp.bfloat16) for _, _, shape, _ in projections]
               for _ in range(layers)]
    rows = []
    for i, proj in enumerate([*projections, None]):
        chosen = projections if proj is None else [proj]
        ws = [layer if proj is None else [layer[i]] for layer in weights]
        nbytes = sum(w.size * w.dtype.itemsize for w in ws[0])
        for form in forms:
            seconds, big = _time_form(form, chosen, ws, steps)
            rows.append({"model": model, "projection": "all" if proj is None else proj[0], "form": form,
                         "us_per_layer": seconds / layers * 1e6, "weight_mb_per_layer": nbytes / 1e6,
                         "tb_per_s": nbytes * layers / seconds / 1e12, "weight_sized_loop_fusions": big,
                         "device": jax.devices()[0].device_kind, "jax": jax.__version__})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", choices=sorted(PROJECTIONS))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--forms", default="einsum,matrix,f32_out,weight_lhs,kernel")
    args = p.parse_args(argv)
    rows = run(args.model, args.layers, args.steps, args.forms.split(","))
    for r in rows:
        print(json.dumps(r), flush=True)
    print("| projection | form | us/layer | TB/s | weight-sized loop fusions |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['projection']} | {r['form']} | {r['us_per_layer']:.1f} | {r['tb_per_s']:.2f} | "
              f"{r['weight_sized_loop_fusions']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
