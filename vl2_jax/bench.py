"""Benchmark: warmup, vision, time to first token of new prompts, decode speed and memory on the engine.

    python -m vl2_jax.bench --model random:tiny                    # on a GPU, bf16
    python -m vl2_jax.bench --model random:test --image-size 112 --new-tokens 4 --batches 1,2   # CPU smoke

The model is loaded with `max_batch` = the largest of `--batches` (timed as `load_s`) and warmed up
(every engine program compiled, timed as `warmup_s`; with `--compile-cache` its line also counts the
executables `loaded` and `compiled`, the engine state's own program among them, so one more than
`programs`). `kv_cache_gb` is the KV cache's size; `moe_busiest_expert_tokens` how many of a prompt's
tokens the busiest routed expert of a layer took (the most over the MoE layers; each layer's in
`per_layer`). The image prompt is one square image (768 px: a
global view plus 2x2 tiles, 1042 tokens at the real sizes) and one sentence; the text prompt is the sentence alone; then
prompts never seen before (other image sizes and sentence lengths) are each answered once, and their
first tokens' p50 and p90 reported with the number of compilations and traces while they ran (0 when
the engine works as designed). Decode speed is the median of `--repeats` runs. Every measurement is
printed as one JSON line; a table follows, each value with its unit. `decode_floor_fraction` is the time to read the weights a
batch-1 token activates (embedding row, attention, dense MLP, shared + top-k experts, LM head; plus its
KV cache) at `--hbm-gbps`, divided by the measured time per token (by default on GPUs only; elsewhere
where `--hbm-gbps` is given). On GPUs, `decode_launches_per_token` is the number of kernels a
batch-1 decode step launches, with the device-busy and wall milliseconds per token beside it, from
profiler traces (`vl2_jax.traces`): a step far less busy than its wall time waits on launches, not on
bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import jax
import numpy as np
from PIL import Image

from vl2_jax import kernels, load, quant, traces
from vl2_jax.config import ATTENTION_IMPLS, MAX_DECODE_STEPS, MOE_IMPLS, QUANTS, Runtime
from vl2_jax.engine import CompileWatch
from vl2_jax.errors import InputError, command_parser, given, guarded, leave, number, number_list
from vl2_jax.modules.attention import ragged_decode
from vl2_jax.modules.moe import mlp_kernel_fits
from vl2_jax.modules.vision import normalize_pixels
from vl2_jax.modules.vl2 import VL2
from vl2_jax.quant import weight_bytes

SENTENCE = "Describe this image in detail."


def activated_parameters(lc, language: dict, embed_rows: int = 1) -> list[tuple[int, int]]:
    """(elements one token uses, bytes per element) of every leaf of the language model's parameters
    `language` (config `lc`): `embed_rows` rows of the embedding (0: a lookup counted as no work), the
    chosen top-k of the E routed experts in a MoE layer, all of any other leaf; a quantized weight's
    values and scales as stored. The byte floor of decoding (`activated_bytes`) and the model FLOPs of
    fine-tuning (`benchmarks/finetune_speed.py`) both count with it."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(language)[0]:
        keys = jax.tree_util.keystr(path, simple=True, separator="/").split("/")
        keys = keys[:-1] if keys[-1] in (quant.VALUES, quant.SCALES) else keys
        n = int(np.prod(leaf.shape))
        if keys[0] == "embed":
            n = embed_rows * lc.hidden_size
        elif keys[1:] in (["mlp", "gate_up_w"], ["mlp", "down_w"]) and lc.is_moe_layer(int(keys[0].split("_")[1])):
            n = n // lc.n_routed_experts * lc.num_experts_per_tok  # routed experts: only the chosen ones
        out.append((n, leaf.dtype.itemsize))
    return out


def activated_bytes(model, context: int) -> int:
    """Bytes a batch-1 decode step must read: activated weights of the language model (as stored: a
    quantized weight's 1-byte values and float32 scales) + its KV cache (in the model dtype)."""
    lc = model.cfg.language
    total = sum(n * itemsize for n, itemsize in activated_parameters(lc, model.params["params"]["language"]))
    per_token = (lc.kv_lora_rank + lc.qk_rope_head_dim) if lc.use_mla else 2 * lc.num_key_value_heads * lc.head_dim
    return total + per_token * lc.num_hidden_layers * context * model.dtype.itemsize


