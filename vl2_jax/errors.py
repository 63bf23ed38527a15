"""Exceptions that users see: each carries one sentence saying what is wrong, where, and what to do.
Also what every entry point shares around them: its argparse parser (`command_parser`, `number`), the
package version, the check that an output path can be written, and its last line of defence (`guarded`)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class VL2Error(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(VL2Error):
    """config.json, the tokenizer or processor files, a dtype, moe_impl or mesh spec: missing, unknown
    or not supported."""


class CheckpointError(VL2Error):
    """A checkpoint folder, weights file, shard, tensor or converted manifest that is missing, extra,
    mis-shaped, of the wrong dtype or unreadable."""


class InputError(VL2Error):
    """An image (see `processor.open_image` and `images.load_image`), a conversation, a prompt over the
    context limit or a generation argument that cannot be processed."""


class PromptTooLong(InputError):
    """A prompt (with its images' tokens) that leaves no room for an answer in a slot: `tokens` of it
    against the `room` of `max_seq_len` - 1 tokens a slot has for it."""

    def __init__(self, message: str, tokens: int, room: int):
        super().__init__(message)
        self.tokens, self.room = tokens, room


class DeviceMemoryError(VL2Error, MemoryError):
    """The accelerator ran out of memory; the message says during what and what to try."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type's name where it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def read_json_object(file: Path) -> dict:
    """The JSON object in checkpoint file `file`, or a ConfigError naming the file."""
    try:
        value = json.loads(Path(file).read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{file} is not valid JSON ({one_line(exc)}); copy it again from the original "
                          f"checkpoint.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{file} must hold a JSON object, not a {type(value).__name__}.")
    return value


def text_lines(text: str) -> list[str]:
    """A JSON-lines file's lines: split at "\n" alone (a "\r" before it dropped), since JSON strings may
    hold U+2028, U+0085 and the other breaks `str.splitlines` also splits at."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def check_text(text: str, name: str) -> None:
    """Refuses (InputError, naming it as `name`) text that holds a surrogate: a byte that is not UTF-8,
    as Python keeps it from the command line, or half of a UTF-16 pair, as a JSON escape can write it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{name} is not UTF-8 text (it holds \\u{ord(text[e.start]):04x}, no character: a byte "
                         "that is not UTF-8, or half of a surrogate pair written alone as a JSON escape); check the "
                         "terminal's or the file's encoding.") from None


def read_lines(path: Path) -> list[str]:
    """The UTF-8 file `path`'s `text_lines` (a byte order mark at its start is no text); one InputError
    where it cannot be read or is not UTF-8."""
    try:
        return text_lines(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an accelerator's out-of-memory failure (XLA's RESOURCE_EXHAUSTED) rather than
    one of ours or another failure."""
    if isinstance(error, VL2Error):
        return isinstance(error, DeviceMemoryError)
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


OUT_OF_MEMORY_ADVICE = ("try a smaller Runtime(max_batch=..., max_seq_len=...), prefill_chunks=(512,), dtype='bfloat16', "
                        "or more devices (mesh='auto')")


@contextlib.contextmanager
def out_of_memory_as(what: str):
    """Turns an accelerator's out-of-memory failure into a `DeviceMemoryError` that says during what and
    what to try; every other exception passes through unchanged."""
    try:
        yield
    except VL2Error:
        raise
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise DeviceMemoryError(f"the accelerator ran out of memory {what}; {OUT_OF_MEMORY_ADVICE}.") from e


def explain(error: BaseException) -> str:
    """One line for any error, as the command lines print it after `error: `: ours as they are,
    out-of-memory with the likely fixes, others by type."""
    text = " ".join(str(error).split())
    if isinstance(error, VL2Error):
        return text
    if is_out_of_memory(error):
        return ("the accelerator ran out of memory; try a smaller --max-seq-len, --prefill-chunk 512, "
                "--dtype bfloat16, or more devices.")
    if isinstance(error, MemoryError):
        return "the host ran out of memory (MemoryError); close other programs, or try --dtype bfloat16 or a smaller model."
    if isinstance(error, OSError):
        return text
    return f"{type(error).__name__}: {text}"


def package_version() -> str:
    """vl2-jax's version: the installed distribution's, else (a plain checkout) pyproject.toml's."""
    import importlib.metadata

    try:
        return importlib.metadata.version("vl2-jax")
    except importlib.metadata.PackageNotFoundError:
        import re

        pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
        with open(pyproject, encoding="utf-8") as f:
            return re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's examples as written and ends each option's help with its default, unless the
    help already names it (or there is none to name: None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] or \
            action.default is argparse.SUPPRESS
        if not action.option_strings or unset or "default" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A malformed flag: one short usage line (not every option) and argparse's error line, status 2."""
        positionals = "".join(f" {a.metavar or a.dest.upper()}" for a in self._actions if not a.option_strings)
        self.exit(2, f"usage: {self.prog} [options]{positionals}  ({self.prog} --help lists them)\n"
                     f"{self.prog}: error: {message}\n")


def command_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An entry point's parser: `doc`'s first line as the description, its indented `python -m ...` lines
    as the examples after the options, every option's default in its help, and `--version`. `prog`: how
    its messages name the command ("python -m generate"), or the installed script's name when that is
    what ran it (`vl2-generate`)."""
    examples = [line for line in doc.splitlines() if line.startswith("    python -m ")]
    epilog = "examples:\n" + "\n".join(line[2:] for line in examples) if examples else None
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    p = _Parser(prog=script if script.startswith("vl2-") else prog, description=doc.splitlines()[0], epilog=epilog,
                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                   help="print the package version and exit")
    return p


def number(kind=int, low=1, high=None, what: str | None = None, above: bool = False):
    """An argparse type: `kind(text)` within [low, high] (`above`: within (low, high], finite) (`what`
    names it in the message; default "a whole number of at least LOW" for int, "a number" otherwise). A
    refusal is argparse's one error line."""
    what = what or (f"a whole number of at least {low}" if kind is int and high is None else
                    "a whole number" if kind is int else "a number")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} (got {text!r})") from None
        if above and not low < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number above {low} (got {text})")
        if value < low or (high is not None and value > high) or value != value:  # (value != value: nan)
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds} (got {text})")
        return value

    return parse


