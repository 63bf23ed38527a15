"""What `python -m generate` does once its arguments are parsed: load, ask, stream or print JSON."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vl2_jax.chat import ChatSession, check_system, user_turn
from vl2_jax.config import Runtime
from vl2_jax.errors import (
    InputError,
    PromptTooLong,
    check_interrupt,
    explain,
    not_writable_because,
    same_file,
    text_lines,
)
from vl2_jax.generation import check_max_new_tokens, stop_strings
from vl2_jax.images import ImageLimits, describe, load_image, local_path
from vl2_jax.sampling import check_sampling

TEMPLATE_STOP = ("User:",)


def _start_distributed(args) -> bool:
    """Joins the multi-controller runtime when --coordinator is given; True on process 0 (the printer)."""
    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if not any(given):
        return True
    if not all(given):
        raise InputError("several hosts need all of --coordinator HOST:PORT, --num-processes N and --process-id I.")
    if not 0 <= args.process_id < args.num_processes:
        raise InputError(f"--process-id must be in [0, {args.num_processes}) (got {args.process_id}).")
    import jax

    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    return jax.process_index() == 0


def run(args, log: Callable[[str], None]) -> int:
    from vl2_jax import executables, load
    from vl2_jax.processor import TileCache

    speaks = _start_distributed(args)
    if not speaks:
        # Only process 0 speaks; the others run exactly the same steps (streaming included, so every
        # process issues the same device programs) with their output discarded.
        log = lambda line: None
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    check_sampling(args.temperature, args.top_p, args.top_k, args.repetition_penalty, flags=True)
    batch_file = getattr(args, "input", None)
    if batch_file is not None and (args.chat or args.prompt is not None or args.image):
        raise InputError("--input takes its prompts and images from the file; leave out --prompt, --image and --chat.")
    if batch_file is None and getattr(args, "output", None):
        raise InputError("--output goes with --input FILE.jsonl.")
    if not args.chat and args.prompt is None and batch_file is None:
        raise InputError("give --prompt TEXT (or --chat for an interactive session, or --input FILE.jsonl).")
    if getattr(args, "draw_boxes", None) and batch_file is not None:
        raise InputError("--draw-boxes goes with one --prompt and --image, not with --input.")
    if getattr(args, "draw_boxes", None) and not args.image:
        raise InputError("--draw-boxes needs an --image (the boxes are drawn on the first image).")
    output = getattr(args, "output", None)
    if output and batch_file not in (None, "-") and same_file(output, batch_file):
        raise InputError(f"--output {output} is the --input file; write the answers elsewhere.")
    if output and os.path.isdir(output):
        raise InputError(f"--output {output} is a folder; name the file to write the answers to.")
    if output and not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise InputError(f"--output {output}: its folder does not exist; create it or choose another path.")
    if output:
        _check_writable(output)
    # Images, the prompts and --draw-boxes are checked before the model loads, so a typo fails in a
    # second, not minutes.
    limits = ImageLimits.cli()
    images = [load_image(ref, limits) for ref in args.image]
    if args.prompt is not None:
        user_turn(args.prompt, len(images))
    system = getattr(args, "system", None)
    check_system(system, "--system")
    if getattr(args, "draw_boxes", None):
        check_draw_boxes(args.draw_boxes, args.image)
    lines = read_requests(batch_file) if batch_file is not None else None
    if lines is not None and not any(line.strip() for line in lines):
        log(f"--input {batch_file} holds no requests; nothing to answer")
        return 0
    cache_dir = executables.use_compile_cache(executables.cache_dir(getattr(args, "compile_cache", None)), log,
                                              jax_cache=args.mesh is not None)
    chunks = {} if args.prefill_chunk is None else {"prefill_chunks": (args.prefill_chunk,)}
    max_batch = getattr(args, "max_batch", None) or (8 if batch_file is not None else 1)
    runtime = Runtime(moe=args.moe, attention=args.attention, kernels=args.kernels == "on", max_batch=max_batch,
                      max_seq_len=args.max_seq_len, **chunks)
    start = time.perf_counter()
    with load.progress_bar(enabled=speaks) as bar:  # drawn only where stderr is a terminal
        model = load.load_model(args.model, args.dtype, runtime=runtime, mesh=args.mesh, progress=log,
                                bytes_progress=bar, quant=args.quant, programs=cache_dir)
    options_timing = {"load_s": time.perf_counter() - start}
    if model.layout is not None:
        log(f"mesh {dict(model.mesh.shape)}" + "".join(f"\n  {line}" for line in model.layout.summary()))
    options = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=TEMPLATE_STOP if args.stop is None else tuple(args.stop),
    )
    if lines is not None:
        return answer_file(model, lines, args, options, limits, log)
    session = ChatSession(system=system)
    if not args.chat:
        conversation, _ = session.ask(args.prompt, images)
        text = _answer(model, conversation, images, options, args.json, log, text_only=True, timing=options_timing)
        _draw_boxes(getattr(args, "draw_boxes", None), images, text, log)
        return 0
    model.processor.tile_cache = TileCache(64 << 20)  # (each turn sends the chat's images again)
    log("chat: type a message and press Enter; /image PATH (or an http(s) or data: URL) attaches an image to "
        "your next message; /new starts a new conversation (// sends a message that begins with /); an empty line or "
        "Ctrl-D ends the session.")
    pending = images
    for line in chat_lines(args.prompt, log):
        if not line:
            break
        try:
            if line == "/new":
                session, pending = ChatSession(system=system), []
                log("a new conversation: the turns so far and their images are forgotten")
                continue
            word = line.split(maxsplit=1)[0]
            if word == "/image":
                ref = line[len("/image"):].strip()
                if not ref:
                    raise InputError("/image needs a path or URL, e.g. /image photo.jpg.")
                pending = [*pending, load_image(ref, limits)]
                log(f"{describe(ref)} goes with your next message")
                continue
            if word == "/new":
                raise InputError("/new takes nothing after it; type /new alone to start a new conversation.")
            if re.fullmatch(r"/[A-Za-z]\w*", word):
                raise InputError(f"unknown command {word}: the commands are /image PATH and /new; start a message "
                                 "with // to send one that begins with /.")
            line = line[1:] if line.startswith("//") else line
            check_interrupt()
            conversation, every_image = session.ask(line, pending)
            answer = _answer(model, conversation, every_image, options, args.json, log, text_only=True,
                             timing=options_timing)
            options_timing = None  # (the load belongs to the first answer's line)
        except PromptTooLong as e:
            conversation, every_image = ChatSession(system=system).ask(line, pending)
            if not session.turns or len(model.processor(conversation, every_image).input_ids) > e.room:
                log("error: " + explain(e))  # (this message alone does not fit: a new conversation would not help)
                continue
            larger = model.engine.max_seq_len < model.cfg.language.max_position_embeddings
            log(f"error: the conversation so far and this message come to {e.tokens} tokens, but a slot has room "
                f"for {e.room} before an answer; type /new to start a new conversation"
                + (", or start the chat again with a larger --max-seq-len." if larger else "."))
            continue
        except Exception as e:  # noqa: BLE001 - one bad turn is one error line; the session goes on
            log("error: " + explain(e))
            continue
        session.answer(answer)
        pending = []
        try:
            _draw_boxes(getattr(args, "draw_boxes", None), session.images, answer, log)
        except Exception as e:  # noqa: BLE001 - the answer stands; only its drawing failed
            log("error: " + explain(e))
    if pending:
        log(f"{len(pending)} attached image{'s were' if len(pending) > 1 else ' was'} not sent: the session ended "
            "before a message to go with it")
    return 0


def _check_writable(path: str) -> None:
    """Refuses, before the model loads, an --output file this process cannot write (a file it creates
    for the test goes again; a link to no file is left to the writing, where the folder it names exists)."""
    if os.path.islink(path) and not os.path.exists(path):
        target = os.path.realpath(path)
        if not os.path.isdir(os.path.dirname(target)):
            raise InputError(f"--output {path} is a link to {target}, whose folder does not exist; create it or "
                             f"choose another path.")
        return
    existed = os.path.exists(path)
    try:
        open(path, "a").close()  # noqa: SIM115 - (opened to try, closed at once)
    except OSError as e:
        why = e.strerror if existed else not_writable_because(e, Path(os.path.abspath(path)).parent, "file")
        raise InputError(f"cannot write --output {path}: {why}; choose another path.") from None
    if not existed:
        with contextlib.suppress(FileNotFoundError):  # (another process of a multi-host run tried it too)
            os.unlink(path)


REQUEST_KEYS = {"id", "prompt", "images", "system", "max_new_tokens", "temperature", "top_p", "top_k",
                "repetition_penalty", "seed", "stop"}


def read_requests(path: str) -> list[str]:
    """The lines of a --input file ('-': stdin), read before the model loads (a missing file fails at once)."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise InputError(f"cannot read --input {path}: {e.strerror or e}") from None
    # bytes that are not UTF-8 stay as surrogates, so that only their line is refused (`answer_file`)
    return text_lines(data.decode("utf-8", "surrogateescape").removeprefix("\ufeff"))  # (a BOM is no text)


