"""Which MoE dispatch, and which fused weight layout, is fastest at each token count? (GPU)

    python benchmarks/moe_dispatch.py [--models tiny,small] [--tokens 1,8,32,1088] [--dispatches grouped,ragged]

Times the routed + shared experts of every MoE layer of a model (random bf16 weights at the real
sizes, layers chained so each depends on the last, one jitted call) for each dispatch of
`vl2_jax.modules.moe` (the library's kernels as `auto` would pick them; "grouped, no kernel" is the
grouped dispatch with `use_kernel=False`: XLA's batched matmul over every expert)
and, at decode sizes, for a candidate not in the library: the shared experts stored as S stacked
experts and run with the gathered routed ones in one matmul.
Prints one JSON line per case and a table of milliseconds per token count (all layers together).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from vl2_jax.bench import median_time
from vl2_jax.config import PRESETS
from vl2_jax.kernels import MIN_ROWS
from vl2_jax.modules.moe import run_experts, swiglu

REPS = 5


def _route(x, router_w, k):
    logits = (x.astype(jnp.float32) @ router_w.astype(jnp.float32))
    w, idx = jax.lax.top_k(jax.nn.softmax(logits, -1), k)
    return w, idx.astype(jnp.int32)


def _weights(key, layers, e, d, f, s, shared_as_experts: bool):
    """Per layer: router, routed experts in the library's layout, shared experts as one MLP of width
    S*F (the library) or as S stacked experts (the candidate)."""
    out = []
    for k in jax.random.split(key, layers):
        ks = jax.random.split(k, 5)
        r = lambda kk, shape: (0.02 * jax.random.normal(kk, shape, jnp.float32)).astype(jnp.bfloat16)
        w = {"router": r(ks[0], (d, e)), "gate_up": r(ks[1], (e, d, 2, f)), "down": r(ks[2], (e, f, d))}
        if shared_as_experts:
            w |= {"s_gate_up": r(ks[3], (s, d, 2, f)), "s_down": r(ks[4], (s, f, d))}
        else:
            w |= {"s_gate_up": r(ks[3], (d, 2, s * f)), "s_down": r(ks[4], (s * f, d))}
        out.append(w)
    return out


def _layer(impl, k, use_kernel=True):
    def layer(x, w):
        weights, idx = _route(x, w["router"], k)
        y = run_experts(impl, x, w["gate_up"], w["down"], weights, idx, use_kernel=use_kernel)
        return y + swiglu(jnp.einsum("ND,DWF->NWF", x, w["s_gate_up"])) @ w["s_down"]
    return layer


def _layer_shared_as_experts(k):
    """Candidate: the shared experts appended to the gathered routed experts (weight 1), one matmul."""
    def layer(x, w):
        weights, idx = _route(x, w["router"], k)
        n, s = x.shape[0], w["s_gate_up"].shape[0]
        gate_up = jnp.concatenate([w["gate_up"][idx], jnp.broadcast_to(w["s_gate_up"], (n, *w["s_gate_up"].shape))], 1)
        down = jnp.concatenate([w["down"][idx], jnp.broadcast_to(w["s_down"], (n, *w["s_down"].shape))], 1)
        weights = jnp.concatenate([weights, jnp.ones((n, s), weights.dtype)], axis=1)
        y = jnp.einsum("NXF,NXFD->NXD", swiglu(jnp.einsum("ND,NXDWF->NXWF", x, gate_up)), down)
        return jnp.einsum("NXD,NX->ND", y.astype(jnp.float32), weights).astype(x.dtype)
    return layer


# the names --dispatches takes, and the cases they time
DISPATCHES = {"dense": "dense", "grouped": "grouped", "nokernel": "grouped, no kernel", "gather": "gather",
              "ragged": "ragged", "shared": "gather+shared as experts"}


def run(model: str, tokens: list[int], dispatches=None) -> list[dict]:
    c = PRESETS[model].language
    e, d, f, s, k = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, c.n_shared_experts, c.num_experts_per_tok
    layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    rows = []
    for name in dispatches or DISPATCHES.values():
        ws = _weights(jax.random.key(0), layers, e, d, f, s, name.endswith("experts"))
        if name.endswith("experts"):
            layer = _layer_shared_as_experts(k)
        else:
            layer = _layer(name.split(",")[0], k, use_kernel=not name.endswith("no kernel"))

        @jax.jit
        def chain(x, ws, layer=layer):
            for w in ws:
                x = x + 0.1 * layer(x, w)
            return x

        for n in tokens:
            # (ragged below the Mosaic kernel's fewest rows would time `lax.ragged_dot`, not the kernel)
            if ((name.startswith("gather") and n > 64) or (name == "ragged" and n * k < MIN_ROWS)
                    or (name.endswith("no kernel") and n > 64)):
                continue
            x = jax.random.normal(jax.random.key(n), (n, d), jnp.bfloat16)
            sec = median_time(lambda x=x, ws=ws, chain=chain: chain(x, ws), REPS)
            row = {"model": model, "dispatch": name, "tokens": n, "ms": 1e3 * sec, "moe_layers": layers,
                   "device": jax.devices()[0].device_kind, "jax": jax.__version__}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del ws
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--tokens", default="1,8,32,1088")
    p.add_argument("--dispatches", default=",".join(DISPATCHES),
                   help="comma-separated, of: " + ", ".join(f"{k} ({v})" for k, v in DISPATCHES.items()))
    a = p.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    unknown = [d for d in a.dispatches.split(",") if d not in DISPATCHES]
    if unknown:
        p.error(f"unknown dispatch(es) {unknown}: choose from {', '.join(DISPATCHES)}")
    chosen = [DISPATCHES[d] for d in a.dispatches.split(",")]
    rows = [r for m in a.models.split(",") for r in run(m, tokens, chosen)]
    print("\n| model | dispatch | " + " | ".join(f"{n} tokens (ms)" for n in tokens) + " |")
    print("|---|---|" + "---|" * len(tokens))
    for (m, name) in dict.fromkeys((r["model"], r["dispatch"]) for r in rows):
        cells = {r["tokens"]: f"{r['ms']:.2f}" for r in rows if r["model"] == m and r["dispatch"] == name}
        print(f"| {m} | {name} | " + " | ".join(cells.get(n, "") for n in tokens) + " |")


if __name__ == "__main__":
    main()
