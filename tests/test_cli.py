"""`python -m generate`: fixture greedy parity through the command line, offline random models, errors."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from generate.__main__ import main
from tests.conftest import FIXTURES, ckpt_dir, load_case, sigterm_when
from vl2_jax import load

ROOT = Path(__file__).resolve().parents[1]
SINGLE_TURN = ("text_only", "one_photo", "one_wide", "two_images", "three_images_no_crop")


def run_json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


# The command line is a thin layer over model.generate, whose parity test_generation checks on every
# case: here each variant once, together covering text only, a wide image, several images and no cropping.
@pytest.mark.parametrize("variant,name", [("mha", "three_images_no_crop"), ("mla", "one_wide"), ("mla_noaux", "text_only")])
def test_cli_greedy_matches_reference(capsys, variant, name):
    case = load_case(variant, name)
    greedy = case["arrays"]["greedy"].tolist()
    argv = ["--model", str(ckpt_dir(variant)), "--dtype", "float32", "--json", "--max-new-tokens", str(len(greedy)),
            "--prompt", case["conversation"][0]["content"]]
    for path in case["image_paths"]:
        argv += ["--image", str(path)]
    out = run_json(capsys, argv)
    assert out["token_ids"] == greedy
    assert out["generated_tokens"] == len(greedy) and out["prompt_tokens"] == case["arrays"]["input_ids"].shape[1]
    assert {"text", "finish_reason", "ttft_s", "decode_tokens_per_s"} <= set(out)


def test_a_one_token_answer_tells_no_decode_speed(capsys):
    """One token comes from the prefill: no decode step ran, so there is no decode speed (it read 0.0)."""
    argv = ["--model", "random:test", "--prompt", "hi", "--max-new-tokens", "1"]
    out = run_json(capsys, [*argv, "--json"])
    assert out["generated_tokens"] == 1 and out["decode_tokens_per_s"] is None
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "1 generated" in err and "tokens/s" not in err


def test_forced_plain_moe_dispatch_gives_the_same_answer(capsys):
    case = load_case("mla_noaux", "one_photo")
    greedy = case["arrays"]["greedy"].tolist()
    argv = ["--model", str(ckpt_dir("mla_noaux")), "--dtype", "float32", "--json", "--max-new-tokens", str(len(greedy)),
            "--prompt", case["conversation"][0]["content"], "--moe", "dense"]
    for path in case["image_paths"]:
        argv += ["--image", str(path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["token_ids"] == greedy
    # stderr is no terminal here: the load reports its speed in a line, and draws no bar
    assert re.search(r"^model ready in [\d.]+ s \([\d.]+ [MG]B of weights, [\d.]+ [MG]B/s\)$", err, re.M) and "\r" not in err


def test_progress_bar_draws_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    outputs = {"terminal": Terminal(), "pipe": io.StringIO(), "disabled": Terminal()}
    for name, file in outputs.items():
        with load.progress_bar(enabled=name != "disabled", file=file) as bar:
            for done in (0, 10**9 // 2, 10**9):
                bar(done, 10**9)
            drawn = file.getvalue()
            assert drawn.endswith("\n") or not drawn  # the bar's line ends once all bytes are in
    assert "weights: 100%" in outputs["terminal"].getvalue() and "1.00G/1.00G" in outputs["terminal"].getvalue()
    assert outputs["pipe"].getvalue() == outputs["disabled"].getvalue() == ""


def _cli(*args, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "generate", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, input=stdin, timeout=300)


def test_random_test_model_runs_offline_and_streams():
    r = _cli("--model", "random:test", "--image", str(FIXTURES / "images" / "noise_tiny.png"),
             "--prompt", "What is in the picture?", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert "prompt tokens" in r.stderr and "Traceback" not in r.stderr
    assert "cached in" not in r.stderr  # the suite turns the cache off (conftest)


def test_compile_cache_keeps_programs_between_runs(tmp_path, monkeypatch):
    """--compile-cache DIR: the first run writes its compiled programs there, the second (a fresh
    process) loads them back, traces and compiles nothing, and answers the same."""
    cache = tmp_path / "xla"
    args = ("--model", "random:test", "--image", str(FIXTURES / "images" / "noise_tiny.png"), "--prompt",
            "What is in the picture?", "--max-new-tokens", "4", "--json", "--compile-cache", str(cache))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    first = _cli(*args)
    written = sorted(p.name for p in (cache / "executables").rglob("*.bin"))
    # Without the executables the next run compiles again, and what it keeps loads.
    shutil.rmtree(cache / "executables")
    assert _cli(*args).returncode == 0
    second = _cli(*args)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert f"cached in {cache}" in first.stderr
    assert len(written) >= 3  # at least embedding, prefill and decode
    first, second = json.loads(first.stdout), json.loads(second.stdout)
    assert second["token_ids"] == first["token_ids"]
    assert first["programs_compiled"] >= 5 and first["programs_loaded"] == 0 and first["compile_s"] > 0
    assert second["programs_loaded"] == first["programs_compiled"] and second["programs_compiled"] == 0
    assert second["compile_s"] == 0  # no tracing, lowering or compiling at all


@pytest.mark.parametrize(
    "args,code,line",
    [
        (["--max-new-tokens", "0", "--prompt", "hi"], 2,
         "python -m generate: error: argument --max-new-tokens: must be at least 1 (got 0)"),
        (["--temperature", "-1", "--prompt", "hi"], 1, "error: --temperature must be finite and >= 0 (got -1.0)."),
        (["--top-p", "1.5", "--prompt", "hi"], 1, "error: --top-p must be in (0, 1] (got 1.5)."),
        (["--dtype", "float8", "--prompt", "hi"], 2,
         "python -m generate: error: argument --dtype: invalid choice: 'float8' (choose from 'bfloat16', 'float32')"),
        (["--moe", "fastest", "--prompt", "hi"], 2, "python -m generate: error: argument --moe: invalid choice: "
         "'fastest' (choose from 'auto', 'dense', 'gather', 'grouped', 'ragged', 'blocked')"),
        (["--prompt", "<image> and <image>", "--image", str(FIXTURES / "images" / "noise_tiny.png")], 1,
         "error: the prompt has 2 <image> placeholder(s) but 1 image(s) were given; use one placeholder per image, "
         "or none to put the images first."),
        (["--prompt", "hi", "--image", "/no/such/image.png"], 1,
         "error: image file /no/such/image.png does not exist; check the path."),
        (["--model", "/no/such/folder", "--prompt", "hi"], 1,
         "error: /no/such/folder does not exist; pass a DeepSeek-VL2 checkpoint folder, a hub id or random:SIZE."),
        (["--prompt", "bad \udcff byte"], 1,  # (a byte that is not UTF-8, as Python keeps it from the command line)
         "error: the prompt is not UTF-8 text (it holds \\udcff, no character: a byte that is not UTF-8, or half of "
         "a surrogate pair written alone as a JSON escape); check the terminal's or the file's encoding."),
        (["--prompt", "hi", "--system", "half \ud800 a pair"], 1,  # (as a JSON escape in an --input line can write it)
         "error: --system is not UTF-8 text (it holds \\ud800, no character: a byte that is not UTF-8, or half of "
         "a surrogate pair written alone as a JSON escape); check the terminal's or the file's encoding."),
    ],
)
def test_bad_arguments_fail_with_one_line(capsys, args, code, line):
    """Our refusals are one `error:` line, exit status 1 (after the loader's progress lines, for a model);
    argparse's are one usage line, then its one error line, exit status 2."""
    try:
        status = main(["--model", "random:test", *args])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err.splitlines()
    assert status == code and err[-1] == line
    assert sum("error:" in e for e in err) == 1 and "Traceback" not in "\n".join(err)
    if code == 2:
        assert err[0] == "usage: python -m generate [options]  (python -m generate --help lists them)" and len(err) == 2
    elif "--model" not in args:
        assert len(err) == 1


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`python -m generate ... | head -c 5`: once stdout's reader has gone, the command ends with 141 (as a
    shell reports SIGPIPE) and no error line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "generate", "--model", "random:test", "--prompt", "hi",
                             "--max-new-tokens", "64", "--compile-cache", ""], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "error" not in err and "Traceback" not in err