def active_kernels(lc, dtype, runtime: Runtime, weight_dtype=None) -> list[str]:
    """The accelerator kernels (`vl2_jax.kernels`) this run's model uses here, by where they run; every
    JSON line carries them, so a number says which code produced it. `weight_dtype`: the experts'
    quantized values (int8, fp8), whose decode kernels pass a self-check of their own."""
    if not runtime.kernels:
        return []
    d, f = lc.hidden_size, lc.moe_intermediate_size
    q = {} if weight_dtype is None else {"weight_dtype": weight_dtype}
    blocked = weight_dtype is not None and mlp_kernel_fits(kernels.blocked_matmul_usable, dtype, d, f, **q)
    on = {  # (as `moe.choose_dispatch` picks them on one device)
        "prefill: blocked matmul (Triton)": blocked,
        "prefill: grouped matmul (Mosaic)": not blocked and mlp_kernel_fits(kernels.mosaic_ragged_usable, dtype, d, f),
        "decode: gathered matvec": mlp_kernel_fits(kernels.gathered_matvec_usable, dtype, d, f, **q),
        "decode batches: expert matmul": mlp_kernel_fits(kernels.expert_matmul_usable, dtype, d, f, **q),
        "decode: attention (Triton)": ragged_decode(lc, dtype, runtime, kernels.DECODE_BLOCK_K),
    }
    return [name for name, used in on.items() if used]


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


def prompts(proc, image_sizes: list[tuple[int, int]], rng: np.random.Generator) -> list:
    """Different conversations: one per image size (random pixels, a sentence of random length) and two
    text-only ones."""
    words = "describe this image in detail with every object its colour and where it is".split()
    out = []
    for i, size in enumerate([*image_sizes, None, None]):
        sentence = " ".join(rng.choice(words, int(rng.integers(4, 40)))) + "."
        if size is None:
            out.append(proc([{"role": "user", "content": sentence * (1 + 8 * i % 5)}]))
        else:
            image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
            out.append(proc([{"role": "user", "content": "<image>\n" + sentence}], [image]))
    return out