def answer_file(model, lines: list[str], args, options: dict, limits: ImageLimits, log) -> int:
    """--input: every non-blank line a request, answered in batches on the engine; one JSON line per
    request, in input order, to --output or stdout. A bad line gets {"line", "error"} and the rest go on."""
    from tqdm import tqdm

    from vl2_jax.engine import Request
    from vl2_jax.generation import Job
    from vl2_jax.sampling import RowSampling

    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115 - closed below
    todo = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    done: dict[int, dict] = {}
    written, failed = [0], [0]  # index into todo of the next record to write; error records
    where: dict[int, tuple[int, object]] = {}  # id(job) -> (line number, the request's "id")
    # a bar where stderr is a terminal (tqdm's disable=None); piped stderr keeps its lines
    bar = tqdm(total=len(todo), desc="requests", unit="req", file=sys.stderr, disable=None if todo else True)
    eos = model.cfg.language.eos_token_id

    def finish(number: int, record: dict) -> None:
        check_interrupt()  # (a Ctrl-C that Python dropped ends the batch at its next answer)
        done[number] = record
        failed[0] += "error" in record
        bar.update(1)
        while written[0] < len(todo) and todo[written[0]][0] in done:
            print(json.dumps(done.pop(todo[written[0]][0]), ensure_ascii=False), file=out, flush=True)
            written[0] += 1

    def jobs():
        for number, line in todo:
            ident = None
            try:
                try:
                    line.encode("utf-8")
                except UnicodeEncodeError:
                    raise InputError("not UTF-8 text") from None
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"not JSON ({e.msg} at column {e.colno})") from None
                if isinstance(rec, dict):
                    ident = rec.get("id")  # (in the answer, even when the line is refused)
                if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                    raise InputError('each line needs an object with a "prompt" string.')
                unknown = sorted(set(rec) - REQUEST_KEYS)
                if unknown:
                    raise InputError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(REQUEST_KEYS))}")
                rec = {key: value for key, value in rec.items() if value is not None}  # (null: the flag's default)
                settings = {k: rec.get(k, options[k]) for k in ("temperature", "top_p", "top_k", "repetition_penalty")}
                seed = rec.get("seed", options["seed"])
                check_sampling(**settings, seed=seed)
                max_new = rec.get("max_new_tokens", options["max_new_tokens"])
                check_max_new_tokens(max_new)
                stop = stop_strings(rec.get("stop", options["stop"]))
                refs = rec.get("images", [])
                if not isinstance(refs, list):
                    raise InputError('"images" must be a list of paths or URLs')
                session = ChatSession(system=rec.get("system", getattr(args, "system", None)))
                images = [load_image(ref, limits) for ref in refs]
                conversation, images = session.ask(rec["prompt"], images)
                request = Request.from_output(model.processor(conversation, images), model.cfg.tokens_per_tile_side)
                model.engine.check(request)
                job = Job(request, min(max_new, model.engine.max_seq_len),
                          RowSampling.make(seed=seed, **settings), stop, eos)
            except Exception as e:  # noqa: BLE001 - one bad line is one error record
                finish(number, {"line": number, "id": ident, "error": explain(e)})
                continue
            where[id(job)] = (number, ident)
            yield job

    def on_done(job) -> None:
        number, ident = where.pop(id(job))
        if job.finish_reason == "error":
            finish(number, {"line": number, "id": ident, "error": job.error})
            return
        finish(number, {"line": number, "id": ident, "text": job.text.text(), "token_ids": job.token_ids,
                        "finish_reason": job.finish_reason, "prompt_tokens": job.prompt_tokens,
                        "generated_tokens": len(job.token_ids)})

    try:
        model.run_jobs(jobs(), on_done)
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    log(f"answered {len(todo) - failed[0]} of {len(todo)} request(s)" + (f" -> {args.output}" if args.output else ""))
    return 1 if failed[0] else 0