def given(text: str) -> str:
    """An argparse type: a path or name that is not blank (an empty path would mean the current folder,
    or turn its option off)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty or blank")
    return text


def number_list(kind=int, low=1, item: str = "value"):
    """An argparse type: comma-separated numbers, each as `number(kind, low)` takes it ('' gives none);
    a refusal names the `item` and the whole text."""
    parse = number(kind, low)

    def parse_all(text: str) -> list:
        try:
            return [parse(t.strip()) for t in text.split(",") if t.strip()]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"each {item} {e} (in {text!r})") from None

    return parse_all


def not_writable_because(error: OSError, parent: Path, what: str = "folder") -> str:
    """Why a `what` ("folder" or "file") could not be created in `parent`, in words (the errno's text
    names the wrong path)."""
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to create a {what} in {parent}"
    if error.errno == errno.EROFS:
        return f"{parent} is on a read-only file system"
    if error.errno == errno.ENOSPC:
        return f"no space left on the device of {parent}"
    if error.errno == errno.ENOENT:  # the parent exists, yet refuses new entries (e.g. /proc)
        return f"{parent} does not allow creating {what}s in it"
    return f"creating a {what} in {parent} failed ({error.strerror or error})"


def same_file(a, b) -> bool:
    """Whether two paths name one file or folder: the same path after links, or one under two names (a
    hard link, a bind mount)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # (one of them does not exist yet)
        return False


def check_can_create(folder: Path, flag: str) -> None:
    """Refuses (InputError), before anything loads, an output `folder` (given as `flag`) that this process
    cannot create, or write in where it exists: its nearest existing ancestor must be a folder in which
    a folder can be made (tried, and removed again at once)."""
    base = folder.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise InputError(f"{flag} {folder}: {base} is a file, not a folder; choose another path.")
    try:
        probe = tempfile.mkdtemp(prefix=".vl2-probe-", dir=base)
    except OSError as e:
        raise InputError(f"cannot write {flag} {folder}: {not_writable_because(e, base)}; choose another path.") from None
    os.rmdir(probe)


