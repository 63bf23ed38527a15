"""`python -m generate`: fixture greedy parity through the command line, offline random models, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from generate.__main__ import main
from tests.conftest import FIXTURES, VARIANTS, ckpt_dir, load_case

ROOT = Path(__file__).resolve().parents[1]
SINGLE_TURN = ("text_only", "one_photo", "one_wide", "two_images", "three_images_no_crop")


def run_json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", SINGLE_TURN)
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


def test_forced_plain_moe_dispatch_gives_the_same_answer(capsys):
    case = load_case("mla_noaux", "one_photo")
    greedy = case["arrays"]["greedy"].tolist()
    argv = ["--model", str(ckpt_dir("mla_noaux")), "--dtype", "float32", "--json", "--max-new-tokens", str(len(greedy)),
            "--prompt", case["conversation"][0]["content"], "--moe", "dense"]
    for path in case["image_paths"]:
        argv += ["--image", str(path)]
    assert run_json(capsys, argv)["token_ids"] == greedy


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
    """--compile-cache DIR: the first run writes its compiled programs there, the second reads them back
    and answers the same. (Every compile is cached here: CPU compiles of the test model are too quick
    for JAX's default one-second threshold.)"""
    cache = tmp_path / "xla"
    args = ("--model", "random:test", "--image", str(FIXTURES / "images" / "noise_tiny.png"), "--prompt",
            "What is in the picture?", "--max-new-tokens", "4", "--json", "--compile-cache", str(cache))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    first = _cli(*args)
    written = sorted(p.name for p in cache.iterdir())
    second = _cli(*args)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert f"cached in {cache}" in first.stderr
    assert len(written) >= 3  # at least embedding, prefill and decode
    assert json.loads(second.stdout)["token_ids"] == json.loads(first.stdout)["token_ids"]


@pytest.mark.parametrize(
    "args,words",
    [
        (["--max-new-tokens", "0", "--prompt", "hi"], "--max-new-tokens"),
        (["--temperature", "-1", "--prompt", "hi"], "temperature"),
        (["--top-p", "1.5", "--prompt", "hi"], "top-p"),
        (["--dtype", "float8", "--prompt", "hi"], "--dtype"),
        (["--moe", "fastest", "--prompt", "hi"], "--moe"),
        (["--prompt", "<image> and <image>", "--image", str(FIXTURES / "images" / "noise_tiny.png")], "placeholder"),
        (["--prompt", "hi", "--image", "/no/such/image.png"], "image"),
    ],
)
def test_bad_arguments_fail_with_one_line(args, words):
    r = _cli("--model", "random:test", *args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and words in r.stderr


def test_missing_model_folder():
    r = _cli("--model", "/no/such/folder", "--prompt", "hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "/no/such/folder" in r.stderr


def test_chat_keeps_history_and_survives_bad_utf8():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    stdin = b"Hello there.\n\xff\xfe bad line\nAnd again?\n"
    r = subprocess.run([sys.executable, "-m", "generate", "--model", "random:test", "--chat", "--json",
                        "--max-new-tokens", "4"], capture_output=True, env=env, cwd=ROOT, input=stdin, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    answers = [json.loads(line) for line in r.stdout.decode().splitlines() if line.startswith("{")]
    assert len(answers) == 2
    assert answers[1]["prompt_tokens"] > answers[0]["prompt_tokens"] + 4  # the first exchange is in the history
    assert b"not valid UTF-8" in r.stderr and b"Traceback" not in r.stderr


@pytest.mark.parametrize("mesh,words", [("expert=3", "needs 3 devices"), ("experts=2", "bad mesh spec")])
def test_impossible_mesh_fails_with_one_line(capsys, mesh, words):
    assert main(["--model", str(ckpt_dir("mha")), "--dtype", "float32", "--prompt", "hi", "--mesh", mesh]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("error:") == 1


def test_unusable_compile_cache_is_one_note_not_a_failure(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = _cli("--model", "random:test", "--prompt", "hi", "--max-new-tokens", "2", "--compile-cache", str(blocker / "xla"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("not cached") == 1 and "Warning" not in r.stderr
