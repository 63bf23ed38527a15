"""Why bf16 logits drift from float32 on random weights: expert choices that flip. (CPU or GPU)

    python benchmarks/bf16_drift.py --model small --layers 4 --tokens 48

Runs the preset's language model, its first `--layers` decoder layers (0: all), on a random text prompt
eagerly in float32 and in bf16, one layer at a time: each layer's random weights are drawn in float32
(seeded per layer, so not the same draw as `init_params`), cast to bf16, used and dropped, so any depth
fits in one layer's memory (small: 60 GB of float32 layers, ~3.3 GB at a time). Reports per MoE layer
the share of tokens whose set of chosen experts differs, then the logits' cosine similarity two ways:
float32 against bf16, and against bf16 made to use float32's expert choices and routing weights. If
forcing the routing closes most of the gap, the drift is the routers' near-ties flipping under bf16
rounding, not an inaccurate operation.
`--attention xla` runs bf16 with the fused attention form (the one cuDNN runs on GPUs).
Prints one JSON line per result and a short table.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def routed(fn, forced=None):
    """fn() run eagerly with the routers' (weights, ids) recorded, or replaced by `forced` ones, in the
    order the MoE layers ask: (fn's result, the routes)."""
    from vl2_jax.modules import moe

    routes, original = [], moe.route

    def route(logits, c, bias=None):
        out = forced.pop(0) if forced is not None else original(logits, c, bias)
        routes.append(out)
        return out

    moe.route = route
    try:
        with jax.disable_jit():
            return fn(), routes
    finally:
        moe.route = original


def run(model: str, layers: int, tokens: int, same_weights: bool = False, attention: str = "plain") -> list[dict]:
    from vl2_jax.random_model import draw_like

    from vl2_jax.config import PRESETS
    from vl2_jax.modules.language import DecoderLayer, LanguageModel, causal_mask

    lc = PRESETS[model].language
    layers = layers or lc.num_hidden_layers  # (main checks it is at most the model's depth)
    ids = np.random.default_rng(0).integers(100, lc.vocab_size, (1, tokens))
    positions, valid = jnp.arange(tokens)[None], jnp.ones((1, tokens), bool)
    mask = causal_mask(valid)
    streams = {"f32": jnp.float32, "bf16": jnp.bfloat16, "bf16_with_f32_routing": jnp.bfloat16}

    def weights(shapes_of, seed):
        """float32 draw (bf16-rounded with same_weights) -> {stream: params in its dtype}."""
        p = draw_like(jax.eval_shape(shapes_of), seed)
        if same_weights:  # the float32 reference computes on the bf16-rounded weights
            p = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), p)
        cast = {d: jax.tree.map(lambda a, d=d: a.astype(d), p) for d in set(streams.values())}
        return {name: cast[dtype] for name, dtype in streams.items()}

    def attention_of(stream):  # float32 always runs the plain path
        return attention if streams[stream] == jnp.bfloat16 else "plain"

    def lm(stream):
        return LanguageModel(lc, streams[stream], "dense", attention_of(stream))

    def ends(module, ids):  # the embedding, final norm and LM head: the parameters outside the layers
        return module.head(module.embed(ids))

    def call(module, h):
        return module(h, positions, module.new_kv(h, positions), mask, valid)

    def apply_layer(i, stream, params, h, forced=None):
        module = DecoderLayer(lc, i, streams[stream], "dense", attention_of(stream))
        return routed(functools.partial(module.apply, params, h, method=call), forced)

    outer = weights(functools.partial(lm("f32").init, jax.random.key(0), jnp.asarray(ids), method=ends), 0)
    x = {k: lm(k).apply(outer[k], jnp.asarray(ids), method="embed") for k in streams}
    rows = []
    # Layer by layer, each drawn, run in the three streams and dropped: small's 27 float32 layers (60 GB)
    # never sit in memory together.
    for i in range(layers):
        module = DecoderLayer(lc, i, jnp.float32, "dense", "plain")
        p = weights(functools.partial(module.init, jax.random.key(0), x["f32"], method=call), 1 + i)
        new, routes = {}, {}
        for k in ("f32", "bf16"):
            new[k], routes[k] = apply_layer(i, k, p[k], x[k])
        k = "bf16_with_f32_routing"
        new[k], _ = apply_layer(i, k, p[k], x[k], forced=list(routes["f32"]))
        x, p = new, None  # this layer's weights go before the next one's are drawn
        if routes["f32"]:
            (_, a), (_, b) = routes["f32"][0], routes["bf16"][0]
            same = [set(r) == set(s) for r, s in zip(np.asarray(a).tolist(), np.asarray(b).tolist())]
            rows.append({"model": model, "metric": "tokens_with_other_experts", "layer": i, "share": 1 - float(np.mean(same))})
    logits = {k: np.asarray(lm(k).apply(outer[k], x[k], method="head"), np.float32)[0] for k in streams}
    for name in ("bf16", "bf16_with_f32_routing"):
        cos = _cosine(logits[name], logits["f32"])
        rows.append({"model": model, "metric": f"logits_cosine_{name}", "layers": layers, "tokens": tokens,
                     "reference_weights": "bf16" if same_weights else "float32", "bf16_attention": attention,
                     "min": float(cos.min()), "mean": float(cos.mean())})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="preset: tiny|small|base|test")
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept, 0 for all (drawn and run one at a time)")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--same-weights", action="store_true",
                   help="float32 reference on the bf16-rounded weights: only the arithmetic differs")
    p.add_argument("--attention", default="plain", choices=["plain", "xla", "cudnn"],
                   help="bf16's attention (float32 always runs the plain path): xla is the fused form cuDNN runs")
    args = p.parse_args(argv)
    from vl2_jax.config import PRESETS

    depth = PRESETS[args.model].language.num_hidden_layers
    if not 0 <= args.layers <= depth:
        p.error(f"--layers must be 0 (all) to {depth} for {args.model} (got {args.layers})")
    rows = run(args.model, args.layers, args.tokens, args.same_weights, args.attention)
    for r in rows:
        print(json.dumps(r), flush=True)
    for r in rows:
        print(" | ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