def some(names: list[str], n: int = 5) -> str:
    """Names for a message: the first `n`, then how many more ("a, b, c and 4 more")."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


_DROPPED = threading.Event()  # a KeyboardInterrupt that Python dropped since `guarded` began


def sigterm_as_interrupt() -> None:
    """From now on SIGTERM (a job scheduler's or `kill`'s stop) raises KeyboardInterrupt, so a command
    ends as on Ctrl-C (`guarded`: "interrupted"). Called by `guarded` and again once JAX is imported:
    its libraries install a handler of their own, which prints a stack dump. Only on the main thread,
    where handlers live, and not where the process ignores SIGTERM."""
    if threading.current_thread() is threading.main_thread() and not _ignored(signal.SIGTERM):
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _ignored(sig) -> bool:
    """Whether the process ignores `sig` (`nohup` ignores SIGHUP; a shell's background job, SIGINT):
    a stop that the user has turned off is left off."""
    return signal.getsignal(sig) is signal.SIG_IGN


def _stop_signals() -> list:
    """SIGINT, SIGTERM and (where there is one) SIGHUP, less those the process ignores."""
    signals = [signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
    return [sig for sig in signals if not _ignored(sig)]


@contextlib.contextmanager
def interrupts_held():
    """`with interrupts_held(): from vl2_jax... import ...` for the imports that bring in JAX: a Ctrl-C,
    SIGTERM or SIGHUP that comes meanwhile waits for the block's end, then raises KeyboardInterrupt (the
    command ends with "interrupted"); a second one raises at once (an import that hangs)
    (`deferred_interrupt`). An interrupt's exception raised while an extension module initialises can
    crash the interpreter (importing jaxlib: a segmentation fault, an abort or a stray TypeError in a
    few of every hundred Ctrl-Cs sent within the first second of `python -m generate`). The handlers
    before it come back at the block's end, but SIGTERM's: from then on it raises KeyboardInterrupt
    (`sigterm_as_interrupt`: JAX's libraries install a handler of their own while they are imported)."""
    try:
        with deferred_interrupt() as stop:
            yield
    finally:
        sigterm_as_interrupt()
    if stop.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupt():
    """Within `with deferred_interrupt() as stop:` the first Ctrl-C, SIGTERM or SIGHUP (the terminal
    closing) only sets the event `stop` (the caller ends its work at a point of its choosing and raises
    KeyboardInterrupt); a second one raises KeyboardInterrupt at once. The signal handlers before it come
    back afterwards; signals the process ignores (`nohup`'s SIGHUP) stay ignored. Off the main thread,
    where handlers cannot be set, `stop` is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    before = {sig: signal.signal(sig, handler) for sig in _stop_signals()}
    try:
        yield stop
    finally:
        for sig, old in before.items():
            signal.signal(sig, old)


def _noting_dropped_interrupts(hook):
    """`sys.unraisablehook` that remembers a KeyboardInterrupt instead of printing it: Python drops the
    exception a signal raises inside a garbage-collection callback (JAX has one, busy while JAX is
    imported) and goes on; `guarded` and `check_interrupt` then end the command at its next step."""
    def unraisable(info):
        if isinstance(info.exc_value, KeyboardInterrupt):
            _DROPPED.set()
        else:
            hook(info)

    return unraisable


def check_interrupt() -> None:
    """Raises KeyboardInterrupt if Python dropped one (see `_noting_dropped_interrupts`): for a command's
    next step (after importing JAX, each streamed piece, each answer of a batch)."""
    if _DROPPED.is_set():
        raise KeyboardInterrupt


def leave(code: int) -> NoReturn:
    """An entry point's exit: out of the process at once with `code`, once its output is flushed.
    Python's teardown would destroy JAX's backends first (~0.4 s on a CPU) and wait for threads still
    compiling (an interrupted warmup); the command has nothing left to write or close by then. Across
    processes (`--coordinator`), each first leaves the distributed runtime as JAX's own exit would
    (waiting for the others), so process 0's coordination service outlives every process's work."""
    jax = sys.modules.get("jax")
    if jax is not None:
        is_initialized = getattr(jax.distributed, "is_initialized", None)
        if is_initialized is None:  # (an older JAX: let Python's teardown do its shutdown)
            sys.exit(code)
        if is_initialized():
            jax.distributed.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


def _show_warning(log: Callable[[str], None], message) -> None:
    """A warning as one `warning: ...` line; like Python's own display, nothing if stderr is gone."""
    try:
        log("warning: " + " ".join(str(message).split()))
    except (OSError, ValueError):  # (a closed or broken stderr)
        pass


def guarded(body: Callable[[], int], log: Callable[[str], None]) -> int:
    """An entry point's last line of defence: `body()`'s exit status; on Ctrl-C "interrupted" and 130;
    when whatever reads stdout has gone (`... | head`), quietly 141 (as a shell reports a command ended
    by SIGPIPE), stdout then pointing nowhere so that nothing tries to write there again; on any other
    exception one `error: ...` line (`explain`) and 1, never a traceback. SIGTERM raises KeyboardInterrupt
    from the start (`sigterm_as_interrupt`). Warnings are `warning: ...` lines (not Python's file, line
    and source)."""
    sigterm_as_interrupt()
    _DROPPED.clear()  # (a command run in-process starts afresh)
    hook, sys.unraisablehook = sys.unraisablehook, _noting_dropped_interrupts(sys.unraisablehook)
    try:
        with warnings.catch_warnings():  # (restores the display afterwards)
            warnings.showwarning = lambda message, *_, **__: _show_warning(log, message)
            code = body()
        check_interrupt()  # (a Ctrl-C whose exception was dropped on the way)
        return code
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # (stdout is not a file descriptor: nothing to point elsewhere)
            pass
        return 141
    except Exception as e:  # noqa: BLE001 - one sentence, no traceback
        log("error: " + explain(e))
        return 1
    finally:
        sys.unraisablehook = hook
