"""Fine-tuning speed on one device: tokens/s, model FLOPs utilisation (MFU) and peak memory.

    python benchmarks/finetune_speed.py --model random:tiny --full --batch 4 --seq-len 1024
    python benchmarks/finetune_speed.py --model random:small --lora-rank 16 --batch 4 --seq-len 1024
    python benchmarks/finetune_speed.py --model random:test --dtype float32 --steps 2 --seq-len 512   # CPU smoke

Trains on synthetic conversations (one 384 x 384 image, a question, an answer of random words that
fills the conversation to just under --seq-len tokens) with the step `python -m vl2_jax.finetune` runs
(`training.loop`: AdamW, remat per layer unless --no-remat, the --moe dispatch). Two steps compile and
warm up, then --steps steps are timed one by one (each waits for its loss); the median counts.

Reported: tokens/s (every real token of the step's rows, prompt and image tokens included) and target
tokens/s; model FLOPs per step and MFU against the device's bf16 dense peak (H100/H200: 989 TFLOP/s),
where model FLOPs count what the model needs, not what the run spends (no recomputation, no padding,
no MoE dispatch overhead):
    language: 2 x activated parameters per token (lm_head included, the embedding lookup not; routed
      experts at top-k of E) + causal attention's 2 x T^2/2 x heads x (qk + v head dims) per layer,
      times 3 (forward and both halves of the backward) where the language model's weights learn,
      times 2 for LoRA (forward, and the activations' gradient; the adapters' own are negligible);
    vision: 2 x parameters per patch + attention per tile, times 1 (frozen: no backward runs through
      it) or 3 when vision learns (--train ...,vision).
peak_gb is `memory_stats()`'s peak on accelerators. --profile K then traces one more step
(`profile_decode`'s kernel summary: launches, device-busy time, the K longest kernels by name). Prints
one JSON line per result and a one-row table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import numpy as np

from vl2_jax.bench import activated_parameters

BF16_PEAK = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core FLOP/s (SXM)


def synthetic_examples(processor, n: int, seq_len: int, seed: int = 0) -> list:
    """`n` labelled examples, each one image and an answer filling it to just under `seq_len` tokens."""
    from PIL import Image

    from vl2_jax.training import data

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(2000)]  # many distinct tokens

    def example(answer_words: int, i: int):
        img = Image.fromarray(rng.integers(0, 255, (384, 384, 3), dtype=np.uint8))
        answer = " ".join(rng.choice(words, answer_words)) + "."
        messages = ({"role": "user", "content": f"<image>\nDescribe picture {i}."},
                    {"role": "assistant", "content": answer})
        return data.example(processor, data.Record(messages, (img,)))

    base = len(example(1, 0).labels)
    if base + 8 > seq_len:
        raise SystemExit(f"--seq-len {seq_len} is too short: one image and a question take {base} tokens.")
    per_word = (len(example(201, 0).labels) - base) / 200
    fill = max(1, int((seq_len - base - 8) / per_word))
    out = []
    for i in range(n):
        ex = example(fill, i)
        while len(ex.labels) > seq_len:
            fill = max(1, fill - 8)
            ex = example(fill, i)
        out.append(ex)
    return out


def matmul_parameters(cfg, params: dict) -> tuple[int, int]:
    """(language, vision) parameters a token multiplies by: the language model's as
    `bench.activated_parameters` counts them (no embedding lookup, routed experts at top-k of E), all of
    the vision tower's (0 where there is none)."""
    p = params["params"]
    language = sum(n for n, _ in activated_parameters(cfg.language, p["language"], embed_rows=0))
    vision = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p["vision"])) if "vision" in p else 0
    return language, vision


def model_flops(cfg, matmul: tuple[int, int], tokens_per_row: list[int], tiles: int, language_mult: int,
                vision_mult: int) -> float:
    """Model FLOPs of one step (see the module docstring); `matmul` from `matmul_parameters`."""
    lc, vc = cfg.language, cfg.vision
    language, vision = matmul
    qk = (lc.qk_nope_head_dim + lc.qk_rope_head_dim) if lc.use_mla else lc.head_dim
    v = lc.v_head_dim if lc.use_mla else lc.head_dim
    heads = lc.num_attention_heads
    lang = sum(2 * language * t + lc.num_hidden_layers * heads * (qk + v) * t * t for t in tokens_per_row)
    patches = vc.num_patches
    vis_attn = vc.layers * 2 * 2 * vc.width * patches * patches
    return language_mult * lang + vision_mult * tiles * (2 * vision * patches + vis_attn)


