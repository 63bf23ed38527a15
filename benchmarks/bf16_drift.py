"""Why bf16 logits drift from float32 on random weights: expert choices that flip. (CPU or GPU)

    python benchmarks/bf16_drift.py --model small --layers 4 --tokens 48

Builds the preset with its first `--layers` decoder layers (random weights drawn once in float32, the
bf16 copy cast from them) and a random text prompt, runs the language model eagerly in float32 and in
bf16, and reports per MoE layer the share of tokens whose set of chosen experts differs, then the
logits' cosine similarity three ways: float32 against bf16, and against bf16 made to use float32's
expert choices and routing weights. If forcing the routing closes most of the gap, the drift is the
routers' near-ties flipping under bf16 rounding, not an inaccurate operation.
`--attention xla` runs bf16 with the fused attention form (the one cuDNN runs on GPUs).
Prints one JSON line per result and a short table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def run(model: str, layers: int, tokens: int, same_weights: bool = False, attention: str = "plain") -> list[dict]:
    from vl2_jax.config import PRESETS
    from vl2_jax.modules import moe
    from vl2_jax.modules.language import LanguageModel
    from vl2_jax.random_model import init_params

    cfg = PRESETS[model]
    cfg = dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, num_hidden_layers=layers))
    lc = cfg.language
    params = init_params(cfg, jnp.float32)["params"]["language"]
    if same_weights:  # the float32 reference computes on the bf16-rounded weights
        params = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params)
    ids = np.random.default_rng(0).integers(100, lc.vocab_size, (1, tokens))
    positions, valid = jnp.arange(tokens)[None], jnp.ones((1, tokens), bool)

    def forward(dtype, p, routes, forced=None):
        lm = LanguageModel(lc, dtype, "dense", attention if dtype == jnp.bfloat16 else "plain")
        x = lm.apply({"params": p}, jnp.asarray(ids), method="embed")
        original = moe.route

        def recording(logits, c, bias=None):
            out = forced.pop(0) if forced is not None else original(logits, c, bias)
            routes.append(out)
            return out

        moe.route = recording
        try:
            with jax.disable_jit():
                return np.asarray(lm.apply({"params": p}, x, positions, valid), np.float32)[0]
        finally:
            moe.route = original

    f32_routes, bf16_routes, forced_routes = [], [], []
    ref = forward(jnp.float32, params, f32_routes)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    got = forward(jnp.bfloat16, p16, bf16_routes)
    forced = forward(jnp.bfloat16, p16, forced_routes, forced=list(f32_routes))
    rows = []
    for i, ((_, a), (_, b)) in enumerate(zip(f32_routes, bf16_routes)):
        same = [set(r) == set(s) for r, s in zip(np.asarray(a).tolist(), np.asarray(b).tolist())]
        rows.append({"model": model, "metric": "tokens_with_other_experts", "moe_layer": i, "share": 1 - float(np.mean(same))})
    for name, logits in (("bf16", got), ("bf16_with_f32_routing", forced)):
        cos = _cosine(logits, ref)
        rows.append({"model": model, "metric": f"logits_cosine_{name}", "layers": layers, "tokens": tokens,
                     "reference_weights": "bf16" if same_weights else "float32", "bf16_attention": attention,
                     "min": float(cos.min()), "mean": float(cos.mean())})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="preset: tiny|small|base|test")
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept (memory: small is ~2.2 GB per MoE layer in float32)")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--same-weights", action="store_true",
                   help="float32 reference on the bf16-rounded weights: only the arithmetic differs")
    p.add_argument("--attention", default="plain", choices=["plain", "xla", "cudnn"],
                   help="bf16's attention (float32 always runs the plain path): xla is the fused form cuDNN runs")
    args = p.parse_args(argv)
    rows = run(args.model, args.layers, args.tokens, args.same_weights, args.attention)
    for r in rows:
        print(json.dumps(r), flush=True)
    for r in rows:
        print(" | ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