def chat_lines(first: str | None, log: Callable[[str], None]):
    """The chat's lines, stripped: `first` (--prompt) if given, then stdin's until its end. On a terminal
    a `> ` marker on stderr precedes each line and `readline` (where Python has it) gives line editing
    and history; piped stdin is read as bytes, a line that is not UTF-8 reported and skipped."""
    if first is not None:
        yield first.strip()
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - importing it gives input() line editing and history
        except ImportError:
            pass
        while True:
            print("> ", end="", file=sys.stderr, flush=True)
            try:
                line = input()
            except EOFError:
                print(file=sys.stderr, flush=True)
                return
            yield line.strip()
    for raw in sys.stdin.buffer:
        try:
            yield raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            log(f"error: that line is not valid UTF-8 ({e.reason} at byte {e.start}); please type it again.")


def check_draw_boxes(out_path: str, image_refs: list[str]) -> None:
    """Refuses a --draw-boxes target before anything loads: its folder must exist and be writable, its
    extension one PIL writes, and it must not be one of the input image files (compared after resolving
    links; URLs and base64 name no file).

    Raises:
      InputError: one sentence naming the target and what is wrong with it.
    """
    from PIL import Image

    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise InputError(f"--draw-boxes {out_path}: the folder {folder} does not exist; create it or pick another path.")
    if not os.access(folder, os.W_OK):
        raise InputError(f"--draw-boxes {out_path}: the folder {folder} is not writable; pick another path.")
    if os.path.isdir(out_path):
        raise InputError(f"--draw-boxes {out_path} is a folder; give a file name such as boxes.png.")
    extension = os.path.splitext(out_path)[1].lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        raise InputError(f"--draw-boxes {out_path}: PIL cannot write {extension or 'files without an extension'}; "
                         f"use .png or .jpg.")
    for ref in image_refs:
        image = local_path(ref)
        if image is None:
            continue
        if same_file(image, out_path):
            raise InputError(f"--draw-boxes {out_path} is an input image ({ref}); pick another path, the input "
                             f"is kept as it is.")


