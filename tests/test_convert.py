"""`python -m convert`: Hugging Face folder -> Orbax folder, and `load_pretrained` of the result."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import VARIANTS, case_names, ckpt_dir, load_case, open_images
from safetensors.numpy import load_file, save_file

import vl2_jax
import vl2_jax.model
from convert.__main__ import main as convert_main
from vl2_jax import orbax_io
from vl2_jax.checkpoint import load_hf, param_shapes
from vl2_jax.config import PRESETS, VL2Config
from vl2_jax.errors import CheckpointError
from vl2_jax.sharding import Layout, make_mesh
from vl2_jax.testing import write_random_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")


def run_convert(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120, **kw)


@functools.cache
def converted(variant: str, root: Path) -> Path:
    dst = root / variant
    run = run_convert(ckpt_dir(variant), dst, "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    assert "dropped 13 unused tensors (vision.attn_pool.*" in run.stderr
    assert run.stdout.count("\n") == 1 and run.stdout.startswith("converted ")
    return dst


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("converted")


def copy_ckpt(variant: str, dst: Path) -> Path:
    shutil.copytree(ckpt_dir(variant), dst)
    for f in dst.iterdir():
        f.chmod(0o644)  # the fixtures are read-only
    return dst


def test_a_converted_folder_loads_by_a_path_through_dot_dot(root):
    """`../converted/mla` (as a user in a sibling folder types it) loads as the absolute path does: the
    weights' stores are opened by the resolved path (tensorstore refuses one with `..` in it)."""
    dst = converted("mla", root)
    roundabout = dst.parent / "nothing" / ".." / dst.name
    (dst.parent / "nothing").mkdir(exist_ok=True)
    a, b = vl2_jax.load_model(str(roundabout)), vl2_jax.load_model(str(dst))
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()), a.params, b.params))


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_matches_reference(variant, root):
    dst = converted(variant, root)
    assert orbax_io.is_converted(dst) and not orbax_io.is_converted(ckpt_dir(variant))
    cfg = VL2Config.from_pretrained(ckpt_dir(variant))
    want, got = load_hf(ckpt_dir(variant), cfg), orbax_io.restore(dst, cfg)[0]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)

    model = vl2_jax.load_pretrained(dst)
    # All cases in one left-padded batch: one compilation per variant keeps this test fast.
    cases = [load_case(variant, name) for name in case_names(variant)]
    batch = model.processor.batchify([model.processor(c["conversation"], open_images(c)) for c in cases])
    logits = np.asarray(model.logits(batch))
    for row, case in enumerate(cases):
        ref = case["arrays"]["logits"][0]
        err = np.abs(logits[row, -len(ref):] - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (case["prompt"], err)


def test_manifest_and_layout(root):
    dst = converted("mla", root)
    manifest = json.loads((dst / orbax_io.MANIFEST).read_text())
    groups = ["vision", "projector", "embed", "layers_0", "layers_1", "layers_2", "head"]
    assert manifest["groups"] == groups and manifest["dtype"] == "float32"
    assert sorted(p.name for p in (dst / "params").iterdir()) == sorted(groups)
    assert len(manifest["dropped"]["tensors"]) == 13
    for name in ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (ckpt_dir("mla") / name).read_bytes()
    params = orbax_io.restore(dst, VL2Config.from_pretrained(dst))[0]
    assert manifest["num_parameters"] == sum(x.size for x in jax.tree.leaves(params))


def test_restore_checks_shapes_and_casts(root):
    dst = converted("mla", root)
    cfg = VL2Config.from_pretrained(dst)
    params, saved = orbax_io.restore(dst, cfg, "bfloat16")
    assert saved == np.float32 and {x.dtype.name for x in jax.tree.leaves(params)} == {"bfloat16"}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {"params": {"language": {"embed": sharding}, "vision": sharding}}  # a leaf, a subtree
    restored = orbax_io.restore(dst, cfg, shardings=shardings)[0]["params"]
    assert restored["language"]["embed"].sharding == sharding == restored["vision"]["block_1"]["qkv_w"].sharding
    wider = dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, vocab_size=414))
    with pytest.raises(CheckpointError, match="language/embed has shape"):
        orbax_io.restore(dst, wider)