def run(args) -> dict:
    from vl2_jax.load import load_model
    from vl2_jax.training import batches
    from vl2_jax.training.loop import Settings, compiled_step, init_state, optimizer
    from vl2_jax.training.loss import training_module, training_runtime

    parts = tuple(args.train.split(","))
    rank = 0 if args.full else args.lora_rank
    s = Settings(steps=args.steps + 3, batch=args.batch, grad_accum=1, warmup=1, max_seq_len=args.seq_len,
                 lora_rank=rank, lora_alpha=2.0 * rank, parts=parts)
    t0 = time.perf_counter()
    model = load_model(args.model, args.dtype, runtime=training_runtime(args.moe))
    load_s = time.perf_counter() - t0
    examples = synthetic_examples(model.processor, args.batch * 2, args.seq_len)
    flops_of = dict(language_mult=(3 if not rank else 2) if "language" in parts else 1,
                    vision_mult=3 if "vision" in parts else 1)
    cfg, processor = model.cfg, model.processor
    module = training_module(cfg, model.dtype, training_runtime(args.moe), remat=not args.no_remat)
    step = compiled_step(module, dataclasses.replace(s, save_every=0, eval_every=0))
    matmul = matmul_parameters(cfg, model.params)  # counted once, before the model is let go
    with model.mesh_context():
        state = init_state(model.params, s, optimizer(s))
        del model
        times, tokens, targets, flops = [], [], [], []
        for i in range(args.steps + 2):
            rows = examples[(i % 2) * args.batch:(i % 2 + 1) * args.batch]
            inputs = batches.stack(processor, [rows], args.seq_len)
            start = time.perf_counter()
            state, metrics = step(state, inputs)
            loss = float(metrics["loss"])
            seconds = time.perf_counter() - start
            if i == 0:
                compile_s = seconds
            if i >= 2:
                valid = np.asarray(inputs.valid)[0]
                times.append(seconds)
                tokens.append(int(valid.sum()))
                targets.append(batches.targets(inputs))
                used = sum(len(r.output.pixels) for r in rows)
                flops.append(model_flops(cfg, matmul, [int(t) for t in valid.sum(-1)], used, **flops_of))
        if args.profile:
            from vl2_jax.traces import traced

            (state, metrics), wall, launches, busy = traced(lambda: jax.block_until_ready(step(state, inputs)), python=True)
            print(json.dumps({"metric": "step_profile", "wall_ms": round(wall * 1e3, 1), "launches": sum(launches.values()),
                              "busy_ms": round(sum(busy.values()) / 1e3, 1)}), flush=True)
            for name, us in busy.most_common(args.profile):
                print(json.dumps({"metric": "kernel", "name": name, "launches": launches[name], "ms": round(us / 1e3, 2)}), flush=True)
    step_s = statistics.median(times)
    device = jax.devices()[0]
    kind = device.device_kind
    peak_flops = next((v for k, v in BF16_PEAK.items() if k in kind), None)
    stats = device.memory_stats() or {}
    row = {"model": args.model, "mode": f"LoRA r{rank}" if rank else "full", "train": args.train, "dtype": args.dtype,
           "moe": args.moe, "remat": not args.no_remat, "batch": args.batch, "seq_len": args.seq_len,
           "load_s": round(load_s, 1), "first_step_s": round(compile_s, 1), "step_s": round(step_s, 4),
           "tokens_per_s": round(statistics.mean(tokens) / step_s), "targets_per_s": round(statistics.mean(targets) / step_s),
           "model_tflops_per_step": float(f"{statistics.mean(flops) / 1e12:.4g}"), "last_loss": round(loss, 4),
           "peak_gb": round(stats["peak_bytes_in_use"] / 1e9, 2) if "peak_bytes_in_use" in stats else None,
           "device": kind, "jax": jax.__version__}
    if peak_flops and args.dtype == "bfloat16":
        row["mfu"] = round(statistics.mean(flops) / step_s / peak_flops, 3)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:tiny")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--full", action="store_true")
    kind.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--train", default="language")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after two untimed ones)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--moe", default="blocked", choices=["blocked", "dense", "grouped"])
    p.add_argument("--no-remat", action="store_true")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="profile one more step on the GPU: busy time and the K kernels that took longest")
    args = p.parse_args(argv)
    row = run(args)
    print(json.dumps(row), flush=True)
    keys = ("model", "mode", "moe", "batch", "seq_len", "step_s", "tokens_per_s", "mfu", "peak_gb")
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
