"""Benchmark: vision, prefill, time to first token, decode speed and memory on random weights.

    python -m vl2_jax.bench --model random:tiny                    # on a GPU, bf16
    python -m vl2_jax.bench --model random:test --image-size 112 --new-tokens 4 --batches 1,2   # CPU smoke

The image prompt is one square image (768 px: a global view plus 2x2 tiles, 1042 tokens at the real
sizes) and one sentence; the text prompt is the sentence alone. Every measurement is the median of
`--repeats` timed runs after a warm-up, blocked on the result, and printed as one JSON line; a table
follows. `decode_floor_fraction` is the time to read the weights a batch-1 token activates (embedding
row, attention, dense MLP, shared + top-k experts, LM head; plus its KV cache) at `--hbm-gbps`, divided
by the measured time per token.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vl2_jax import kernels, load
from vl2_jax.config import ATTENTION_IMPLS, MOE_IMPLS, Runtime
from vl2_jax.generation import Generator, bucket
from vl2_jax.modules.moe import choose_dispatch, grouped_capacity, mlp_kernel_fits
from vl2_jax.modules.vision import normalize_pixels
from vl2_jax.modules.vl2 import VL2
from vl2_jax.processor import left_pad_positions

SENTENCE = "Describe this image in detail."


def activated_bytes(model, context: int) -> int:
    """Bytes a batch-1 decode step must read: activated weights of the language model + its KV cache."""
    lc, itemsize = model.cfg.language, model.dtype.itemsize
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.params["params"]["language"])[0]:
        keys = jax.tree_util.keystr(path, simple=True, separator="/").split("/")
        n = int(np.prod(leaf.shape))
        if keys[0] == "embed":
            n = lc.hidden_size  # one row
        elif keys[1:] in (["mlp", "gate_up_w"], ["mlp", "down_w"]) and lc.is_moe_layer(int(keys[0].split("_")[1])):
            n = n // lc.n_routed_experts * lc.num_experts_per_tok  # routed experts: only the chosen ones
        total += n * itemsize
    per_token = (lc.kv_lora_rank + lc.qk_rope_head_dim) if lc.use_mla else 2 * lc.num_key_value_heads * lc.head_dim
    return total + per_token * lc.num_hidden_layers * context * itemsize


def active_kernels(lc, dtype, runtime: Runtime) -> list[str]:
    """The accelerator kernels (`vl2_jax.kernels`) this run's model uses here, by where they run; every
    JSON line carries them, so a number says which code produced it."""
    if not runtime.kernels:
        return []
    d, f = lc.hidden_size, lc.moe_intermediate_size
    on = {
        "prefill: grouped matmul (Mosaic)": mlp_kernel_fits(kernels.mosaic_ragged_usable, dtype, d, f),
        "decode: gathered matvec": mlp_kernel_fits(kernels.gathered_matvec_usable, dtype, d, f),
        "decode batches: expert matmul": mlp_kernel_fits(kernels.expert_matmul_usable, dtype, d, f),
    }
    return [name for name, used in on.items() if used]


def prefill_dispatch(model, impl: str, tokens: int) -> str:
    """The routed-expert dispatch that `impl` resolves to for a prefill of `tokens` tokens."""
    c = model.cfg.language
    experts = jax.ShapeDtypeStruct((c.n_routed_experts, c.hidden_size, 2, c.moe_intermediate_size), model.dtype)
    return choose_dispatch(impl, tokens, c.num_experts_per_tok, experts, model.runtime.kernels)


def median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def pipelined_time(fn, calls: int = 20, repeats: int = 5) -> float:
    """Seconds per call of `calls` calls dispatched back to back and blocked on once (the median of
    `repeats`): the device's time per call once the host's dispatch hides behind the kernels, where
    blocking on every call (`median_time`) adds the host's round trip, ±30-50% between runs."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = [fn() for _ in range(calls)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def run(args) -> list[dict]:
    runtime = Runtime(moe=args.moe, attention=args.attention, kernels=args.kernels == "on")
    model = load.load_model(args.model, args.dtype, runtime=runtime,
                            progress=lambda s: print(s, file=sys.stderr, flush=True))
    proc, gen = model.processor, Generator(model)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8))
    prompts = {
        "image": proc([{"role": "user", "content": "<image>\n" + SENTENCE}], [image]),
        "text": proc([{"role": "user", "content": SENTENCE}]),
    }
    common = {"model": args.model, "dtype": str(model.dtype), "moe": args.moe, "attention": args.attention,
              "device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
              "kernels": active_kernels(model.cfg.language, model.dtype, runtime)}
    rows = []

    def emit(**row):
        row = {**common, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # Vision tower + projector on the image prompt's tiles.
    batch = proc.batchify([prompts["image"]])
    tiles, norm = model.put(batch.used_tiles(), (None, None, None, None)), batch.pixel_norm
    features = jax.jit(lambda p, t: model.module.apply(p, normalize_pixels(t, norm), method=VL2.image_features))
    emit(metric="vision_ms", prompt="image", tiles=int(tiles.shape[0]),  # (the normalisation included)
         value=1e3 * median_time(lambda: features(model.params, tiles), args.repeats))

    for name, one in prompts.items():
        batch = proc.batchify([one])
        t = batch.input_ids.shape[1]
        # Prefill alone: the language model writes the (bucketed) prompt into an empty cache.
        length = bucket(t)
        # Embedding: host padding and transfer, vision tower and projector (image prompt), token embedding.
        emit(metric="embed_ms", prompt=name, prompt_tokens=t,
             value=1e3 * median_time(lambda b=batch, n=length: gen.embed_prompt(b, n)[0], args.repeats))
        x, _, attention = gen.embed_prompt(batch, length)
        pos, valid = jnp.asarray(left_pad_positions(attention)), jnp.asarray(attention)
        slots = bucket(length + args.new_tokens)

        def prefill(x=x, pos=pos, valid=valid, slots=slots):
            return gen.prefill_chunk(gen.language_params, x, pos, valid, gen.empty_cache(1, slots), True)[0]

        dispatch = prefill_dispatch(model, args.moe, length)
        emit(metric="prefill_ms", prompt=name, prompt_tokens=t, dispatch=dispatch,
             value=1e3 * median_time(prefill, args.repeats))
        busiest = [int(n) for n in model.expert_load(batch, length).max(axis=-1)]
        if busiest:  # the routing balance: each MoE layer's busiest expert, of `bucket_tokens` tokens
            emit(metric="moe_busiest_expert_tokens", prompt=name, prompt_tokens=t, bucket_tokens=length,
                 per_layer=busiest, value=max(busiest))
        if busiest and dispatch == "grouped":  # how often the grouped dispatch falls back to the dense path
            cap = grouped_capacity(length, model.cfg.language.num_experts_per_tok, model.cfg.language.n_routed_experts)
            emit(metric="moe_layers_over_capacity", prompt=name, prompt_tokens=t, bucket_tokens=length, capacity=cap,
                 busiest_expert_tokens=busiest, value=sum(n > cap for n in busiest))
        # Time to first token: embedding (vision included), prefill, first sample; the processor excluded.
        model.generate(batch, max_new_tokens=1)
        ttft = statistics.median(model.generate(batch, max_new_tokens=1).ttft_s for _ in range(args.repeats))
        emit(metric="ttft_ms", prompt=name, prompt_tokens=t, value=1e3 * ttft)

    floor_s = activated_bytes(model, t + args.new_tokens) / (args.hbm_gbps * 1e9)
    for b in args.batches:
        batch = proc.batchify([prompts["image"]] * b)
        run_once = lambda batch=batch: model.generate(batch, max_new_tokens=args.new_tokens, ignore_eos=True)
        run_once()
        results = [run_once() for _ in range(args.repeats)]
        step_s = statistics.median(r.decode_s / (args.new_tokens - 1) for r in results)
        row = dict(metric="decode_tokens_per_s", prompt="image", batch=b, new_tokens=args.new_tokens,
                   value=b / step_s, ms_per_step=1e3 * step_s)
        if b == 1:
            row["decode_floor_fraction"] = floor_s / step_s
            row["floor_ms"] = 1e3 * floor_s
        emit(**row)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        emit(metric="peak_memory_gb", value=stats["peak_bytes_in_use"] / 1e9)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | metric | prompt | batch | value |", "|---|---|---|---|---|"]
    for r in rows:
        extra = f" (floor {r['floor_ms']:.2f} ms/token, {100 * r['decode_floor_fraction']:.0f}% of it)" if "floor_ms" in r else ""
        lines.append(f"| {r['model']} | {r['metric']} | {r.get('prompt', '')} | {r.get('batch', '')} | {r['value']:.2f}{extra} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vl2_jax.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:tiny", help="random:tiny|small|base|test or a checkpoint folder")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--moe", default="auto", choices=list(MOE_IMPLS), help="expert dispatch")
    p.add_argument("--attention", default="auto", choices=list(ATTENTION_IMPLS),
                   help="attention (plain: the reference's arithmetic; auto: cuDNN flash attention where it applies)")
    p.add_argument("--kernels", default="on", choices=["on", "off"], help="accelerator kernels where they apply")
    p.add_argument("--image-size", type=int, default=768)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes, comma separated ('' for none)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hbm-gbps", type=float, default=4300.0, help="HBM bandwidth for the floor (H200 copy: ~4300)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.dtype = args.dtype or load.default_dtype()
    rows = run(args)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