@pytest.mark.parametrize("mesh", [None, "expert=2,tensor=4"])
def test_direct_reader_equals_orbax_and_reports_bytes(root, mesh):
    """The concurrent tensorstore reader gives Orbax's own restore bit for bit, cast and in the same
    shardings (one device, and 8 fake CPU devices), and reports every byte once, in order."""
    dst = converted("mla", root)
    cfg = VL2Config.from_pretrained(dst)
    shardings = None
    if mesh is not None:
        shardings = Layout(make_mesh(mesh, cfg)).param_shardings(param_shapes(cfg, jax.numpy.bfloat16))
    calls = []
    fast, _ = orbax_io.restore(dst, cfg, "bfloat16", shardings, bytes_progress=lambda *a: calls.append(a))
    plain, _ = orbax_io.restore(dst, cfg, "bfloat16", shardings, reader="orbax")
    assert jax.tree.structure(fast) == jax.tree.structure(plain)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain), jax.tree.leaves(fast), strict=True):
        assert a.dtype == b.dtype == jax.numpy.bfloat16 and a.sharding == b.sharding, jax.tree_util.keystr(path)
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
    total = sum(x.nbytes for x in jax.tree.leaves(fast))
    done = [d for d, _ in calls]
    assert len(calls) == len(jax.tree.leaves(fast)) and {t for _, t in calls} == {total}
    assert done == sorted(done) and done[-1] == total


def test_leaves_are_written_in_chunks_and_read_back_whole(tmp_path, root, monkeypatch):
    """`convert` splits each leaf into zstd chunks of about CHUNK_BYTES; both readers put the chunks
    back together into the leaves a one-chunk conversion gives."""
    import tensorstore as ts

    monkeypatch.setattr(orbax_io, "CHUNK_BYTES", 4096)
    dst = tmp_path / "chunked"
    orbax_io.convert_checkpoint(ckpt_dir("mla"), dst, "float32")
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{(dst / 'params' / 'embed').absolute()}/",
                                          "path": "language.embed/"}}
    store = ts.open(spec, open=True, read=True).result()
    chunk = store.chunk_layout.read_chunk.shape
    assert np.prod(chunk) * 4 <= 4096 < store.size * 4, (chunk, store.shape)
    cfg = VL2Config.from_pretrained(dst)
    whole = orbax_io.restore(converted("mla", root), cfg)[0]
    for reader in ("tensorstore", "orbax"):
        got = orbax_io.restore(dst, cfg, reader=reader)[0]
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(whole), jax.tree.leaves(got), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b)), (reader, jax.tree_util.keystr(path))


