"""Where a decode step's time goes, and whether bf16 agrees with float32 at the real sizes (GPU).

    python benchmarks/profile_decode.py --model random:tiny --tokens 32 --cosine
    python benchmarks/profile_decode.py --model random:tiny --quant int8      # the quantized decode step

1. Profiles greedy decode steps (batch 1, or --batch rows) with `jax.profiler` (a --tokens generation minus a one-token
   one, so embedding and prefill drop out; with --first-token instead: one time to first token, the
   vision tower, prefill and first sample), then sums the device kernels by name: launches per decoded
   token, device-busy time per token against the wall time per token, and the device's idle time
   between kernels in the whole generation with its longest gaps. A busy fraction well under 1
   means the step is bound by launch gaps, not by the kernels. --quant int8|fp8 profiles the
   quantized model's step (where its time goes against bf16's). --first-token also reports where the
   GPU waits: idle time between the first and last kernel, the longest gaps with the kernels around
   them, and the wall time outside that span (host work before the first launch and after the last).
2. With --cosine: the same random weights in float32 and in bf16, logits of the image prompt, cosine
   similarity per position (the acceptance bar is >= 0.999). --forced-routing adds bf16 made to use
   float32's expert choices and routing weights (as `bf16_drift.py jax`), both run eagerly.
Prints one JSON line per result, then a short table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# This checkout's trace helpers, loaded by path: the model comes from whichever `vl2_jax` is first on
# PYTHONPATH (another checkout, for a side-by-side profile), which may predate them.
_spec = importlib.util.spec_from_file_location("vl2_traces", Path(__file__).resolve().parents[1] / "vl2_jax" / "traces.py")
traces = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(traces)


def _prompt(model, size=768, rows=1):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    one = model.processor([{"role": "user", "content": "<image>\nDescribe this image in detail."}], [image])
    return model.processor.batchify([one] * rows)


def profile_first_token(spec: str, keep: str | None = None) -> list[dict]:
    """Kernels of one time-to-first-token (embedding with the vision tower, prefill, first sample)."""
    from vl2_jax.load import load_model

    model = load_model(spec, "bfloat16")
    batch = _prompt(model)
    # Compile, then the steady state: XLA runs a CUDA-graph region through its thunks on an executable's
    # first run, records the graph on the second (~7 ms for small's vision tower) and only updates it later.
    for _ in range(3):
        model.generate(batch, max_new_tokens=1)
    intervals = []
    result, wall, kernels, busy = traces.traced(lambda: model.generate(batch, max_new_tokens=1), intervals=intervals, python=True,
                                              keep=keep)
    gaps = traces.idle_gaps(intervals)
    rows = [{"model": spec, "metric": "first_token_profile", "launches": sum(kernels.values()),
             "device_busy_ms": 1e-3 * sum(busy.values()), "wall_ms": 1e3 * wall, "ttft_ms": 1e3 * result.ttft_s,
             "kernel_span_ms": gaps["span_ms"], "idle_in_span_ms": gaps["idle_ms"],
             "outside_span_ms": 1e3 * wall - gaps["span_ms"],
             "jax": jax.__version__, "device": jax.devices()[0].device_kind}]
    rows += [{"model": spec, "metric": "idle_gap", **g} for g in gaps["largest_gaps"]]
    for name, dur in busy.most_common(15):
        rows.append({"model": spec, "metric": "kernel", "name": name[:80], "launches": kernels[name], "ms": dur / 1e3})
    return rows


def profile(spec: str, tokens: int, exact_names: bool = False, quant: str | None = None,
            batch_size: int = 1, max_batch: int | None = None) -> list[dict]:
    """Kernels of the decode steps alone: a `tokens`-token generation minus a one-token one (the same
    embedding and prefill), per name, divided by the decode steps it ran (of `batch_size` rows each): its
    tokens - 1, rounded up to whole decode calls (`engine.steps`), which run all their steps."""
    try:
        from vl2_jax.load import load_model
    except ImportError:  # a checkout from before the engine (PYTHONPATH=that checkout), for a side-by-side
        from vl2_jax.hub import load_model

    if max_batch:
        from vl2_jax import Runtime
    model = load_model(spec, "bfloat16", **({"quant": quant} if quant else {}),
                       **({"runtime": Runtime(max_batch=max_batch)} if max_batch else {}))
    batch = _prompt(model, rows=batch_size)
    for n in (tokens, 1):  # compile
        model.generate(batch, max_new_tokens=n, ignore_eos=True)
    intervals = []
    per_call = model.engine.steps(batch_size) if hasattr(model, "engine") else 1  # (the generator: 1)
    result, kernels, busy, steps = traces.decode_step_kernels(model, batch, tokens, per_call, exact_names, intervals,
                                                              python=True)
    gaps = traces.idle_gaps(intervals)
    per_step_wall = result.decode_s / steps
    step_busy = sum(v for v in busy.values() if v > 0) * 1e-6 / steps
    rows = [{
        "model": spec, "quant": quant or "none", "rows": batch_size, "metric": "decode_profile", "decode_steps_run": steps, "launches_per_token": sum(v for v in kernels.values() if v > 0) / steps,
        "device_busy_ms_per_token": 1e3 * step_busy, "wall_ms_per_token": 1e3 * per_step_wall,
        "busy_fraction": step_busy / per_step_wall, "jax": jax.__version__, "device": jax.devices()[0].device_kind,
        "idle_in_span_ms": gaps["idle_ms"], "kernel_span_ms": gaps["span_ms"],
    }]
    rows += [{"model": spec, "metric": "idle_gap", **g} for g in gaps["largest_gaps"]]
    for name, dur in busy.most_common(25 if exact_names else 12):
        rows.append({"model": spec, "metric": "kernel", "name": name[:80], "per_token": kernels[name] / steps,
                     "us_per_token": dur / steps})
    return rows


def cosine(spec: str, same_weights: bool = False, forced_routing: bool = False) -> list[dict]:
    import bf16_drift  # this script's folder is on the path when it runs

    from vl2_jax.load import load_model
    from vl2_jax.model import VL2Model

    f32 = load_model(spec, "float32")
    if same_weights:  # float32 compute on the bf16 weights, as with a bf16 checkpoint
        # leaf by leaf, each float32 original freed as it is replaced: a whole second float32 copy of
        # small (64 GB) did not fit next to the first on an H200
        leaves, treedef = jax.tree.flatten(f32.params)
        del f32.params
        for i in range(len(leaves)):
            leaves[i] = leaves[i].astype(jnp.bfloat16).astype(jnp.float32)
        f32.params = jax.tree.unflatten(treedef, leaves)
        del leaves
    batch = _prompt(f32)
    if forced_routing:  # eagerly, recording float32's expert choices to hand to bf16
        ref, routes = bf16_drift.routed(lambda: np.asarray(f32.logits(batch))[0])
    else:
        ref = np.asarray(f32.logits(batch))[0]
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32.params)
    del f32.params
    bf16 = VL2Model(f32.cfg, params16, f32.processor, jnp.bfloat16)
    rows = []
    runs = [("bf16_vs_f32_logits_cosine", lambda: np.asarray(bf16.logits(batch))[0])]
    if forced_routing:
        runs.append(("bf16_with_f32_routing_vs_f32_logits_cosine",
                     lambda: bf16_drift.routed(lambda: np.asarray(bf16.logits(batch))[0], forced=list(routes))[0]))
    for metric, logits in runs:
        got = logits()
        cos = bf16_drift.cosine(got, ref)
        agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
        rows.append({"model": spec, "metric": metric, "reference_weights": "bf16" if same_weights else "float32",
                     "min": float(cos.min()), "mean": float(cos.mean()), "argmax_agreement": agree,
                     "positions": int(len(cos))})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--cosine", action="store_true")
    p.add_argument("--same-weights", action="store_true",
                   help="with --cosine: the float32 reference computes on the bf16-rounded weights (only the "
                        "arithmetic differs, as with a bf16 checkpoint), not on the float32 draw")
    p.add_argument("--forced-routing", action="store_true",
                   help="with --cosine: also bf16 made to use float32's expert choices (both run eagerly)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--first-token", action="store_true", help="profile the time to first token instead")
    p.add_argument("--exact-names", action="store_true",
                   help="list kernels by their full names (to find them in an XLA dump of the optimized HLO)")
    p.add_argument("--keep-trace", metavar="PATH", help="with --first-token: copy the trace there (.json.gz)")
    p.add_argument("--quant", choices=["int8", "fp8"], default=None, help="profile the decode step of quantized weights")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together (the prompt repeated), for the decode profile")
    p.add_argument("--max-batch", type=int, default=None,
                   help="the engine's decode slots (default: load_model's; a --batch beyond them runs in waves)")
    args = p.parse_args(argv)
    if args.quant and (args.first_token or args.cosine or args.no_profile):
        p.error("--quant goes with the decode profile alone (no --first-token, --cosine or --no-profile)")
    if args.keep_trace and (args.no_profile or not args.first_token):
        p.error("--keep-trace goes with --first-token (and without --no-profile)")
    if args.no_profile:
        rows = []
    else:
        rows = profile_first_token(args.model, args.keep_trace) if args.first_token else profile(args.model, args.tokens, args.exact_names, args.quant, args.batch, args.max_batch)
    if args.cosine:
        rows += cosine(args.model, args.same_weights, args.forced_routing)
    for r in rows:
        print(json.dumps(r), flush=True)
    for r in rows:
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                         if k not in ("jax", "device")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
