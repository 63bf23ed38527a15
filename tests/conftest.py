"""Shared test helpers: where the parity fixtures live and how to read one case.

The fixtures (what the official PyTorch DeepSeek-VL2 code computes) sit outside the repository, in
``../shared/fixtures`` relative to the repository root; see the README there.
"""

from __future__ import annotations

import os

# Eight simulated CPU devices for the sharding tests; set before anything imports jax. Unsharded code
# keeps running on the first device.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The CLI's persistent compilation cache is a process-wide JAX setting: off for in-process CLI tests
# (tests/test_cli.py turns it on in a subprocess of its own).
os.environ["VL2_JAX_COMPILE_CACHE"] = ""

import functools  # noqa: E402
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"

@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop JAX's compiled programs: the whole suite in one process otherwise
    keeps thousands of CPU executables alive, and XLA's CPU compiler then crashed (a segfault while
    compiling, ~695 tests in, on the 2-core CI machine)."""
    yield
    import jax

    jax.clear_caches()

VARIANTS = ("mha", "mla", "mla_noaux")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports free on `host` now (all held open together while the system picks them)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def ckpt_dir(variant: str) -> Path:
    """Checkpoint folder of a variant (config, weights, tokenizer, processor config)."""
    return FIXTURES / variant / "ckpt"


@functools.cache
def load_variant(variant: str):
    """(cases.json as a dict keyed by case name, cases.npz as a mapping 'NAME/KEY' -> array)."""
    cases = json.loads((FIXTURES / variant / "cases.json").read_text(encoding="utf-8"))
    with np.load(FIXTURES / variant / "cases.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    return cases, arrays


def case_names(variant: str = VARIANTS[0]):
    """Names of the cases of a variant, in file order."""
    return list(load_variant(variant)[0])


def all_cases():
    """Every (variant, case name) pair, for pytest.mark.parametrize."""
    return [(v, name) for v in VARIANTS for name in case_names(v)]


def load_case(variant: str, name: str) -> dict:
    """One case: its cases.json entry plus 'arrays' ({KEY: array}, batch size 1) and 'image_paths'."""
    cases, arrays = load_variant(variant)
    case = dict(cases[name])
    prefix = name + "/"
    case["arrays"] = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    case["image_paths"] = [FIXTURES / "images" / f for f in case["images"]]
    return case


def open_images(case: dict):
    """The case's images as the reference's callers give them: PIL.Image.open(path).convert('RGB')."""
    images = []
    for path in case["image_paths"]:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images


def sigterm_when(args: list[str], ready: str, signals: tuple[str, ...] = ("SIGTERM",)) -> tuple[int, str, str]:
    """`python ARGS` on the CPU from the repository root, sent SIGTERM (or `signals`, half a second
    apart) once a stderr line starts with `ready` -> (exit status, stderr up to that line, stderr after
    it); killed if it outlives 60 s."""
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=root)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(ready):
                break
        for n, name in enumerate(signals):
            time.sleep(0.5 if n else 0)
            proc.send_signal(getattr(signal, name))
        rest = proc.stderr.read()
        return proc.wait(60), "".join(seen), rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
