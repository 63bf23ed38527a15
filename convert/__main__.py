"""Command line: convert a Hugging Face DeepSeek-VL2 checkpoint folder into a vl2_jax Orbax folder.

    python -m convert deepseek-vl2-small/ vl2-small-orbax/ --dtype bfloat16
    python -m convert deepseek-vl2-small/ vl2-small-int8/ --quant int8

Progress goes to stderr, the one-line summary to stdout. The destination is checked before anything is
read: a folder that cannot be written, or an existing one that is not a vl2_jax checkpoint (never replaced,
even with --force), fails at once. A bad input (missing folder or config, missing, unexpected or
mis-shaped tensors, truncated files) or destination prints one `error: ...` line and exits with status 1;
a warning (e.g. an unknown, ignored key in config.json) prints one `warning: ...` line and the run goes on.
Ctrl-C or SIGTERM ends it with status 130 and one line (`error: interrupted; DST was not written.` once
the conversion has begun), the partial output removed.
"""

from __future__ import annotations

import os
import sys

from vl2_jax.errors import VL2Error, check_interrupt, explain, guarded, interrupts_held, leave


def _parser():
    from vl2_jax.errors import command_parser, given

    p = command_parser("python -m convert", __doc__)
    p.add_argument("src", type=given, help="Hugging Face folder: config.json, safetensors weights, tokenizer and processor files")
    p.add_argument("dst", type=given, help="output folder (created inside an existing folder; must not exist unless --force)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="saved dtype (default: the source's)")
    p.add_argument("--quant", choices=["none", "int8", "fp8"], default="none",
                   help="save the language model's weights as int8 or fp8 (e4m3) values with per-output-channel "
                        "float32 scales (default: none)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing converted checkpoint (or empty folder) at DST; never any other folder (a DST "
                        "that is a link to a checkpoint: the link is replaced, the folder it names is kept)")
    return p


def main(argv: list[str] | None = None) -> int:
    log = lambda line: print(line, file=sys.stderr, flush=True)

    def body() -> int:  # (Ctrl-C or SIGTERM from here on ends in "interrupted", status 130)
        args = _parser().parse_args(argv)
        # Conversion is host work: keep jax (which orbax initialises) off any accelerator it would grab.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        with interrupts_held():  # (importing JAX)
            from vl2_jax.orbax_io import convert_checkpoint, format_bytes

        try:
            # (a Ctrl-C that Python dropped on the way ends the run at its next step: `check_interrupt`)
            result = convert_checkpoint(args.src, args.dst, args.dtype, args.force, quant=args.quant,
                                        progress=lambda line: (check_interrupt(), log(line)))
        except KeyboardInterrupt:
            log(f"error: interrupted; {args.dst} was not written.")
            return 130
        except (VL2Error, OSError) as e:
            log("error: " + " ".join(str(e).split()))
            return 1
        except Exception as e:  # noqa: BLE001 - last line of defence (out of memory, an orbax failure): one line
            log(f"error: {explain(e).rstrip('.')}; {args.dst} was not written.")
            return 1
        print(
            f"converted {args.src} -> {args.dst}: {result['num_parameters']:,} parameters in "
            f"{len(result['groups'])} groups, {result['dtype']}{'' if result['quant'] == 'none' else ', ' + result['quant']}, "
            f"{format_bytes(result['bytes'])}, {result['seconds']:.1f} s"
        )
        return 0

    return guarded(body, log)


def exit_with_main() -> None:
    """`python -m convert` and `vl2-convert`: `main()`, then out of the process at once (`leave`)."""
    leave(main())


if __name__ == "__main__":
    exit_with_main()
