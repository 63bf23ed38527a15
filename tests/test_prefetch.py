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


def test_reads_every_byte_once_and_shares_a_running_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "PIECE", 1000)
    (tmp_path / "a.safetensors").write_bytes(os.urandom(4500))
    (tmp_path / "b.safetensors").write_bytes(os.urandom(10))
    (tmp_path / "notes.txt").write_bytes(os.urandom(99))  # not a weight file
    reading = prefetch.start(tmp_path, threads=3, memory=1 << 30)
    try:
        assert prefetch.start(str(tmp_path), memory=1 << 30) is reading  # the same folder: the same reading
        assert reading.wait(30) == reading.total == 4510
        assert reading.finished is not None
    finally:
        reading.stop()
    again = prefetch.start(tmp_path, threads=1, memory=1 << 30)  # a stopped reading is forgotten
    assert again is not reading
    again.stop()


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


def test_load_model_stops_its_reading():
    from vl2_jax.load import load_model

    model = load_model(str(ckpt_dir("mha")))
    assert model.params is not None
    assert not prefetch._READINGS  # the loader ended the reading it started


def test_the_command_starts_reading_before_jax_is_imported():
    """`python -m generate` imports nothing of JAX before its prefetch starts (nor does the package)."""
    code = ("import sys, generate.__main__, vl2_jax, vl2_jax.prefetch; "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["load_model", "load_pretrained", "VL2Model"])
def test_the_package_still_exports_the_loader(name):
    import vl2_jax

    assert getattr(vl2_jax, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        vl2_jax.nothing  # noqa: B018