def run(args) -> list[dict]:
    runtime = Runtime(moe=args.moe, attention=args.attention, kernels=args.kernels == "on",
                      max_batch=max([*args.batches, 1]), max_seq_len=args.max_seq_len, decode_steps=args.decode_steps)
    start = time.perf_counter()
    with load.progress_bar() as bar:  # drawn only where stderr is a terminal
        model = load.load_model(args.model, args.dtype, runtime=runtime, quant=args.quant,
                                progress=lambda s: print(s, file=sys.stderr, flush=True), bytes_progress=bar)
        jax.block_until_ready(model.params)  # random weights are drawn asynchronously
    load_s = time.perf_counter() - start
    store = None
    if args.compile_cache:
        from vl2_jax import executables

        log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        store = executables.keep(model, executables.use_compile_cache(args.compile_cache, log, jax_cache=False), log)
    proc = model.processor
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8))
    fixed = {
        "image": proc([{"role": "user", "content": "<image>\n" + SENTENCE}], [image]),
        "text": proc([{"role": "user", "content": SENTENCE}]),
    }
    # Prompts never seen before: other image sizes and sentence lengths (first tokens only).
    sizes = [(s, s) for s in (384, 768, 1024)] + [(1152, 384), (384, 896), (640, 480)]
    sizes = [(int(w * args.image_size / 768), int(h * args.image_size / 768)) for w, h in sizes]
    new_prompts = prompts(proc, sizes, rng)
    need = max(len(fixed["image"].input_ids) + args.new_tokens, *(len(p.input_ids) + 1 for p in new_prompts))
    if need > model.engine.max_seq_len:
        short = (f"--max-seq-len {model.engine.max_seq_len}" if args.max_seq_len is not None else
                 f"the model's context ({model.engine.max_seq_len} tokens)")
        more = f"pass --max-seq-len {need} or more, or " if need <= model.cfg.language.max_position_embeddings else "pass "
        raise InputError(f"{short} is too short for the benchmark: its prompts and --new-tokens {args.new_tokens} need "
                         f"{need} tokens a slot; {more}a smaller --image-size or --new-tokens.")
    common = {"model": args.model, "dtype": str(model.dtype), "quant": model.quant, "weight_bytes": weight_bytes(model.params),
              "moe": args.moe, "attention": args.attention,
              "device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
              "kernels": active_kernels(model.cfg.language, model.dtype, runtime, quant.QTYPES.get(model.quant)),
              "max_batch": model.engine.max_batch, "max_seq_len": model.engine.max_seq_len,
              "decode_steps": runtime.decode_steps}
    rows = []

    def emit(**row):
        row = {**common, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)

    emit(metric="load_s", value=load_s)
    start = time.perf_counter()
    last = [start]

    def progress(done, total, name):  # one line per program, with its seconds
        now = time.perf_counter()
        print(f"warmup {done}/{total} {name} {now - last[0]:.1f} s", file=sys.stderr, flush=True)
        last[0] = now

    report = model.warmup(progress)
    kept = {} if store is None else store.report()  # programs loaded from --compile-cache / compiled
    emit(metric="warmup_s", programs=report["programs"], **kept, value=time.perf_counter() - start)
    emit(metric="kv_cache_gb", value=model.engine.cache_bytes() / 1e9)

    # Vision tower + projector on the image prompt's tiles (its own program, compiled here).
    batch = proc.batchify([fixed["image"]])
    tiles, norm = model.put(batch.used_tiles(), (None, None, None, None)), batch.pixel_norm
    features = jax.jit(lambda p, t: model.module.apply(p, normalize_pixels(t, norm), method=VL2.image_features))
    emit(metric="vision_ms", prompt="image", tiles=int(tiles.shape[0]),  # (the normalisation included)
         value=1e3 * median_time(lambda: features(model.params, tiles), args.repeats))
    for name, one in fixed.items():  # the routing balance: each MoE layer's busiest expert
        busiest = [int(n) for n in model.expert_load(proc.batchify([one])).max(axis=-1)]
        if busiest:
            emit(metric="moe_busiest_expert_tokens", prompt=name, prompt_tokens=len(one.input_ids),
                 per_layer=busiest, value=max(busiest))

    # New prompts, each answered once: the time to first token a user meets (no compilation allowed).
    ttfts = {}
    with CompileWatch() as compiling:
        for name, one in [*fixed.items(), *((f"new_{i}", p) for i, p in enumerate(new_prompts))]:
            ttfts[name] = (model.generate(one, max_new_tokens=1).ttft_s, len(one.input_ids))
    emit(metric="ttft_ms", prompt="image", prompt_tokens=ttfts["image"][1], value=1e3 * ttfts["image"][0])
    emit(metric="ttft_ms", prompt="text", prompt_tokens=ttfts["text"][1], value=1e3 * ttfts["text"][0])
    new = sorted(1e3 * t for name, (t, _) in ttfts.items() if name.startswith("new_"))
    emit(metric="ttft_new_prompts_ms", prompts=len(new), p50=float(np.percentile(new, 50)),
         p90=float(np.percentile(new, 90)), prompt_tokens=sorted(n for k, (_, n) in ttfts.items() if k.startswith("new_")),
         value=float(np.percentile(new, 50)), compilations=compiling.count)

    t = len(fixed["image"].input_ids)
    floor_s = activated_bytes(model, t + args.new_tokens) / (args.hbm_gbps * 1e9) if args.hbm_gbps else None
    for b in args.batches:
        batch = proc.batchify([fixed["image"]] * b)
        run_once = lambda batch=batch: model.generate(batch, max_new_tokens=args.new_tokens, ignore_eos=True)
        run_once()
        with CompileWatch() as compiling:
            results = [run_once() for _ in range(args.repeats)]
        rate = statistics.median(r.decode_tokens_per_s for r in results)
        row = dict(metric="decode_tokens_per_s", prompt="image", batch=b, new_tokens=args.new_tokens,
                   value=rate, ms_per_step=1e3 * b / rate if rate else None, compilations=compiling.count)
        if b == 1 and floor_s and rate:
            row["decode_floor_fraction"] = floor_s * rate
            row["floor_ms"] = 1e3 * floor_s
        emit(**row)
    if jax.default_backend() == "gpu":  # (other backends' traces name no kernels)
        steps = model.engine.steps(1)
        row = decode_launches(model, proc.batchify([fixed["image"]]), min(args.new_tokens, 1 + 2 * steps), steps)
        if row is None:
            print("warning: the profiler's trace named no GPU kernels (a layout vl2_jax.traces does not know): "
                  "decode_launches_per_token is left out", file=sys.stderr, flush=True)
        else:
            emit(**row)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        emit(metric="peak_memory_gb", value=stats["peak_bytes_in_use"] / 1e9)
    return rows


def decode_launches(model, batch, tokens: int, steps_per_call: int) -> dict | None:
    """The kernels a batch-1 decode step launches, from `jax.profiler` traces of a `tokens`-token answer
    and of a one-token one (the same prefill and first sample): their difference over the decode steps
    the answer ran (its tokens - 1, rounded up to whole calls of `steps_per_call`, which run to their
    end) -> a row: launches per step, and device-busy and wall milliseconds per step (wall under the
    profiler); None where the trace names no kernels."""
    result, launches, busy, steps = traces.decode_step_kernels(model, batch, tokens, steps_per_call)
    if not launches:
        return None
    return dict(metric="decode_launches_per_token", prompt="image", batch=1, decode_steps_run=steps,
                value=sum(n for n in launches.values() if n > 0) / steps,
                device_busy_ms=1e-3 * sum(us for us in busy.values() if us > 0) / steps,
                wall_ms=1e3 * result.decode_s / steps)


