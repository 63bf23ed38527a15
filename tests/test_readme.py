"""The README's command lines: every `python -m` example runs (offline, in this process) or, where it
needs a GPU, a server, several devices or the network, its arguments parse as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import convert.__main__
import generate.__main__
from tests.conftest import FIXTURES, ckpt_dir
from vl2_jax import bench, finetune, loadtest, serve

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {"generate": generate.__main__._parser, "convert": convert.__main__._parser,
           "vl2_jax.serve": serve.parser, "vl2_jax.bench": bench.parser, "vl2_jax.loadtest": loadtest.parser,
           "vl2_jax.finetune": finetune.parser}
MAINS = {"generate": generate.__main__.main, "convert": convert.__main__.main}
NOT_OURS = {"pytest", "sglang_router.launch_router"}  # the test command itself; SGLang's router (test_router.py)


def readme_commands() -> list[list[str]]:
    """The argv after `python -m` of each command in the README's bash blocks (continued lines joined,
    comments and what follows `&&` before it dropped), in the README's order."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip().rstrip("&").strip()
            if "python -m " not in line:
                continue
            commands.append(shlex.split(line[line.index("python -m ") + len("python -m "):]))
    return commands


def test_the_readme_has_the_examples_this_file_expects():
    modules = [argv[0] for argv in readme_commands()]
    assert {"generate", "convert", "vl2_jax.serve", "vl2_jax.loadtest"} <= set(modules)
    assert set(modules) <= set(PARSERS) | NOT_OURS, "a README command of a module this test does not know"


def test_every_readme_command_runs_or_parses(tmp_path, capsys):
    """Hub ids become `random:test`, the README's photo names fixture images, its output folders and
    files land in tmp_path, answers are cut to 4 tokens. Commands that need a GPU, several devices, a
    running server or tiny's 16 GB (serve, loadtest, --mesh, random:tiny, those ending in `...`) are
    parsed by their own parser, which exits on any flag it does not take."""
    cat = str(ROOT / "tests" / "data" / "cat.png")
    names = {"deepseek-ai/deepseek-vl2-tiny": "random:test", "photo.jpg": cat, "a.jpg": cat,
             "b.jpg": str(FIXTURES / "images" / "noise_wide.png"), "deepseek-vl2-small/": str(ckpt_dir("mla")),
             "vl2-small-orbax/": str(tmp_path / "orbax"), "vl2-base-orbax/": str(tmp_path / "orbax"),
             "boxes.png": str(tmp_path / "boxes.png"),
             # the fine-tuning example's output: its training runs in tests/test_finetune.py
             "demo/tuned": str(ckpt_dir("mha")), "demo/red.png": cat}
    ran = []
    for module, *args in readme_commands():
        if module in NOT_OURS:
            continue
        args = [names.get(a, a) for a in args]
        if module in MAINS and not {"...", "--mesh", "random:tiny"} & set(args):
            if module == "generate":
                if "--model" not in args:
                    args = ["--model", "random:test", *args]
                if "--max-new-tokens" in args:
                    i = args.index("--max-new-tokens") + 1
                    args[i] = str(min(int(args[i]), 4))
                else:
                    args += ["--max-new-tokens", "4"]
            assert MAINS[module](args) == 0, f"python -m {module} {shlex.join(args)}: {capsys.readouterr().err}"
            ran.append(module)
        else:
            PARSERS[module]().parse_args([a for a in args if a != "..."])
    capsys.readouterr()
    assert (tmp_path / "boxes.png").exists() and (tmp_path / "orbax").is_dir()
    assert ran.count("generate") >= 3 and "convert" in ran


def test_inline_commands_parse():
    """Commands quoted in the README's text (`python -m vl2_jax.bench --model random:tiny ...`) take
    the flags they show; synopses with [optional] parts and bare module names are not commands."""
    text = (ROOT / "README.md").read_text()
    inline = [shlex.split(c) for c in re.findall(r"`python -m ([^`\[]+? [^`\[]+)`", text)]
    assert any(argv[0] == "vl2_jax.bench" for argv in inline)
    for module, *args in inline:
        if module not in NOT_OURS:
            PARSERS[module]().parse_args(args)