def test_sigterm_ends_the_command_as_ctrl_c_does():
    """SIGTERM once the model is ready: "interrupted", exit status 130, no stack dump."""
    code, seen, rest = sigterm_when(["-m", "generate", "--model", "random:test", "--prompt", "hi",
                                     "--max-new-tokens", "100000", "--compile-cache", ""], ready="model ready")
    assert code == 130, seen + rest
    assert rest.strip().splitlines()[-1] == "interrupted" and "SIGTERM" not in rest, rest


@pytest.mark.parametrize("sig, after_s", [("SIGINT", 0.3), ("SIGINT", 0.8), ("SIGINT", 1.5), ("SIGTERM", 0.8)])
def test_ctrl_c_at_any_moment_of_the_start_ends_the_command_quietly(sig, after_s):
    """Ctrl-C (or SIGTERM) while the arguments are read, JAX is imported (held to the import's end: raised
    inside jaxlib's initialisation it crashed the interpreter now and then) or the model loads:
    "interrupted", exit status 130, nothing else on stderr, and no answer."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "generate", "--model", "random:test", "--prompt", "hi",
                             "--max-new-tokens", "100000", "--compile-cache", ""], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)
    time.sleep(after_s)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and not out.strip(), err
    lines = err.strip().splitlines()
    assert lines[-1] == "interrupted" and not [line for line in lines if line.startswith(("Traceback", "Exception"))]


def test_chat_keeps_history_and_survives_bad_utf8():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    stdin = b"Hello there.\n\xff\xfe bad line\nAnd again?\n"
    r = subprocess.run([sys.executable, "-m", "generate", "--model", "random:test", "--chat", "--json",
                        "--max-new-tokens", "4"], capture_output=True, env=env, cwd=ROOT, input=stdin, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    answers = [json.loads(line) for line in r.stdout.decode().splitlines() if line.startswith("{")]
    assert len(answers) == 2
    assert answers[1]["prompt_tokens"] > answers[0]["prompt_tokens"] + 4  # the first exchange is in the history
    assert answers[0]["load_s"] > 0 and "load_s" not in answers[1]  # the load counts once, with the first answer
    assert b"not valid UTF-8" in r.stderr and b"Traceback" not in r.stderr


@pytest.mark.parametrize("mesh,words", [("expert=3", "needs 3 devices"), ("experts=2", "bad mesh spec")])
def test_impossible_mesh_fails_with_one_line(capsys, mesh, words):
    assert main(["--model", str(ckpt_dir("mha")), "--dtype", "float32", "--prompt", "hi", "--mesh", mesh]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("error:") == 1
    if words == "bad mesh spec":  # refused before anything loads
        assert "loading" not in err


def test_unknown_random_size_is_refused_before_it_is_announced(capsys):
    assert main(["--model", "random:tset", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "error: unknown random model size 'tset'" in err and "initialising" not in err


def test_unusable_compile_cache_is_one_note_not_a_failure(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = _cli("--model", "random:test", "--prompt", "hi", "--max-new-tokens", "2", "--compile-cache", str(blocker / "xla"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("not cached") == 1 and "Warning" not in r.stderr


def test_a_file_named_as_the_compile_cache_is_called_a_file(tmp_path, monkeypatch):
    from vl2_jax.executables import use_compile_cache

    file = tmp_path / "README.md"
    file.write_text("")
    lines = []
    assert use_compile_cache(str(file), lines.append) == ""
    assert lines == [f"compiled programs not cached: cannot use {file} (a file, not a folder); see --compile-cache"]
    monkeypatch.setenv("VL2_JAX_COMPILE_CACHE", str(file))  # (the default it came from is named)
    assert use_compile_cache(str(file), lines.append) == ""
    assert lines[-1].endswith("(a file, not a folder); it comes from $VL2_JAX_COMPILE_CACHE; see --compile-cache")


def test_chat_says_when_the_history_fills_the_slot_and_starts_anew_on_request():
    """Once the conversation so far no longer fits a slot, a turn's error says so (not "shorten the
    prompt") and points at /new, which forgets the turns: the next one is answered as a first turn. A
    message too long even alone gets the prompt's own error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    stdin = ("Hello there, tell me everything.\nAnd again, more please.\nAnd more.\n/new\nHello there, tell me "
             "everything.\n" + "word " * 200 + "\n")  # (last: a message too long even alone)
    r = subprocess.run([sys.executable, "-m", "generate", "--model", "random:test", "--chat", "--json",
                        "--max-new-tokens", "40", "--max-seq-len", "128", "--compile-cache", ""],
                       capture_output=True, text=True, env=env, cwd=ROOT, input=stdin, timeout=300)
    assert r.returncode == 0, r.stderr
    answers = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(answers) == 3 and len(errors) == 2, r.stderr
    assert errors[0].startswith("error: the conversation so far and this message come to ") and "/new" in errors[0]
    assert "shorten the prompt" in errors[1] and "/new" not in errors[1]
    assert "--max-seq-len" in errors[0] and "a new conversation" in r.stderr
    assert answers[2]["prompt_tokens"] == answers[0]["prompt_tokens"]  # after /new: a first turn again
    assert answers[2]["token_ids"] == answers[0]["token_ids"]


