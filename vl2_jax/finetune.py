"""Fine-tune DeepSeek-VL2 on conversations with images (LoRA or full), then save a loadable model.

    python -m vl2_jax.finetune --model random:test --data train.jsonl --out tuned/ --steps 50
    python -m vl2_jax.finetune --model deepseek-ai/deepseek-vl2-tiny --data train.jsonl --eval eval.jsonl --out tuned/ --batch 2 --grad-accum 4

`python -m generate --model tuned/` then answers with the trained weights.

The data is JSON lines, one conversation a line (ms-swift's format, the official roles too):
    {"messages": [{"role": "user", "content": "<image>\\nWhat is it?"},
                  {"role": "assistant", "content": "A cat."}], "images": ["cat.jpg"]}
A malformed line, or a missing image, is an error naming the file and line; a conversation that does
not end with an assistant answer, or is longer than --max-seq-len, is skipped and counted.
Ctrl-C, SIGTERM or SIGHUP while training stops the run after the step under way (the first step waits for
its compilation) and saves its train state, then ends with "interrupted" (exit status 130); a second one,
or one while loading, stops at once. `--resume` continues from the last train state saved (at a stop,
every --save-every steps, at the end), with the same settings and data, --steps included; a finished
run's resume writes what it had not written yet, or nothing. This module only parses arguments; the work is
`vl2_jax.training.run.finetune`.
"""

from __future__ import annotations

import argparse
import sys

from vl2_jax.errors import command_parser, given, guarded, interrupts_held, leave, number
from vl2_jax.training.parts import PARTS


def parser() -> argparse.ArgumentParser:
    p = command_parser("python -m vl2_jax.finetune", __doc__)
    p.add_argument("--model", type=given, required=True, help="random:test|tiny|small|base, a checkpoint folder, or a hub id")
    p.add_argument("--data", required=True, help="training conversations, JSON lines")
    p.add_argument("--eval", default=None, help="eval conversations, JSON lines (loss at --eval-every and at the end)")
    p.add_argument("--out", type=given, required=True, help="output folder: the trained model, adapters, train state")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--lora-rank", type=number(int, 1), default=16, help="LoRA adapters of this rank (default 16)")
    kind.add_argument("--full", action="store_true", help="train the chosen parts' weights themselves, not adapters")
    p.add_argument("--lora-alpha", type=number(float, 0, above=True), default=None,
                   help="LoRA scale numerator, above 0 (default 2 x rank)")
    p.add_argument("--train", default="language", help="parts that learn, comma separated: language,projector,vision")
    p.add_argument("--steps", type=number(int, 1), default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch", type=number(int, 1), default=1, help="conversations per microbatch (default 1)")
    p.add_argument("--grad-accum", type=number(int, 1), default=1, help="microbatches per optimizer step (default 1)")
    p.add_argument("--lr", type=number(float, 0, above=True), default=1e-4, help="peak learning rate, above 0 (default 1e-4)")
    p.add_argument("--warmup", type=number(int, 0), default=None,
                   help="linear warmup steps from rate 0 (the first step's), then cosine decay (below --steps; default "
                        "10, or (--steps - 1) // 2 if fewer, so that a short run's losses show an update)")
    p.add_argument("--weight-decay", type=number(float, 0), default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--clip", type=number(float, 0), default=1.0,
                   help="gradient global-norm clip (default 1.0; 0: no clipping)")
    p.add_argument("--max-seq-len", type=number(int, 8), default=1024,
                   help="longest conversation in tokens, image tokens included; longer ones are skipped (default 1024)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute (default float32)")
    p.add_argument("--no-remat", action="store_true",
                   help="keep every layer's activations for the backward pass instead of recomputing them (faster, more memory)")
    p.add_argument("--moe", default="blocked", choices=["blocked", "dense", "grouped"],
                   help="routed-expert dispatch: 'blocked' runs the chosen experts' work alone (in expert-sorted "
                        "blocks), 'dense' every expert on every token, 'grouped' per-expert slots that fall back to "
                        "dense on overflow; same gradients (default blocked)")
    p.add_argument("--mesh", default=None, metavar="SPEC", help="shard over devices: 'auto' or sizes such as data=8")
    p.add_argument("--seed", type=number(int, 0), default=0, help="data order and adapter initialisation (default 0)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the latest train state in --out")
    again.add_argument("--force", action="store_true",
                       help="start over in an --out that holds an earlier run (its train state is removed), and "
                            "replace the weights an --export-hf folder holds")
    p.add_argument("--save-every", type=number(int, 0), default=0, help="save the train state every K steps (0: at the end)")
    p.add_argument("--eval-every", type=number(int, 0), default=0, help="eval loss every K steps (0: at the end)")
    p.add_argument("--export-hf", type=given, default=None, metavar="DIR",
                   help="also write the Hugging Face safetensors layout here (a folder without weights yet)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    parts = [part.strip() for part in args.train.split(",") if part.strip()]
    if not parts or set(parts) - set(PARTS):
        p.error(f"--train takes a comma-separated subset of {','.join(PARTS)} (got {args.train!r})")
    if args.warmup is not None and args.warmup >= args.steps:  # (`Settings` checks it too, for Python callers)
        p.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    if args.lora_alpha is not None and args.full:
        p.error("--lora-alpha scales LoRA adapters; --full trains the weights themselves and takes none")
    if args.eval_every and args.eval is None:
        p.error("--eval-every goes with --eval FILE (the conversations to compute the eval loss on)")

    def log(line: str) -> None:
        try:
            print(line, file=sys.stderr, flush=True)
        except OSError:  # (stderr gone: a closed terminal, a reader that left) the run goes on, unheard
            pass

    def body() -> int:
        with interrupts_held():  # (importing JAX)
            from vl2_jax.training.loop import Settings
            from vl2_jax.training.run import Job, counted, finetune

        rank = 0 if args.full else args.lora_rank
        settings = Settings(
            steps=args.steps, batch=args.batch, grad_accum=args.grad_accum, lr=args.lr,
            warmup=args.warmup if args.warmup is not None else min(10, (args.steps - 1) // 2),
            weight_decay=args.weight_decay, clip=args.clip, max_seq_len=args.max_seq_len, seed=args.seed,
            lora_rank=rank, lora_alpha=(args.lora_alpha if args.lora_alpha is not None else 2.0 * rank),
            parts=tuple(parts),
            save_every=args.save_every, eval_every=args.eval_every)
        job = Job(args.model, args.data, args.out, settings, eval=args.eval, export_hf=args.export_hf, dtype=args.dtype,
                  mesh=args.mesh, resume=args.resume, force=args.force, remat=not args.no_remat, moe=args.moe)
        result = finetune(job, log)
        if result is None or not result.losses:  # (a finished run: its outputs were there, or are now)
            done = "its model is there" if result is None else "wrote what it had not written yet"
            print(f"nothing to train: {args.out} is at step {args.steps}; {done}")
            return 0
        last = f", eval loss {result.evals[max(result.evals)]:.4f}" if result.evals else ""
        print(f"trained {counted(len(result.losses), 'step')}: loss {result.losses[0]:.4f} -> "
              f"{result.losses[-1]:.4f}{last}; model in {args.out}")
        return 0

    return guarded(body, log)


def exit_with_main() -> None:
    """`python -m vl2_jax.finetune` and `vl2-finetune`: `main()`, then out of the process at once (`leave`:
    Python's teardown beside a step still compiling on JAX's threads, after a Ctrl-C, crashed it)."""
    leave(main())


if __name__ == "__main__":
    exit_with_main()