def test_a_group_orbax_stored_otherwise_still_restores(tmp_path, root):
    """A group not in the OCDBT layout the direct reader knows (here: saved without OCDBT) is read by Orbax."""
    import orbax.checkpoint as ocp

    dst = tmp_path / "ckpt"
    shutil.copytree(converted("mla", root), dst)
    cfg = VL2Config.from_pretrained(dst)
    want = orbax_io.restore(dst, cfg)[0]
    group = {"params": {"language": {"layers_1": want["params"]["language"]["layers_1"]}}}
    shutil.rmtree(dst / "params" / "layers_1")
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))
    checkpointer.save((dst / "params" / "layers_1").absolute(), jax.tree.map(np.asarray, group["params"]))
    assert not (dst / "params" / "layers_1" / "manifest.ocdbt").exists()
    got = orbax_io.restore(dst, cfg)[0]
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_damaged_weights_fail_in_one_sentence(tmp_path, root):
    dst = tmp_path / "ckpt"
    shutil.copytree(converted("mla", root), dst)
    data = max((dst / "params" / "layers_1").rglob("d/*"), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"params/layers_1 failed .*the checkpoint is damaged") as error:
        orbax_io.restore(dst, VL2Config.from_pretrained(dst))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / orbax_io.MANIFEST).write_text(json.dumps({**json.loads((d / orbax_io.MANIFEST).read_text()),
                                                              "version": 1})),
     r"format version 1; .*Convert the Hugging Face checkpoint again"),
    (lambda d: shutil.rmtree(d / "params" / "layers_1"), r"lacks the parameter group params/layers_1"),
])
def test_a_conversion_that_does_not_load_says_why(tmp_path, root, capsys, damage, message):
    """An older format version or a missing group: loading it, or converting it again, says so (it was taken
    for a Hugging Face folder without weights)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(converted("mla", root), dst)
    damage(dst)
    assert orbax_io.is_conversion(dst) and not orbax_io.is_converted(dst)
    with pytest.raises(CheckpointError, match=message):
        vl2_jax.load_model(str(dst))
    error = convert_error(capsys, dst, tmp_path / "again")
    assert re.search(message, error) and "does not load" in error and "pass a Hugging Face folder" in error


def test_a_failed_placement_ends_the_load(root, monkeypatch):
    """A leaf that fails on its way to the device ends the load with its error, even while other
    readers wait for bytes held by leaves read but never placed (one byte of budget: one leaf at a time)."""
    import threading

    def fail(host, sharding):
        raise RuntimeError("device out of memory (simulated)")

    monkeypatch.setattr(orbax_io, "READ_BUDGET", 1)
    monkeypatch.setattr(orbax_io, "place", fail)
    dst = converted("mla", root)
    errors = []

    def load():
        try:
            orbax_io.restore(dst, VL2Config.from_pretrained(dst))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the load hung after a failed placement"
    assert len(errors) == 1 and "simulated" in str(errors[0])


# ------------------------------------------------------------------------------------------ errors
def broken_ckpt(tmp_path, edit) -> Path:
    """A copy of the mla fixture whose tensors `edit(dict)` changed."""
    src = copy_ckpt("mla", tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors")
    return src


def convert_error(capsys, *args) -> str:
    """Runs the CLI in-process (the subprocess path is covered above); returns its one error line."""
    assert convert_main([*map(str, args)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("language.model.layers.1.mlp.experts.3.up_proj.weight"), "missing tensor(s): language.model.layers.1.mlp.experts.3.up_proj.weight"),
    (lambda t: t.update(extra=np.zeros(3, np.float32)), "unexpected tensor(s): extra"),
    (lambda t: t.update({"projector.layers.0.bias": np.zeros(5, np.float32)}), "tensor projector.layers.0.bias has shape [5]"),
])
def test_bad_tensors_fail_cleanly(tmp_path, capsys, edit, message):
    src = broken_ckpt(tmp_path, edit)
    assert message in convert_error(capsys, src, tmp_path / "dst")
    assert not list(tmp_path.glob("dst*"))


def test_truncated_file_fails_cleanly(tmp_path):
    src = copy_ckpt("mla", tmp_path / "src")
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(src / "model.safetensors") - 1000)
    run = run_convert(src, tmp_path / "dst")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ") and "model.safetensors" in run.stderr
    assert not list(tmp_path.glob("dst*"))


def test_missing_inputs_fail_cleanly(tmp_path, capsys):
    assert "does not exist" in convert_error(capsys, tmp_path / "nowhere", tmp_path / "dst")
    src = copy_ckpt("mla", tmp_path / "src")
    (src / "config.json").unlink()
    assert "config.json" in convert_error(capsys, src, tmp_path / "dst")
    (src / "config.json").write_text('{"model_type": "deepseek_vl_v2", "tile_tag": "2D", "aligner": {}}')
    assert "config.json: key(s) aligner change how the official" in convert_error(capsys, src, tmp_path / "dst")
    assert not list(tmp_path.glob("dst*"))


def test_unknown_config_keys_warn_in_one_line_each_and_convert(tmp_path, capsys):
    """A key the official code does not read stops nobody: one `warning:` line per section, then the run goes on."""
    src = copy_ckpt("mla", tmp_path / "src")
    raw = json.loads((src / "config.json").read_text())
    raw["flavour"] = 1
    raw["language_config"]["mystery_knob"] = {"a": [1, 2]}
    (src / "config.json").write_text(json.dumps(raw))
    assert convert_main([str(src), str(tmp_path / "dst")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "warn" in line.lower()] == [
        "warning: config.json: unknown key(s) flavour; ignored (the official DeepSeek-VL2 code does not read them "
        "either).",
        "warning: language_config: unknown key(s) mystery_knob; ignored (the official DeepSeek-VL2 code does not "
        "read them either).",
    ]
    assert orbax_io.is_converted(tmp_path / "dst")


def test_existing_destination_needs_force(tmp_path, capsys, root):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    # An unrelated folder: the first message already says that --force would not help either.
    unrelated = (f"error: {dst} already exists and is not a vl2_jax checkpoint, so it will not be replaced, even with "
                 "--force; choose another destination.")
    assert convert_error(capsys, ckpt_dir("mha"), dst) == unrelated
    assert convert_error(capsys, ckpt_dir("mha"), dst, "--force") == unrelated
    assert (dst / "notes.txt").read_text() == "mine"
    shutil.rmtree(dst)
    shutil.copytree(converted("mla", root), dst)
    (dst / "train_state").mkdir()  # a fine-tuning run's folder: weights and the state beside them
    (dst / "notes.txt").write_text("mine")
    assert convert_error(capsys, ckpt_dir("mha"), dst, "--force") == (
        f"error: {dst} already exists and holds files that no conversion writes (notes.txt, train_state), so it "
        "will not be replaced, even with --force; choose another destination.")
    assert (dst / "notes.txt").read_text() == "mine" and (dst / "train_state").is_dir()
    shutil.rmtree(dst / "train_state"), (dst / "notes.txt").unlink()
    assert "already exists" in convert_error(capsys, ckpt_dir("mha"), dst)
    assert convert_main([str(ckpt_dir("mha")), str(dst), "--force"]) == 0
    assert json.loads((dst / "config.json").read_text()) == json.loads((ckpt_dir("mha") / "config.json").read_text())
    assert orbax_io.is_converted(dst) and [p.name for p in tmp_path.iterdir()] == ["dst"]
    link = tmp_path / "link"  # a link to a conversion: --force replaces the link, the folder it named stays
    link.symlink_to(dst)
    assert convert_main([str(ckpt_dir("mla")), str(link), "--force"]) == 0
    assert not link.is_symlink() and orbax_io.is_converted(link) and orbax_io.is_converted(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "link"]


def test_unwritable_destination_fails_first_naming_it(tmp_path, capsys):
    """The destination is checked before the source is read: here the source's config.json is broken, yet
    the one error line is about the destination, naming it and why it cannot be written."""
    src = copy_ckpt("mla", tmp_path / "src")
    (src / "config.json").write_text("{")
    (tmp_path / "file.txt").write_text("")
    missing, under_file = tmp_path / "missing" / "dst", tmp_path / "file.txt" / "dst"
    assert convert_error(capsys, src, missing) == (
        f"error: cannot write {missing}: its parent folder {missing.parent} does not exist; create it or choose "
        "another destination.")
    assert not missing.parent.exists()
    assert convert_error(capsys, src, under_file) == (
        f"error: cannot write {under_file}: its parent folder {under_file.parent} is a file, not a folder; "
        "choose another destination.")
    if Path("/proc/self").is_dir():  # a folder that exists but takes no new entries (the example)
        line = convert_error(capsys, src, "/proc/forbidden")
        assert re.fullmatch(r"error: cannot write /proc/forbidden: (/proc does not allow creating folders in it|"
                            r"no permission to create a folder in /proc); choose another destination\.", line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "src"]


def test_a_destination_equal_to_containing_or_inside_the_source_is_refused(tmp_path, capsys):
    src = copy_ckpt("mla", tmp_path / "src")
    before = sorted(p.name for p in src.iterdir())
    for dst in (src, tmp_path, src / "out"):
        line = convert_error(capsys, src, dst)
        assert line == (f"error: the destination {dst} is inside the source {src}; choose a folder outside it."
                        if dst == src / "out" else
                        f"error: the destination {dst} would contain or replace the source {src}; choose another folder.")
    assert sorted(p.name for p in src.iterdir()) == before


# ------------------------------------------------------------------------------- interrupted runs
SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    from vl2_jax import orbax_io
    save = orbax_io._save_group
    def slow_save(checkpointer, directory, tree):  # the first group lands, then the run stalls until it is killed
        save(checkpointer, directory, tree)
        (directory.parent / "saved").touch()  # (orbax's save has returned)
        time.sleep(600)
    orbax_io._save_group = slow_save
    from convert.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def test_killed_conversion_leaves_no_checkpoint(tmp_path):
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(ckpt_dir("mha")), str(dst)], cwd=REPO,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / f"dst.partial-{proc.pid}"
    deadline = time.time() + 60
    while not (partial / "params" / "saved").exists():
        assert proc.poll() is None and time.time() < deadline, "the conversion never wrote its first group"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists() and not orbax_io.is_converted(partial)
    with pytest.raises(CheckpointError):
        orbax_io.restore(partial, VL2Config.from_pretrained(ckpt_dir("mha")))

    run = run_convert(ckpt_dir("mha"), dst)
    assert run.returncode == 0, run.stderr
    assert "interrupted conversion" in run.stderr and not partial.exists()
    assert orbax_io.is_converted(dst) and [p.name for p in tmp_path.iterdir()] == ["dst"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_conversion_says_so_and_removes_what_it_wrote(tmp_path, sig):
    """Ctrl-C or SIGTERM in the middle: one line, status 130, no partial folder left behind."""
    dst = tmp_path / "dst"
    script = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n" + SLOW_CONVERT
    proc = subprocess.Popen([sys.executable, "-c", script, str(ckpt_dir("mha")), str(dst)], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / f"dst.partial-{proc.pid}"
    deadline = time.time() + 60
    while not (partial / "params" / "saved").exists():
        assert proc.poll() is None and time.time() < deadline, "the conversion never wrote its first group"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == f"error: interrupted; {dst} was not written.", err
    assert "Traceback" not in err and out == ""
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ dtypes
def test_bfloat16_conversion_and_random_sharded_checkpoint(tmp_path):
    cfg = PRESETS["test"]
    src = write_random_hf_checkpoint(cfg, tmp_path / "src", dtype="float32", shards=3)
    assert len(list(src.glob("model-0000?-of-00003.safetensors"))) == 3
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ckpt_dir("mla") / name, src / name)
    processor = json.loads((ckpt_dir("mla") / "processor_config.json").read_text())  # 70-px tiles: the test's are 56
    processor["candidate_resolutions"] = [list(r) for r in cfg.candidate_resolutions]
    (src / "processor_config.json").write_text(json.dumps(processor))
    run = run_convert(src, tmp_path / "dst", "--dtype", "bfloat16")
    assert run.returncode == 0, run.stderr
    params, saved = orbax_io.restore(tmp_path / "dst", cfg)
    assert saved == jax.numpy.bfloat16
    want = load_hf(src, cfg, jax.numpy.bfloat16)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(params), strict=True):
        assert b.dtype == jax.numpy.bfloat16 and np.array_equal(np.asarray(a), np.asarray(b))
    assert vl2_jax.load_pretrained(tmp_path / "dst", dtype=None).dtype == jax.numpy.bfloat16


def test_a_random_checkpoint_with_its_assets_loads_as_a_released_one_and_heeds_its_prompt(tmp_path):
    """`write_random_hf_checkpoint(..., assets=True)`: a whole Hugging Face folder (the processor and
    tokenizer files of `random:test`), its norms' scales about 1, so different prompts get different
    first-token logits (with every weight at std 0.02 the output ignored the prompt)."""
    src = write_random_hf_checkpoint(PRESETS["test"], tmp_path / "src", dtype="float32", assets=True)
    model = vl2_jax.load_model(str(src), "float32")
    scale = np.asarray(model.params["params"]["language"]["norm"]["scale"])
    assert abs(float(scale.mean()) - 1) < 0.01
    proc = model.processor
    a, b = (np.asarray(model.logits(proc.batchify([proc([{"role": "user", "content": text}])])))[0, -1]
            for text in ("Hello there", "What is in the picture of a cat?"))
    assert np.argmax(a) != np.argmax(b) and not np.allclose(a, b, atol=1e-2)