UNITS = {"_launches_per_token": "kernels/token", "_s": "s", "_ms": "ms", "_gb": "GB", "_tokens_per_s": "tok/s", "_tokens": "tokens"}


def unit(metric: str) -> str:
    """The unit of a metric's value, from its name's ending (`ttft_ms` -> ms); '' for none."""
    return next((u for end, u in sorted(UNITS.items(), key=lambda e: -len(e[0])) if metric.endswith(end)), "")


def _value(v: float) -> str:
    """Two decimals, or two significant digits for a value below 0.01 (a test model's cache in GB)."""
    return f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.2g}"


def table(rows: list[dict]) -> str:
    """The JSON lines as a Markdown table, each value with its unit."""
    lines = ["| model | metric | prompt | batch | unit | value |", "|---|---|---|---|---|---|"]
    for r in rows:
        extra = f" (floor {r['floor_ms']:.2f} ms/token, {100 * r['decode_floor_fraction']:.0f}% of it)" if "floor_ms" in r else ""
        if "device_busy_ms" in r:
            extra = f" ({r['device_busy_ms']:.2f} ms device-busy, {r['wall_ms']:.2f} ms wall a token)"
        if "p90" in r:
            extra = f" (p90 {r['p90']:.2f}; {r['prompts']} prompts, {r['compilations']} compilations)"
        lines.append(f"| {r['model']} | {r['metric']} | {r.get('prompt', '')} | {r.get('batch', '')} | {unit(r['metric'])} | {_value(r['value'])}{extra} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = command_parser("python -m vl2_jax.bench", __doc__)
    p.add_argument("--model", type=given, default="random:tiny", help="random:tiny|small|base|test or a checkpoint folder")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--quant", default=None, choices=list(QUANTS),
                   help="language-model weights as int8 or fp8 (e4m3) with float32 scales (default: as the checkpoint holds them)")
    p.add_argument("--moe", default="auto", choices=list(MOE_IMPLS), help="expert dispatch")
    p.add_argument("--attention", default="auto", choices=list(ATTENTION_IMPLS),
                   help="attention (plain: the reference's arithmetic; auto: cuDNN flash attention where it applies)")
    p.add_argument("--kernels", default="on", choices=["on", "off"], help="accelerator kernels where they apply")
    p.add_argument("--image-size", type=number(int, 1), default=768, help="the image prompt's side in pixels")
    p.add_argument("--new-tokens", type=number(int, 2), default=128,
                   help="tokens per decode run, at least 2: the first token is prefill's, the rest are timed (default: 128)")
    p.add_argument("--batches", default=[1, 8, 32], type=number_list(int, 1, "batch size"),
                   help="decode batch sizes, comma separated ('' for none; default 1,8,32)")
    p.add_argument("--repeats", type=number(int, 1), default=3, help="decode runs per batch size (the median counts)")
    p.add_argument("--hbm-gbps", type=number(float, 0), default=None,
                   help="HBM bandwidth for the decode floor in GB/s (default: 4300, an H200's copy bandwidth, on GPUs; none on "
                        "CPU; 0: none)")
    p.add_argument("--max-seq-len", type=number(int, 1), default=None, help="tokens per slot (default: the model's context)")
    p.add_argument("--decode-steps", type=number(int, 1, MAX_DECODE_STEPS), default=Runtime.decode_steps, metavar="N",
                   help=f"tokens per decode call over up to 8 slots (half as many over 9-16, a quarter beyond; default "
                        f"{Runtime.decode_steps})")
    p.add_argument("--compile-cache", default="", metavar="DIR",
                   help="keep compiled programs in DIR and load them from there (default: none, so warmup_s is "
                        "the first-ever cost; run twice with one DIR for the cached cost)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:  # (the backend starts here: its errors are one line too)
        args.dtype = args.dtype or load.default_dtype()
        if args.hbm_gbps is None and jax.default_backend() == "gpu":
            args.hbm_gbps = 4300.0
        print(table(run(args)))
        return 0

    return guarded(body, lambda line: print(line, file=sys.stderr, flush=True))


def exit_with_main() -> None:
    """`python -m vl2_jax.bench`: `main()`, then out of the process at once (`leave`: an interrupted
    warmup does not wait for the compiles under way on its threads)."""
    leave(main())


if __name__ == "__main__":
    exit_with_main()