def test_chat_survives_bad_turns_and_attaches_images():
    """--prompt is the first turn; a turn with <image> but no image and an image that cannot be opened
    each print one error line and leave the history as it was; /image PATH attaches to the next turn; an
    unknown command is an error, not a message, and // sends a message that begins with /."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    image = FIXTURES / "images" / "noise_tiny.png"
    stdin = (f"<image> What is this?\n/image /no/such/image.png\nSecond.\n/image {image}\nWhat is in it?\nAnd?\n"
             f"/imagefoo x\n/new please\n//etc\n/image {image}\n")  # the last one goes with no message
    r = subprocess.run([sys.executable, "-m", "generate", "--model", "random:test", "--chat", "--json",
                        "--max-new-tokens", "2", "--prompt", "First."], capture_output=True, text=True, env=env,
                       cwd=ROOT, input=stdin, timeout=300)
    assert r.returncode == 0, r.stderr
    answers = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == 5  # First., Second., What is in it?, And?, /etc
    tokens = [a["prompt_tokens"] for a in answers]
    assert tokens[0] < tokens[1] < tokens[2] < tokens[3]  # each turn's history holds the turns before
    assert tokens[2] - tokens[1] > tokens[3] - tokens[2] + 10  # the image's tokens are in turn 3
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 4 and "placeholder" in errors[0] and "/no/such/image.png" in errors[1]
    assert errors[2].startswith("error: unknown command /imagefoo: the commands are /image PATH and /new")
    assert errors[3] == "error: /new takes nothing after it; type /new alone to start a new conversation."
    assert answers[4]["prompt_tokens"] - answers[3]["prompt_tokens"] > 2  # (/etc went to the model)
    assert "Traceback" not in r.stderr
    assert not any(line.startswith("> ") for line in r.stderr.splitlines())  # no prompt marker on piped stdin
    assert r.stderr.splitlines()[-1] == "1 attached image was not sent: the session ended before a message to go with it"


def test_chat_on_a_terminal_shows_a_marker_and_reads_through_input(monkeypatch, capsys):
    from vl2_jax import cli

    typed = iter(["hello ", "/image x.png"])

    def fake_input(prompt=""):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", fake_input)
    assert list(cli.chat_lines("first", print)) == ["first", "hello", "/image x.png"]
    assert capsys.readouterr().err.count("> ") == 3  # one marker per turn read, the last one met EOF


@pytest.mark.parametrize("target,words", [
    ("missing/out.png", "does not exist"),
    ("out.xyz", "cannot write"),
    ("input.png", "is an input image"),
    ("link.png", "is an input image"),
])
def test_draw_boxes_target_is_checked_before_the_model_loads(tmp_path, monkeypatch, capsys, target, words):
    from vl2_jax import load

    image = tmp_path / "input.png"
    image.write_bytes((FIXTURES / "images" / "noise_tiny.png").read_bytes())
    (tmp_path / "link.png").symlink_to(image)
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.chdir(tmp_path)
    assert main(["--model", "random:test", "--image", str(image), "--prompt", "hi", "--draw-boxes", target]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0] and "--draw-boxes" in err[0]
    assert image.read_bytes() == (FIXTURES / "images" / "noise_tiny.png").read_bytes()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_draw_boxes_into_an_unwritable_folder_fails_before_loading(tmp_path, monkeypatch, capsys):
    from vl2_jax import load

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["--model", "random:test", "--image", str(FIXTURES / "images" / "noise_tiny.png"), "--prompt", "hi",
                 "--draw-boxes", str(locked / "out.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0]


def test_image_as_a_data_url_answers_as_the_file(capsys):
    """--image takes data: URLs (and http(s) URLs, raw base64) through vl2_jax.images; the same image as a
    file and as a data URL gives the same answer."""
    import base64

    path = FIXTURES / "images" / "noise_tiny.png"
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    base = ["--model", "random:test", "--prompt", "What is in the picture?", "--max-new-tokens", "3", "--json"]
    timings = ("load_s", "compile_s", "ttft_s", "decode_tokens_per_s")
    answer = lambda image: {k: v for k, v in run_json(capsys, [*base, "--image", image]).items() if k not in timings}
    assert answer(url) == answer(str(path))


@pytest.mark.parametrize("image,words", [
    ("data:image/png;base64,iVBORw0K!!!", "not valid base64"),
    ("gopher://example.com/cat.png", "scheme 'gopher'"),
])
def test_bad_image_reference_fails_before_loading(monkeypatch, capsys, image, words):
    from vl2_jax import load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["--model", "random:test", "--image", image, "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0] and image in err[0]


def test_draw_boxes_check_skips_urls(tmp_path):
    from vl2_jax.cli import check_draw_boxes

    check_draw_boxes(str(tmp_path / "out.png"), ["data:image/png;base64,AAAA", "https://example.com/out.png"])


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_the_package_version(capsys, monkeypatch):
    import importlib.metadata

    version = _pyproject()["project"]["version"]
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"python -m generate {version}"

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)  # a plain checkout: read pyproject.toml
    from vl2_jax.errors import package_version

    assert package_version() == version


def test_every_entry_point_helps_with_defaults_an_example_and_its_version(capsys):
    """--help of generate, convert, serve, bench, loadtest and finetune: each option's default in its text, examples
    after the options (each one parses), and --version."""
    import argparse

    import convert.__main__
    import generate.__main__
    from vl2_jax import bench, finetune, loadtest, serve

    version = _pyproject()["project"]["version"]
    parsers = {"generate": generate.__main__._parser, "convert": convert.__main__._parser, "vl2_jax.serve": serve.parser,
               "vl2_jax.bench": bench.parser, "vl2_jax.loadtest": loadtest.parser, "vl2_jax.finetune": finetune.parser}
    for module, make in parsers.items():
        p = make()
        text = p.format_help()
        examples = text.split("\nexamples:\n")[1].splitlines()
        assert examples and all(line.startswith(f"  python -m {module} ") for line in examples), module
        for line in examples:
            p.parse_args(shlex.split(line.split("#")[0])[3:])
        formatter = p._get_formatter()
        for action in p._actions:
            shown = action.default not in (None, False, [], argparse.SUPPRESS)
            if action.option_strings and shown:
                assert "default" in formatter._get_help_string(action), f"{module} {action.option_strings[0]}"
        with pytest.raises(SystemExit) as exit_:
            p.parse_args(["--version"])
        assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"python -m {module} {version}"
    assert "the answer's length limit (default: 512)" in " ".join(parsers["generate"]().format_help().split())


def test_system_prompt_comes_first(capsys):
    base = ["--model", "random:test", "--prompt", "hi", "--max-new-tokens", "1", "--json"]
    plain = run_json(capsys, base)
    system = run_json(capsys, [*base, "--system", "You answer in one short sentence."])
    assert system["prompt_tokens"] > plain["prompt_tokens"] + 4
    assert main([*base, "--system", "<image> first"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--system" in err[0]


def test_console_scripts_point_at_the_mains(capsys):
    """pyproject.toml declares vl2-generate, vl2-convert, vl2-serve and vl2-finetune; each resolves to its
    command's `exit_with_main`, which leaves with `main`'s exit status as `python -m` does. An installed
    checkout lists them too."""
    import importlib.metadata

    import convert.__main__
    import generate.__main__
    import vl2_jax.finetune
    import vl2_jax.serve

    scripts = _pyproject()["project"]["scripts"]
    assert scripts == {"vl2-generate": "generate.__main__:exit_with_main", "vl2-convert": "convert.__main__:exit_with_main",
                       "vl2-serve": "vl2_jax.serve:exit_with_main", "vl2-finetune": "vl2_jax.finetune:exit_with_main"}
    mains = {"vl2-generate": generate.__main__.exit_with_main, "vl2-convert": convert.__main__.exit_with_main,
             "vl2-serve": vl2_jax.serve.exit_with_main, "vl2-finetune": vl2_jax.finetune.exit_with_main}
    for name, value in scripts.items():
        point = importlib.metadata.EntryPoint(name=name, value=value, group="console_scripts")
        assert point.load() is mains[name]
    installed = {p.name: p.value for p in importlib.metadata.entry_points(group="console_scripts")
                 if p.name in scripts}
    assert all(installed[n] == scripts[n] for n in installed)  # this checkout installed: they are there
    assert generate.__main__.main(["--model", "/no/such/folder", "--prompt", "hi"]) == 1
    assert convert.__main__.main(["/no/such/folder", "/tmp/never-written"]) == 1


def test_input_file_answers_each_line_in_order_with_its_own_settings(tmp_path, capsys):
    """--input: the fixture prompts, each with its own max_new_tokens, two slots; bad lines get an error
    record in their place and the others go on (exit status 1 says some failed)."""
    variant = "mla"
    cases = [load_case(variant, name) for name in SINGLE_TURN]
    lines = []
    for i, case in enumerate(cases):
        greedy = case["arrays"]["greedy"].tolist()
        lines.append(json.dumps({"id": f"r{i}", "prompt": case["conversation"][0]["content"],
                                 "images": [str(p) for p in case["image_paths"]], "max_new_tokens": len(greedy) - i}))
    lines[2:2] = ["{not json", "", json.dumps({"prompt": "hi", "colour": "red"}),
                  json.dumps({"prompt": "<image> hi", "images": [str(tmp_path / "missing.png")]}),
                  json.dumps({"id": "d", "images": []})]
    lines += [json.dumps({"prompt": "hi", "stop": [1, 2]}), json.dumps({"prompt": "hi", "temperature": "hot"}),
              json.dumps({"prompt": "hi", "system": 5}), json.dumps({"prompt": "hi", "system": " "}),
              json.dumps({"id": "n", "prompt": "hi", "system": None, "stop": None, "temperature": None,
                          "max_new_tokens": 1})]  # (null: the flags' defaults)
    src, dst = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    # a byte-order mark (as Windows editors write) is no text; a line that is not UTF-8 is refused alone
    src.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b'\n{"prompt": "\xff"}\n')
    argv = ["--model", str(ckpt_dir(variant)), "--dtype", "float32", "--input", str(src), "--output", str(dst),
            "--max-batch", "2"]
    assert main(argv) == 1
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, *range(5, 17)]  # the blank line 4 is skipped
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {3, 5, 6, 7, 11, 12, 13, 14, 16}
    assert "not JSON" in errors[3] and "colour" in errors[5] and "missing.png" in errors[6] and "prompt" in errors[7]
    assert "stop must be a string or a list of strings" in errors[11] and "temperature must be a number" in errors[12]
    assert "system must be a string (got 5)" in errors[13] and "system needs some text" in errors[14]
    assert "not UTF-8" in errors[16]
    assert next(r for r in records if r["line"] == 15)["generated_tokens"] == 1
    assert next(r["id"] for r in records if r["line"] == 7) == "d"  # a refused line keeps its id
    answers = [r for r in records if "error" not in r]
    for i, (record, case) in enumerate(zip(answers, cases)):
        want = case["arrays"]["greedy"].tolist()[: len(case["arrays"]["greedy"]) - i]
        assert record["id"] == f"r{i}" and record["token_ids"] == want and record["finish_reason"] == "length"
    assert "answered 6 of 15" in capsys.readouterr().err
    assert main(["--model", "random:test", "--input", str(src), "--prompt", "x"]) == 1
    assert "--input takes" in capsys.readouterr().err
    unwritable = [("/proc/vl2-answers.jsonl", "cannot write --output /proc/vl2-answers.jsonl: /proc does not allow "
                   "creating files in it")] if os.path.isdir("/proc") else []
    os.link(src, tmp_path / "hard.jsonl")  # the same file under another name
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "missing" / "o.jsonl")
    for output, words in ((src, "is the --input file"), (tmp_path / "hard.jsonl", "is the --input file"),
                          (tmp_path / "missing" / "o.jsonl", "folder does not exist"),
                          (tmp_path / "dangling.jsonl", "whose folder does not exist"),
                          (tmp_path, "is a folder; name the file"), *unwritable):
        assert main(["--model", "random:test", "--input", str(src), "--output", str(output)]) == 1
        assert words in capsys.readouterr().err
    assert src.read_bytes().startswith(b"\xef\xbb\xbf")  # (untouched)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert main(["--model", "random:test", "--input", str(tmp_path / "empty.jsonl")]) == 0
    assert capsys.readouterr().err.strip().endswith("holds no requests; nothing to answer")
