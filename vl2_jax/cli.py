"""What `python -m generate` does once its arguments are parsed: load, ask, stream or print JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from vl2_jax.chat import ChatSession
from vl2_jax.errors import InputError, VL2Error

TEMPLATE_STOP = ("User:",)


def explain(error: BaseException) -> str:
    """One line for any error: ours as they are, out-of-memory with the likely fixes, others by type."""
    text = " ".join(str(error).split())
    if isinstance(error, VL2Error):
        return text
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return ("the accelerator ran out of memory; try a smaller batch or --max-new-tokens, --prefill-chunk 512, "
                "--dtype bfloat16, or more devices.")
    if isinstance(error, OSError):
        return text
    return f"{type(error).__name__}: {text}"


def _default_dtype() -> str:
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def run(args, log: Callable[[str], None]) -> int:
    from vl2_jax.hub import load_model

    if args.temperature < 0:
        raise InputError(f"--temperature must be >= 0 (got {args.temperature}).")
    if not 0 < args.top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1] (got {args.top_p}).")
    if args.top_k < 0:
        raise InputError(f"--top-k must be >= 0 (got {args.top_k}).")
    if not args.chat and args.prompt is None:
        raise InputError("give --prompt TEXT (or --chat for an interactive session).")
    model = load_model(args.model, args.dtype or _default_dtype(), log)
    images = [model.processor.load_image(p) for p in args.image]
    options = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=TEMPLATE_STOP if args.stop is None else tuple(args.stop), prefill_chunk=args.prefill_chunk,
    )
    session = ChatSession()
    if not args.chat:
        return _answer(model, session.ask(args.prompt, images), images, options, args.json, log)
    log("chat: type a message and press Enter; an empty line or Ctrl-D ends the session.")
    pending = images
    for raw in sys.stdin.buffer:
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            log(f"error: that line is not valid UTF-8 ({e.reason} at byte {e.start}); please type it again.")
            continue
        if not line:
            break
        answer = _answer(model, session.ask(line, pending), session.images, options, args.json, log, text_only=True)
        session.answer(answer)
        pending = []
    return 0


def _answer(model, conversation, images, options, as_json, log, text_only=False):
    batch = model.processor.batchify([model.processor(conversation, images)])
    stream = None if as_json else (lambda row, text: print(text, end="", flush=True))
    result = model.generate(batch, on_text=stream, **options)
    if as_json:
        print(json.dumps({
            "text": result.text[0], "token_ids": result.token_ids[0], "finish_reason": result.finish_reason[0],
            "prompt_tokens": result.prompt_tokens[0], "generated_tokens": result.generated_tokens[0],
            "ttft_s": round(result.ttft_s, 4), "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
        }, ensure_ascii=False), flush=True)
    else:
        print(flush=True)
        log(f"[{result.prompt_tokens[0]} prompt tokens, {result.generated_tokens[0]} generated "
            f"({result.finish_reason[0]}); first token {result.ttft_s * 1000:.0f} ms, "
            f"{result.decode_tokens_per_s:.1f} tokens/s]")
    return result.text[0] if text_only else 0