def _draw_boxes(out_path, images, text, log) -> None:
    """--draw-boxes: the answer's boxes, relative to the first image, drawn on it and saved to `out_path`
    (by process 0 only when several processes share the work)."""
    import jax

    if not out_path or jax.process_index() != 0:
        return
    import warnings

    from vl2_jax.grounding import draw_boxes, parse_boxes

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        boxes = parse_boxes(text, images[0])
    for w in caught:
        log(f"warning: {w.message}")
    try:
        draw_boxes(images[0], boxes, out_path)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot write --draw-boxes {out_path}: {e}") from None
    log(f"drew {len(boxes)} box{'es' if len(boxes) != 1 else ''} on the first image -> {out_path}")


def _answer(model, conversation, images, options, as_json, log, text_only=False, timing=None):
    batch = model.processor.batchify([model.processor(conversation, images)])

    def show(row, text):
        check_interrupt()  # (a Ctrl-C that Python dropped inside a callback of its own ends the answer here)
        print(text, end="", flush=True)

    stream = None if as_json else show
    store = model.engine.executables
    before = store.report() if store is not None else None
    if before is not None and timing is not None:  # the first answer: every program since the store opened
        before = dict.fromkeys(before, 0)
    result = model.generate(batch, on_text=stream, **options)
    compile_s = result.compile_s  # the one-time cost of programs of new shapes, reported apart
    programs = {} if store is None else {  # this answer's programs: loaded from the cache / compiled
        f"programs_{k}": round(v - before[k], 4) for k, v in store.report().items()
        if k in ("loaded", "compiled", "load_s")}
    decoded = result.generated_tokens[0] > 1  # (one token: no decode step, no speed to tell)
    if as_json:
        print(json.dumps({
            "text": result.text[0], "token_ids": result.token_ids[0], "finish_reason": result.finish_reason[0],
            "prompt_tokens": result.prompt_tokens[0], "generated_tokens": result.generated_tokens[0],
            **{k: round(v, 4) for k, v in (timing or {}).items()}, "compile_s": round(compile_s, 4), **programs,
            "ttft_s": round(result.ttft_s, 4),
            "decode_tokens_per_s": round(result.decode_tokens_per_s, 2) if decoded else None,
        }, ensure_ascii=False), flush=True)
    else:
        print(flush=True)
        compiled = f"; compiling, one time: {compile_s:.1f} s" if compile_s >= 0.5 else ""
        if programs.get("programs_loaded"):
            n = programs["programs_loaded"]
            compiled += f"; {n} compiled program{'s' if n != 1 else ''} loaded from the cache"
        speed = f", {result.decode_tokens_per_s:.1f} tokens/s" if decoded else ""
        log(f"[{result.prompt_tokens[0]} prompt tokens, {result.generated_tokens[0]} generated "
            f"({result.finish_reason[0]}); first token {result.ttft_s * 1000:.0f} ms{compiled}{speed}]")
    return result.text[0] if text_only else 0
