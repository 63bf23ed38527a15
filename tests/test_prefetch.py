"""Reading a checkpoint's files ahead of the loader (vl2_jax.prefetch) and the model specs it resolves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ckpt_dir

from vl2_jax import prefetch, specs

ROOT = Path(__file__).resolve().parents[1]


def test_weight_files_are_the_weights_only(tmp_path):
    hf = ckpt_dir("mha")
    assert prefetch.weight_files(hf) == [hf / "model.safetensors"]
    converted = tmp_path / "converted"
    (converted / "params" / "embed" / "d").mkdir(parents=True)
    (converted / "params" / "embed" / "d" / "abc").write_bytes(b"x" * 10)
    (converted / "params" / "embed" / "manifest.ocdbt").write_bytes(b"m")
    (converted / "model.safetensors").write_bytes(b"a leftover the converted loader does not read")
    (converted / "config.json").write_text("{}")
    assert prefetch.weight_files(converted) == [converted / "params/embed/d/abc", converted / "params/embed/manifest.ocdbt"]


def test_reads_every_byte_once_and_is_forgotten_when_done(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "PIECE", 1000)
    (tmp_path / "a.safetensors").write_bytes(os.urandom(4500))
    (tmp_path / "b.safetensors").write_bytes(os.urandom(10))
    (tmp_path / "notes.txt").write_bytes(os.urandom(99))  # not a weight file
    reading = prefetch.start(tmp_path, threads=3, memory=1 << 30)
    assert reading.wait(30) == reading.total == 4510
    assert reading.finished is not None and tmp_path.resolve() not in prefetch._READINGS
    again = prefetch.start(tmp_path, threads=1, memory=1 << 30)  # a finished reading is not returned again
    assert again is not reading
    again.stop()


def test_a_running_reading_is_shared(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "PIECE", 4096)
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(1 << 30)  # sparse: 262144 pieces, read long after the second start
    reading = prefetch.start(tmp_path, threads=1, memory=1 << 40)
    try:
        assert prefetch.start(str(tmp_path), memory=1 << 40) is reading  # the same folder: the same reading
    finally:
        reading.stop()
    assert reading.wait(30) < reading.total


def test_a_folder_it_cannot_read_reads_nothing_and_raises_nothing(tmp_path):
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "gone")  # a broken link
    assert prefetch.start(tmp_path, memory=1 << 30) is None
    assert prefetch.start("bad\0name") is None


def test_stop_ends_the_reading_early(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "PIECE", 4096)
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(256 << 20)  # sparse: 65536 pieces, more than the thread reads before it is stopped
    reading = prefetch.start(tmp_path, threads=1, memory=1 << 40)
    reading.stop()
    assert reading.wait(30) < reading.total
    assert reading.finished is not None


def test_nothing_is_read_where_it_would_not_fit_or_there_is_nothing(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    assert prefetch.start(tmp_path, memory=1999) is None  # more than half the memory
    monkeypatch.setattr(prefetch, "available_memory", lambda: None)
    assert prefetch.start(tmp_path) is None  # memory unknown
    assert prefetch.start("random:test") is None
    assert prefetch.start(tmp_path / "missing") is None
    (tmp_path / "no-weights").mkdir()
    assert prefetch.start(tmp_path / "no-weights", memory=1 << 30) is None
    monkeypatch.setenv("VL2_JAX_CACHE", str(tmp_path / "cache"))
    assert prefetch.start("deepseek-ai/deepseek-vl2-tiny") is None  # a hub id not converted yet
    converted = specs.hub_folder("deepseek-ai/deepseek-vl2-tiny")
    assert converted == tmp_path / "cache" / "deepseek-ai--deepseek-vl2-tiny"
    (converted / "params").mkdir(parents=True)
    (converted / "params" / "data").write_bytes(b"y" * 100)
    reading = prefetch.start("deepseek-ai/deepseek-vl2-tiny", memory=1 << 30)  # its converted copy
    try:
        assert reading.folder == converted.resolve()
        assert reading.wait(30) == 100
    finally:
        reading.stop()


def test_specs():
    assert specs.folder_of("random:tiny") is None
    assert specs.is_hub_id("deepseek-ai/deepseek-vl2-small")
    assert not specs.is_hub_id(str(ckpt_dir("mha")))  # on disk, whatever its name looks like
    assert not specs.is_hub_id("no-slash")
    assert specs.folder_of(str(ckpt_dir("mha"))) == ckpt_dir("mha")


def test_load_model_starts_a_reading_and_stops_it(monkeypatch):
    from vl2_jax.load import load_model

    seen = []

    def start(spec):
        reading = prefetch.Reading(Path(spec), {ckpt_dir("mha") / "model.safetensors": 100}, threads=1)
        monkeypatch.setattr(reading, "stop", lambda: seen.append("stopped"))
        seen.append(spec)
        return reading

    monkeypatch.setattr(prefetch, "start", start)
    model = load_model(str(ckpt_dir("mha")))
    assert model.params is not None
    assert seen == [str(ckpt_dir("mha")), "stopped"]


def test_the_command_starts_reading_before_jax_is_imported():
    """`python -m generate` starts reading its model's files with nothing of JAX imported (importing the
    package imports none either)."""
    code = ("import sys, vl2_jax, vl2_jax.prefetch as p, generate.__main__ as g\n"
            "def start(spec):\n"
            "    print('jax' in sys.modules, spec, flush=True); raise SystemExit(0)\n"
            "p.start = start\n"
            f"g.main(['--model', {str(ckpt_dir('mha'))!r}, '--prompt', 'hi'])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == f"False {ckpt_dir('mha')}"


@pytest.mark.parametrize("name", ["load_model", "load_pretrained", "VL2Model"])
def test_the_package_still_exports_the_loader(name):
    import vl2_jax

    assert getattr(vl2_jax, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        vl2_jax.nothing  # noqa: B018


def test_submodules_are_reachable_from_a_plain_import():
    """`import vl2_jax` then `vl2_jax.load.progress_bar()` (as the README writes it), in a fresh process
    where nothing else imported `vl2_jax.load`; importing the package alone does not import JAX."""
    code = ("import sys, vl2_jax\n"
            "print('jax' in sys.modules, callable(vl2_jax.load.progress_bar), vl2_jax.load is sys.modules['vl2_jax.load'])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.split() == ["False", "True", "True"]
