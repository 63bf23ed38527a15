"""Ask DeepSeek-VL2 about images from the command line.

    python -m generate --image cat.jpg --prompt "Describe the image."
    python -m generate --model random:test --image cat.jpg --prompt "<image> What is this?" --json
    python -m generate --input requests.jsonl --output answers.jsonl

The answer streams to stdout; loading, compile and speed notes go to stderr. `--json` prints one JSON
object instead. A bad argument, image, prompt or checkpoint prints one `error: ...` line, exit status 1
(a malformed flag, e.g. `--max-new-tokens 0`: argparse's usage line and its error line, exit status 2).
Images and the prompt are checked before the model loads.
"""

from __future__ import annotations

import argparse
import sys

from vl2_jax import prefetch
from vl2_jax.config import ATTENTION_IMPLS, MOE_IMPLS, QUANTS
from vl2_jax.errors import command_parser, given, guarded, interrupts_held, leave, number

DEFAULT_MODEL = "deepseek-ai/deepseek-vl2-tiny"


def _parser() -> argparse.ArgumentParser:
    p = command_parser("python -m generate", __doc__)
    p.add_argument("--model", type=given, default=DEFAULT_MODEL,
                   help="local checkpoint folder (Hugging Face or converted), a hub id (downloaded and converted "
                        f"once), or random:tiny|small|base|test for random weights offline (default: {DEFAULT_MODEL})")
    p.add_argument("--image", action="append", default=[], metavar="PATH|URL",
                   help="an image: a file path, an http(s) URL (fetched, 30 s at most), a data:image/...;base64 "
                        "URL or raw base64; repeat for several images")
    p.add_argument("--prompt", default=None,
                   help="the question; use <image> placeholders to place images, or none to put them first")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="a system prompt, placed before the conversation (default: none)")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=512, help="the answer's length limit")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off; -1 is off too, as in SGLang)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide seen tokens' positive logits by it, multiply their negative ones (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (temperature > 0)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help='stop when the answer contains TEXT; repeatable (default: "User:", the chat template\'s; given ones '
                        'replace it: add "User:" to keep it, or --stop "" for no stop string)')
    p.add_argument("--prefill-chunk", type=number(int, 1), default=None,
                   help="write the prompt into the cache this many tokens at a time (same answer, less memory; "
                        "default: one chunk, the smallest of 128, 256, 512, 768, 1024, 1280, 1536, 2048, 3072, 4096 that "
                        "holds the prompt)")
    p.add_argument("--max-seq-len", type=number(int, 1), default=None,
                   help="tokens the answer's slot holds, prompt included (default: the model's context)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="default: bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--chat", action="store_true",
                   help="interactive multi-turn chat on stdin: --prompt, if given, is the first turn; --image files "
                        "go with the first turn, '/image PATH' (or URL) on its own line with the next; '/new' starts a "
                        "new conversation, '//' begins a message with '/'")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer, with its timings (--input always writes JSON lines)")
    p.add_argument("--input", default=None, metavar="FILE.jsonl",
                   help="a batch job: one request per line ({\"prompt\": ..., \"images\": [...], and optionally "
                        "\"id\", \"system\", \"max_new_tokens\", \"temperature\", \"top_p\", \"top_k\", "
                        "\"repetition_penalty\", \"seed\", \"stop\"; the flags give the defaults; image paths relative to "
                        "the current directory); '-' reads stdin. "
                        "One JSON answer per line, in input order, to stdout or --output")
    p.add_argument("--output", type=given, default=None, metavar="FILE.jsonl", help="with --input: write the answers there")
    p.add_argument("--max-batch", type=number(int, 1), default=None,
                   help="requests decoded together (default: 8 with --input, else 1)")
    p.add_argument("--mesh", default=None, metavar="SPEC",
                   help="shard over devices: 'auto' (all visible devices) or sizes such as expert=4,tensor=2 "
                        "(axes data, expert, tensor; they must multiply to the device count)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several hosts: the coordinator address for jax.distributed (with --num-processes, --process-id)")
    p.add_argument("--num-processes", type=int, default=None, help="several hosts: how many processes in all")
    p.add_argument("--process-id", type=int, default=None, help="several hosts: this process's index (0 prints)")
    p.add_argument("--moe", default="auto", choices=MOE_IMPLS,
                   help="routed-expert dispatch: auto (default: the fastest measured for the token count), or "
                        "dense (the plain path: every expert on every token), gather, grouped, ragged, blocked (expert-sorted "
                        "blocks, plain XLA)")
    p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS,
                   help="attention: auto (default: cuDNN flash attention for images and prompts on NVIDIA GPUs "
                        "in bf16/f16), or plain (the reference's arithmetic everywhere), cudnn, xla")
    p.add_argument("--kernels", default="on", choices=["on", "off"],
                   help="accelerator kernels (Pallas MoE and matrix-vector kernels, cuDNN attention under "
                        "--attention auto) where they apply (default: on); off runs the portable paths")
    p.add_argument("--quant", default=None, choices=QUANTS,
                   help="the language model's weights as int8 or fp8 (e4m3) values with per-output-channel float32 "
                        "scales, quantized as they load (default: as the checkpoint holds them; a `convert --quant` "
                        "output loads only as its own format)")
    p.add_argument("--draw-boxes", type=given, default=None, metavar="OUT.png",
                   help="draw the answer's grounding boxes on the first --image and save it to OUT.png")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep compiled programs in DIR between runs (default: $VL2_JAX_COMPILE_CACHE, else "
                        "~/.cache/vl2_jax/xla, under $XDG_CACHE_HOME where set; '' turns it off; "
                        "JAX_COMPILATION_CACHE_DIR, if set, wins)")
    return p


def main(argv: list[str] | None = None) -> int:
    log = lambda line: print(line, file=sys.stderr, flush=True)

    def body() -> int:  # (Ctrl-C from here on ends in "interrupted")
        args = _parser().parse_args(argv)
        if args.coordinator is None:  # (across hosts each process reads only what it needs)
            prefetch.start(args.model)  # the disk reads the weights while JAX is imported and starts
        with interrupts_held():  # (importing JAX)
            from vl2_jax.cli import run

        return run(args, log)

    return guarded(body, log)


def exit_with_main() -> None:
    """`python -m generate` and `vl2-generate`: `main()`, then out of the process at once (`leave`)."""
    leave(main())


if __name__ == "__main__":
    exit_with_main()

