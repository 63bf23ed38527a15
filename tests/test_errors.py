"""Bad input from the real world: every case gets one clear sentence and a documented exception (API) or an
`error: ...` line, a non-zero exit status and no traceback (CLI); valid odd images follow the reference rules.

Covered elsewhere, not repeated here: argument errors --max-new-tokens 0, --temperature -1, --top-p 1.5,
--dtype float8, a missing absolute --model folder and invalid UTF-8 in --chat (tests/test_cli.py);
`python -m convert` with missing, unexpected or mis-shaped tensors, a truncated file, a missing config and
an interrupted run (tests/test_convert.py); unsupported config values (tests/test_config.py).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import FIXTURES, ckpt_dir
from PIL import Image
from safetensors.numpy import load_file, save_file

import vl2_jax
from generate.__main__ import main
from vl2_jax.cli import explain
from vl2_jax.config import PRESETS
from vl2_jax.errors import CheckpointError, ConfigError, InputError
from vl2_jax.processor import Processor

REPO = Path(__file__).resolve().parents[1]
TINY_IMAGE = FIXTURES / "images" / "noise_tiny.png"
USER = lambda text: [{"role": "user", "content": text}]  # noqa: E731


@pytest.fixture(scope="module")
def processor() -> Processor:
    """The fixture checkpoint's processor: 70 px tiles, 3x3 tokens per tile."""
    return Processor.from_pretrained(ckpt_dir("mla"))


@pytest.fixture(scope="module")
def processor384(processor) -> Processor:
    """The released models' tiling: 384 px tiles, 14x14 tokens per tile, up to 9 tiles."""
    return Processor(processor.tokenizer, PRESETS["tiny"].candidate_resolutions, 14, 2)


def one_sentence(message: str) -> str:
    assert "\n" not in message and "Traceback" not in message and message.endswith("."), message
    return message


def cli_error(capsys, argv, code: int = 1) -> str:
    """Runs `python -m generate` in-process; checks the exit status and the single error line, returns it."""
    if code == 2:  # argparse: a usage line, then one error line
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in argv])
        assert exit_.value.code == 2
    else:
        assert main([str(a) for a in argv]) == code
    captured = capsys.readouterr()
    err = captured.err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err and "Token indices" not in err, err
    assert err.splitlines()[-1] == errors[0], err  # nothing after the error line
    return errors[0]


def api_error(kind, fn, *args):
    with pytest.raises(kind) as raised:
        fn(*args)
    return one_sentence(str(raised.value))


# ------------------------------------------------------------------------------------------- images
def _png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (PIL reads the header only until .load())."""
    data = bytearray(_png_bytes(Image.new("L", (8, 8))))
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts at byte 16
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _noise(size=(300, 200), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _encoded(fmt: str) -> bytes:
    out = io.BytesIO()
    _noise().save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def _corrupt(data: bytes) -> bytes:
    bad = bytearray(data)
    start = len(bad) // 3
    bad[start : start + 200] = bytes(b ^ 0x5A for b in bad[start : start + 200])
    return bytes(bad)


BAD_IMAGES = {
    "missing": (None, "does not exist"),
    "empty.png": (lambda: b"", "is empty (0 bytes)"),
    "notes.png": (lambda: b"these are my notes, not a picture\n", "not an image file"),
    "truncated.png": (lambda: _encoded("PNG")[: len(_encoded("PNG")) // 2], "could not be decoded"),
    "truncated.jpg": (lambda: _encoded("JPEG")[: len(_encoded("JPEG")) // 2], "could not be decoded"),
    "corrupt.png": (lambda: _corrupt(_encoded("PNG")), "could not be decoded"),
    "corrupt.jpg": (lambda: _corrupt(_encoded("JPEG")), "could not be decoded"),
    "bomb.png": (lambda: _png_claiming(20000, 20000), "400,000,000 pixels, over PIL's decompression-bomb limit"),
    "big.png": (lambda: _png_claiming(10000, 10000), "10000x10000 = 100,000,000 pixels, over PIL's decompression"),
    "zero_width.png": (lambda: _png_claiming(0, 10), "not an image file"),  # PIL cannot even identify it
    "folder.png": ("dir", "is a folder"),
}


def _make_bad_image(tmp_path: Path, name: str) -> Path:
    make, _ = BAD_IMAGES[name]
    path = tmp_path / name
    if make == "dir":
        path.mkdir()
    elif make is not None:
        path.write_bytes(make())
    return path


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_files_api(tmp_path, processor, name):
    path = _make_bad_image(tmp_path, name)
    message = api_error(InputError, processor, USER("<image> What is it?"), [path])
    assert str(path) in message and BAD_IMAGES[name][1] in message


@pytest.mark.parametrize("name", ["missing", "empty.png", "notes.png", "truncated.jpg", "corrupt.png", "bomb.png"])
def test_bad_image_files_cli(tmp_path, capsys, name):
    # Images are checked before the model loads: none of these builds the random model.
    path = _make_bad_image(tmp_path, name)
    line = cli_error(capsys, ["--model", "random:test", "--image", path, "--prompt", "What is it?"])
    assert str(path) in line and BAD_IMAGES[name][1] in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if name == "missing" else [name])  # nothing left


def test_bad_image_subprocess_has_one_line_and_no_traceback(tmp_path):
    path = _make_bad_image(tmp_path, "truncated.jpg")
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-m", "generate", "--model", str(ckpt_dir("mla")), "--image", str(path), "--prompt", "hi"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: image {path} could not be decoded"), r.stderr


def test_urls_and_base64_given_to_the_processor_name_load_image(processor):
    """The processor reads paths and PIL images; a URL or base64 (what --image and the server take) was
    "image file data:image/png;base64,... does not exist; check the path", the whole base64 included."""
    data = base64.b64encode(_encoded("PNG")).decode()
    for ref in ["data:image/png;base64," + data, data, "https://example.com/cat.png"]:
        message = one_sentence(api_error(InputError, processor, USER("<image> What is it?"), [ref]))
        assert "vl2_jax.images.load_image" in message and len(message) < 400, message


def test_in_memory_images_zero_area_bad_mode_and_closed_file(tmp_path, processor):
    images = [Image.new("RGB", (5, 5)), Image.new("RGB", (0, 7))]
    message = api_error(InputError, processor, USER("<image><image>"), images)
    assert message.startswith("image 2 of 2 has zero area (0x7 pixels)")
    message = api_error(InputError, processor, USER("<image>"), [Image.new("La", (4, 4))])
    assert message.startswith("image 1 of 1 has mode 'La', which PIL cannot convert to RGB")
    path = tmp_path / "noise.png"
    _noise().save(path)
    lazy = Image.open(path)
    lazy.close()  # opened but never decoded, then closed: decoding now fails
    assert "could not be decoded" in api_error(InputError, processor, USER("<image>"), [lazy])
    assert "got int" in api_error(InputError, processor, USER("<image>"), [3])


def test_decompression_bomb_limit_is_pils_setting(tmp_path, processor, monkeypatch):
    path = tmp_path / "noise.png"
    _noise((300, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    assert "300x200 = 60,000 pixels" in api_error(InputError, processor, USER("<image>"), [path])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the user lifted the limit
    grid = _expected_grid(300, 200, processor.candidate_resolutions, 70)
    assert processor(USER("<image>"), [path]).images_spatial_crop.tolist() == [list(grid)]


def _normalized(rgb: np.ndarray) -> np.ndarray:
    """Reference pixels: /255, then (x - 0.5) / 0.5, channels first."""
    x = rgb.astype(np.float32) / np.float32(255)
    return ((x - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)


def _mode_image(mode: str, size: int, seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":  # 16-bit grey, values over 255 included
        return Image.fromarray(rng.integers(0, 1000, (size, size)).astype(np.uint16))
    if mode == "P":
        return _noise((size, size), seed).convert("P", palette=Image.Palette.ADAPTIVE, colors=37)
    return _noise((size, size), seed).convert("RGBA" if mode in ("RGBA", "LA") else "RGB").convert(mode)


@pytest.mark.parametrize(
    "mode,fmt",
    [("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"), ("1", "PNG")],
)
def test_image_modes_convert_like_the_reference(tmp_path, processor, mode, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    _mode_image(mode, 70).save(path, fmt)
    with Image.open(path) as stored:
        assert stored.mode == mode
        want = _normalized(np.asarray(stored.convert("RGB")))  # what the reference's callers do
    for given in (path, Image.open(path)):  # a path, and a PIL image opened lazily by the caller
        out = processor(USER("<image> Describe."), [given])
        # A 70x70 image on 70 px tiles: the global view and the single local tile are the image itself.
        assert out.images_spatial_crop.tolist() == [[1, 1]] and out.images.shape == (2, 3, 70, 70)
        np.testing.assert_array_equal(out.images[0], want)
        np.testing.assert_array_equal(out.images[1], want)


def _expected_grid(width, height, candidates, tile, cropping=True):
    """MODEL_FACTS rules: best candidate maximises min(int-truncated downscaled area, original area), ties
    to the least waste, then the earliest; without cropping one tile."""
    if not cropping:
        return 1, 1
    best, best_key = None, None
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(cw * ch - effective))
        if best_key is None or key > best_key:
            best, best_key = (cw, ch), key
    return best[0] // tile, best[1] // tile


@pytest.mark.parametrize(
    "sizes", [[(1, 1)], [(4000, 50)], [(50, 4000)], [(4000, 50), (50, 4000)], [(1, 1), (4000, 50), (50, 4000)]]
)
def test_odd_sizes_follow_the_reference_rules(processor384, sizes):
    p = processor384
    images = [_noise(s, seed=i) for i, s in enumerate(sizes)]
    out = p(USER("<image>" * len(images) + " Compare."), images)
    grids = [_expected_grid(w, h, p.candidate_resolutions, 384, cropping=len(sizes) <= 2) for w, h in sizes]
    tokens = [14 * 15 + 1 + (nh * 14) * (nw * 14 + 1) for nw, nh in grids]
    assert out.images_spatial_crop.tolist() == [list(g) for g in grids]
    assert out.images.shape == (sum(1 + nw * nh for nw, nh in grids), 3, 384, 384)
    assert int(out.images_seq_mask.sum()) == sum(tokens) == int((out.input_ids == p.image_token_id).sum())
    if sizes == [(1, 1)]:
        assert grids == [(1, 1)] and tokens == [421]
        np.testing.assert_array_equal(
            out.images[0], np.broadcast_to(_normalized(np.asarray(images[0]))[:, :1, :1], (3, 384, 384))
        )
    if sizes == [(50, 4000)]:
        assert grids == [(1, 9)] and tokens == [2101]  # the most tokens one image can take
    if sizes == [(4000, 50)]:
        assert grids == [(9, 1)] and tokens == [1989]
        pad = _normalized(np.full((1, 1, 3), 127, np.uint8))[0, 0, 0]  # the grey fill, (127/255 - 0.5) / 0.5
        glob = out.images[0]  # a 384 x ~5 band in the middle, the grey pad colour above and below
        assert (glob[:, :150] == pad).all() and (glob[:, -150:] == pad).all() and not (glob[:, 190] == pad).all()


# ------------------------------------------------------------------------------------------ prompts
def test_placeholder_count_mismatch(capsys, processor):
    line = cli_error(capsys, ["--model", "random:test", "--image", TINY_IMAGE, "--prompt", "<image> vs <image>"])
    assert "the prompt has 2 <image> placeholder(s) but 1 image(s) were given" in line
    message = api_error(InputError, processor, USER("<image> and <image>"), [TINY_IMAGE])
    assert "2 <image> placeholder(s) but 1 image(s)" in message
    message = api_error(InputError, processor, USER("No placeholder."), [TINY_IMAGE])
    assert "0 <image> placeholder(s) but 1 image(s)" in message


@pytest.mark.parametrize("prompt", ["", "   \n "])
def test_empty_prompt(capsys, prompt):
    line = cli_error(capsys, ["--model", "random:test", "--prompt", prompt])
    assert line == "error: the prompt is empty; say something or give an image."


@pytest.fixture(scope="module")
def fixture_model():
    return vl2_jax.load_pretrained(ckpt_dir("mla"))


def test_prompt_over_the_context(capsys, fixture_model):
    prompt = "ab" * 2100
    n = len(fixture_model.processor(USER(prompt)).input_ids)
    assert n > 4095
    batch = fixture_model.processor.batchify([fixture_model.processor(USER(prompt))])
    message = api_error(InputError, fixture_model.generate, batch)
    assert f"the prompt has {n} tokens but the model's context is 4096 tokens" in message
    line = cli_error(capsys, ["--model", ckpt_dir("mla"), "--prompt", prompt, "--max-new-tokens", "2"])
    assert f"the prompt has {n} tokens but the model's context is 4096 tokens" in line


def test_generate_refuses_what_is_not_a_processor_batch(fixture_model):
    """A list of processor outputs, a string or an empty list: one InputError naming what to make instead."""
    one = fixture_model.processor(USER("Hi."))
    for wrong, name in [([one, one], "list"), ("Hi.", "str"), ([], "list")]:
        message = api_error(InputError, fixture_model.generate, wrong)
        assert message.startswith(f"expected a processor batch or one processor output, got {name};")
        assert "model.processor.batchify" in message


def test_batches_the_model_cannot_read_correctly_are_refused(fixture_model):
    """Hand-built batches: float tiles where the uint8 pixels belong, or another normalisation than
    the model's processor, would otherwise be silently wrong on the device."""
    p = fixture_model.processor
    batch = p.batchify([p(USER("<image> What is it?"), [TINY_IMAGE])])
    floats = dataclasses.replace(batch, pixels=batch.pixels.astype(np.float32) / 255)
    assert "batch.pixels must be uint8" in api_error(InputError, fixture_model.logits, floats)
    other = dataclasses.replace(batch, pixel_norm=None)
    assert "normalised with None" in api_error(InputError, fixture_model.generate, other)
    with pytest.raises(ValueError, match="read-only"):
        batch.images[0, 0, 0, 0, 0] = 1.0  # the model reads the pixels, so an edit here must not pass


def test_one_processor_output_the_model_cannot_read_is_refused_by_every_entry_point(fixture_model):
    """The same checks for one output, not batched first: generate and stream ran float tiles (cast) and
    another normalisation (ignored), and batchify cast float tiles to uint8."""
    p = fixture_model.processor
    one = p(USER("<image> What is it?"), [TINY_IMAGE])
    floats = dataclasses.replace(one, pixels=one.pixels.astype(np.float32) / 255)
    other = dataclasses.replace(one, pixel_norm=((0.1, 0.2, 0.3), (0.9, 0.9, 0.9)))
    for call in (fixture_model.generate, lambda b: list(fixture_model.stream(b)), fixture_model.logits):
        assert "the output's pixels must be uint8 [tiles, S, S, 3]" in api_error(InputError, call, floats)
        assert "the output's images are normalised with" in api_error(InputError, call, other)
    assert "item 0's pixels are float32" in api_error(InputError, p.batchify, [floats])


def test_one_processor_output_is_a_batch_of_one_everywhere(fixture_model):
    """logits and prepare_inputs_embeds take one processor output, as generate and stream do."""
    p = fixture_model.processor
    one = p(USER("<image> What is it?"), [TINY_IMAGE])
    batch = p.batchify([one])
    np.testing.assert_array_equal(fixture_model.logits(one), fixture_model.logits(batch))
    np.testing.assert_array_equal(fixture_model.prepare_inputs_embeds(one), fixture_model.prepare_inputs_embeds(batch))


@pytest.mark.parametrize("bad", [-3, 10**6])
def test_token_ids_outside_the_vocabulary_are_refused(fixture_model, bad):
    """An edited prompt with an id the embedding table has no row for: an error, not a silent clamp."""
    one = fixture_model.processor(USER("Hi."))
    ids = one.input_ids.copy()
    ids[1] = bad
    vocab = fixture_model.cfg.language.vocab_size
    edited = dataclasses.replace(one, input_ids=ids)
    for call in (fixture_model.generate, fixture_model.logits, fixture_model.prepare_inputs_embeds):
        assert api_error(InputError, call, edited) == f"the prompt's token ids must be in [0, {vocab}); got [{bad}]."
    wide = one.input_ids.astype(np.int64)
    wide[1] = 2**32 + 5  # (not wrapped to 5 on its way to int32)
    message = api_error(InputError, fixture_model.generate, dataclasses.replace(one, input_ids=wide))
    assert message == f"the prompt's token ids must be int32 values; got [{2**32 + 5}]."


def test_weights_larger_than_the_host_memory_are_refused_before_any_is_made(monkeypatch):
    """On the CPU the weights live in the host's memory, and running out of it ends the process with no
    message (random:small in float32 on a 24 GB machine: 64.5 GB): load_model refuses first, naming the
    sizes and what to try, for random weights and checkpoints alike; quantized weights count as such."""
    need = vl2_jax.load.weight_bytes(vl2_jax.load.param_shapes(vl2_jax.PRESETS["test"], jax.numpy.float32))
    monkeypatch.setattr(vl2_jax.prefetch, "available_memory", lambda: need - 1)
    assert vl2_jax.load_model("random:test", "float32", quant="int8").quant == "int8"  # (int8: under half of it)
    monkeypatch.setattr(vl2_jax.load, "init_params", lambda *a, **k: pytest.fail("weights were made"))
    monkeypatch.setattr(vl2_jax.load, "load_hf", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ConfigError, match=r"^random:test's float32 weights need 0\.0 GB of memory and this machine has "
                                          r"0\.0 GB available; use dtype bfloat16 \(--dtype bfloat16\) or int8 weights "
                                          r"\(--quant int8\), or take a smaller model \(random:tiny, random:test\)\.$"):
        vl2_jax.load_model("random:test", "float32")
    with pytest.raises(ConfigError, match=r"'s float32 weights need .* or a machine with more memory\.$"):
        vl2_jax.load_pretrained(ckpt_dir("mla"), "float32")


def test_runtime_the_model_cannot_take_is_refused_before_the_weights(monkeypatch):
    """A max_seq_len beyond the context, or prefill chunks of no common step, fail in load_model, not
    at the first generate; so do a spec or runtime of the wrong type."""
    monkeypatch.setattr(vl2_jax.load, "init_params", lambda *a, **k: pytest.fail("weights were made"))
    with pytest.raises(ConfigError, match=r"^max_seq_len 100000 is longer than the model's context \(\d+ tokens"):
        vl2_jax.load_model("random:test", runtime=vl2_jax.Runtime(max_seq_len=100000))
    with pytest.raises(ConfigError, match=r"^prefill_chunks \(100, 1024\) must all be multiples of the smallest, 100\.$"):
        vl2_jax.load_model("random:test", runtime=vl2_jax.Runtime(prefill_chunks=(100, 1024)))
    monkeypatch.setattr(vl2_jax.load, "load_hf", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ConfigError, match="max_seq_len 100000 is longer"):
        vl2_jax.load_pretrained(ckpt_dir("mla"), runtime=vl2_jax.Runtime(max_seq_len=100000))
    for spec, runtime, error, words in [
        (None, vl2_jax.Runtime(), TypeError, "the model spec must be a str (random:SIZE, a checkpoint folder or a hub id) or a path, not NoneType"),
        (5, vl2_jax.Runtime(), TypeError, "not int"),
        (" ", vl2_jax.Runtime(), CheckpointError, "the model spec is empty; pass random:SIZE, a checkpoint folder or a hub id."),
        ("random:test", {"max_batch": 2}, TypeError, "runtime must be a vl2_jax.Runtime, not dict"),
    ]:
        with pytest.raises(error) as e:
            vl2_jax.load_model(spec, runtime=runtime)
        assert words in str(e.value)


# ---------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "args,code,words",
    [
        (["--max-new-tokens", "-3"], 2, "--max-new-tokens: must be at least 1 (got -3)"),
        (["--max-new-tokens", "ten"], 2, "--max-new-tokens: must be a whole number of at least 1 (got 'ten')"),
        (["--prefill-chunk", "0"], 2, "--prefill-chunk: must be at least 1 (got 0)"),
        (["--temperature", "hot"], 2, "--temperature: invalid float value"),
        (["--temperature", "nan"], 1, "--temperature must be finite and >= 0 (got nan)"),
        (["--temperature", "inf"], 1, "--temperature must be finite and >= 0 (got inf)"),
        (["--top-p", "0"], 1, "--top-p must be in (0, 1] (got 0.0)"),
        (["--top-p", "nan"], 1, "--top-p must be in (0, 1]"),
        (["--top-k", "-2"], 1, "--top-k must be a whole number >= 1, or 0 or -1 (off) (got -2)"),
        (["--repetition-penalty", "0"], 1, "--repetition-penalty must be finite and > 0 (got 0.0"),
        (["--repetition-penalty", "-1.5"], 1, "--repetition-penalty must be finite and > 0 (got -1.5"),
        (["--dtype", "int8"], 2, "--dtype: invalid choice: 'int8'"),
        ([], 1, "give --prompt TEXT"),
    ],
)
def test_bad_arguments(capsys, args, code, words):
    argv = ["--model", "random:test", *args] + ([] if not args else ["--prompt", "hi"])
    assert words in cli_error(capsys, argv, code)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN may run here")
def test_cudnn_attention_where_it_cannot_run_is_refused_before_loading(capsys, monkeypatch):
    """An explicit --attention cudnn on a CPU (or in float32) is one clear error before any weight is made,
    not a failure at the first request."""
    monkeypatch.setattr(vl2_jax.load, "random_model", lambda *a, **k: pytest.fail("weights were made"))
    with pytest.raises(ConfigError, match="attention 'cudnn' runs on NVIDIA GPUs in bfloat16 or float16, not here"):
        vl2_jax.load_model("random:test", runtime=vl2_jax.Runtime(attention="cudnn"))
    assert "use 'auto'" in cli_error(capsys, ["--model", "random:test", "--attention", "cudnn", "--prompt", "hi"], 1)


def test_api_refuses_bad_sampling_arguments(fixture_model, monkeypatch):
    batch = fixture_model.processor.batchify([fixture_model.processor(USER("hi"))])
    for kwargs, words in [
        ({"repetition_penalty": 0.0}, "repetition_penalty must be finite and > 0"),
        ({"top_k": -2}, "top_k must be a whole number >= 1, or 0 or -1 (off)"),
        ({"max_new_tokens": 0}, "max_new_tokens must be"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number (got 2.5)"),  # (was cut to 2 silently)
        ({"max_new_tokens": None}, "max_new_tokens must be a whole number (got None)"),  # (was a TypeError)
        ({"max_new_tokens": "8"}, "max_new_tokens must be a whole number (got '8')"),
        ({"temperature": "0.5"}, "temperature must be a number (got '0.5')."),  # (these three were TypeErrors)
        ({"top_p": None}, "top_p must be a number (got None)."),
        ({"seed": "1"}, "seed must be a whole number (got '1')."),
        ({"top_k": 2.5}, "top_k must be a whole number (got 2.5)."),  # (these two were cut silently)
        ({"seed": 2.7}, "seed must be a whole number (got 2.7)."),
        ({"repetition_penalty": True}, "repetition_penalty must be a number (got True)."),
    ]:
        assert words in api_error(InputError, functools.partial(fixture_model.generate, batch, **kwargs))
    import vl2_jax.model

    sampled = dict(max_new_tokens=3, temperature=1.0, ignore_eos=True)
    monkeypatch.setattr(vl2_jax.model.secrets, "randbits", lambda bits: 12345)  # (seed None: a fresh random one)
    assert fixture_model.generate(batch, seed=None, **sampled).token_ids == fixture_model.generate(
        batch, seed=12345, **sampled).token_ids
    monkeypatch.undo()
    for dtype in ("", "bf16"):  # ("" was the default dtype)
        assert f"unknown dtype {dtype!r}" in api_error(ConfigError, vl2_jax.load_model, "random:test", dtype)
    assert "prefill_chunks must be whole numbers of at least 1" in api_error(
        ConfigError, functools.partial(vl2_jax.Runtime, prefill_chunks=(0,)))


# -------------------------------------------------------------------------------------- checkpoints
def _copy_ckpt(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir("mla"), dst)
    for f in dst.iterdir():
        f.chmod(0o644)  # the fixtures are read-only
    return dst


def _edit_tensors(edit):
    def damage(path: Path):
        tensors = load_file(path / "model.safetensors")
        edit(tensors)
        save_file(tensors, path / "model.safetensors")

    return damage


def _truncate(path: Path):
    file = path / "model.safetensors"
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - 1000)


LLAMA = '{"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32000}'
EXPERT = "language.model.layers.1.mlp.experts.3.up_proj.weight"
BAD_CKPTS = {
    "no folder": (lambda p: shutil.rmtree(p), CheckpointError, "does not exist"),
    "no config": (lambda p: (p / "config.json").unlink(), ConfigError, "has no config.json"),
    "bad json config": (lambda p: (p / "config.json").write_text("{"), ConfigError, "config.json is not valid JSON"),
    "llama config": (lambda p: (p / "config.json").write_text(LLAMA), ConfigError, "model_type='llama'"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), CheckpointError, "has no weights"),
    "shards without their index": (lambda p: (p / "model.safetensors").rename(p / "model-00001-of-00002.safetensors"),
                                   CheckpointError, "has safetensors shards (model-00001-of-00002.safetensors) but not "
                                   "model.safetensors.index.json"),
    "missing tensor": (_edit_tensors(lambda t: t.pop(EXPERT)), CheckpointError, f"missing tensor(s): {EXPERT}"),
    "extra tensor": (
        _edit_tensors(lambda t: t.update(extra=np.zeros(3, np.float32))),
        CheckpointError,
        "unexpected tensor(s): extra",
    ),
    "wrong shape": (
        _edit_tensors(lambda t: t.update({"image_newline": np.zeros(5, np.float32)})),
        CheckpointError,
        "tensor image_newline has shape [5]",
    ),
    "int tensor": (
        _edit_tensors(lambda t: t.update({"image_newline": t["image_newline"].astype(np.int32)})),
        CheckpointError,
        "tensor image_newline in ",
    ),
    "truncated": (_truncate, CheckpointError, "the file is truncated or corrupt"),
    "no tokenizer": (lambda p: (p / "tokenizer.json").unlink(), ConfigError, "has no tokenizer.json"),
    "bad tokenizer": (
        lambda p: (p / "tokenizer.json").write_text('{"model": 1}'),
        ConfigError,
        "tokenizer.json is not a valid tokenizer file",
    ),
    "no processor config": (
        lambda p: (p / "processor_config.json").unlink(),
        ConfigError,
        "has no processor_config.json",
    ),
    "bad processor config": (
        lambda p: (p / "processor_config.json").write_text("[1, 2"),
        ConfigError,
        "processor_config.json is not valid JSON",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CKPTS))
def test_bad_checkpoints_api(tmp_path, name):
    damage, kind, words = BAD_CKPTS[name]
    path = _copy_ckpt(tmp_path)
    damage(path)
    message = api_error(kind, vl2_jax.load_pretrained, path)
    assert words in message
    if name != "llama config":  # config.py's messages name the key, not the folder (see the module docstring)
        assert str(path) in message, message


@pytest.mark.parametrize(
    "name", ["no folder", "llama config", "missing tensor", "int tensor", "truncated", "no tokenizer"]
)
def test_bad_checkpoints_cli(tmp_path, capsys, name):
    damage, _, words = BAD_CKPTS[name]
    path = _copy_ckpt(tmp_path)
    damage(path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    line = cli_error(capsys, ["--model", path, "--prompt", "hi", "--max-new-tokens", "1"])
    assert line.startswith("error: ") and words in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing left behind


def test_nonexistent_relative_folder_tries_the_hub_and_says_both(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setenv("VL2_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, ["--model", "my-models/vl2-tiny", "--prompt", "hi"])
    assert line.startswith("error: my-models/vl2-tiny is not a local folder, and downloading it from the Hugging")
    assert "couldn't connect" in line and not (tmp_path / "cache").exists()
    # the offline suggestion is the small test model, not random:tiny (13.5 GB of float32 weights)
    assert line.endswith("or try random:test (small random weights, no download) offline.")


def test_a_hub_download_is_converted_once_and_its_cost_on_disk_named(tmp_path, monkeypatch):
    """A hub id: downloaded (here a fake huggingface_hub cache: snapshot links into blobs), converted into
    $VL2_JAX_CACHE, and one line says what the download still takes on disk and how to delete it."""
    import huggingface_hub

    from vl2_jax import load
    from vl2_jax.orbax_io import format_bytes

    repo = tmp_path / "hub" / "models--me--vl2"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True), blobs.mkdir()
    size = 0
    for f in ckpt_dir("mha").iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(blobs / f.name)
        size += f.stat().st_size
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(repo_id) or str(snapshot))
    monkeypatch.setenv("VL2_JAX_CACHE", str(tmp_path / "cache"))
    lines = []
    load.load_model("me/vl2", "float32", progress=lines.append)
    note = next(line for line in lines if line.startswith("the download of me/vl2"))
    assert f"({format_bytes(size)} in {repo})" in note and "`hf cache rm model/me/vl2` (or rm -r" in note
    assert (tmp_path / "cache" / "me--vl2").is_dir()
    load.load_model("me/vl2", "float32")  # the converted copy: no second download
    assert calls == ["me/vl2"]


# ------------------------------------------------------------------------------------ out of memory
OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.50GiB.\nBufferAssignment OOM Debugging.\n..."


def test_explain_out_of_memory():
    for error in (jax.errors.JaxRuntimeError(OOM), RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")):
        message = one_sentence(explain(error))
        assert message.startswith("the accelerator ran out of memory;") and "--prefill-chunk" in message
    assert one_sentence(explain(MemoryError())).startswith("the host ran out of memory")
    assert explain(ValueError("odd\nthing")) == "ValueError: odd thing"


def test_out_of_memory_at_load_and_prefill_is_one_line(capsys, monkeypatch, fixture_model):
    import vl2_jax.load

    def load_oom(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(OOM)

    monkeypatch.setattr(vl2_jax.load, "load_model", load_oom)
    assert "ran out of memory" in cli_error(capsys, ["--model", "random:test", "--prompt", "hi"])

    def generate_oom(batch, **kwargs):
        raise jax.errors.JaxRuntimeError(OOM)

    monkeypatch.setattr(fixture_model, "generate", generate_oom)  # as if prefill ran out of device memory
    monkeypatch.setattr(vl2_jax.load, "load_model", lambda *args, **kwargs: fixture_model)
    line = cli_error(capsys, ["--model", "random:test", "--prompt", "hi", "--image", TINY_IMAGE])
    assert "ran out of memory" in line


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("orbax: commit failed\nsecond line")])
def test_convert_failing_midway_leaves_nothing(tmp_path, capsys, monkeypatch, error):
    from convert.__main__ import main as convert_main
    from vl2_jax import orbax_io

    def save_then_fail(*args):
        raise error

    monkeypatch.setattr(orbax_io, "_save_group", save_then_fail)
    assert convert_main([str(ckpt_dir("mha")), str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err
    line = err.splitlines()[-1]
    assert (
        "Traceback" not in err and line.startswith("error: ") and line.endswith(f"{tmp_path / 'dst'} was not written.")
    )
    assert (
        "host ran out of memory" if isinstance(error, MemoryError) else "RuntimeError: orbax: commit failed"
    ) in line
    assert list(tmp_path.iterdir()) == []


def test_deferred_interrupt_notes_the_first_signal_raises_at_the_second_and_restores_the_handlers():
    import signal
    import time

    from vl2_jax.errors import deferred_interrupt

    def deliver(sig):  # (Python runs a handler at its next instruction; a few to be sure)
        os.kill(os.getpid(), sig)
        for _ in range(100):
            time.sleep(0.001)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = [signal.getsignal(sig) for sig in signals]
    for first in (signal.SIGTERM, signal.SIGHUP):
        with deferred_interrupt() as stop:
            assert not stop.is_set()
            deliver(first)
            assert stop.is_set()
            with pytest.raises(KeyboardInterrupt):
                deliver(signal.SIGINT)
        assert [signal.getsignal(sig) for sig in signals] == before
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (as `nohup` starts a command: a closed terminal goes unnoticed)
    try:
        with deferred_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before[2])


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupts_held_raise_at_the_blocks_end_then_sigterm_interrupts(sig):
    """Within `interrupts_held` (imports that bring in JAX) a signal raises once the block is done, a
    second one at once; afterwards Ctrl-C's handler is back and SIGTERM raises KeyboardInterrupt; an
    ignored SIGTERM (as a parent may set it) stays ignored."""
    import signal
    import time

    from vl2_jax.errors import interrupts_held

    def deliver(sig):
        os.kill(os.getpid(), sig)
        for _ in range(100):
            time.sleep(0.001)

    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    finished = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_held():
                deliver(getattr(signal, sig))
                finished.append(True)
        assert finished == [True]
        assert signal.getsignal(signal.SIGINT) == before_int
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            with interrupts_held():
                deliver(getattr(signal, sig))
                deliver(getattr(signal, sig))  # (a second one: at once)
                finished.append(False)
        assert finished == [True] and signal.getsignal(signal.SIGINT) == before_int
        with interrupts_held():  # (nothing came: nothing raised)
            pass
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with interrupts_held():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before_term)


def test_the_command_line_shows_warnings_as_lines(tmp_path, capsys):
    """A checkpoint's unknown config key is one `warning: ...` line on stderr, not Python's file:line
    UserWarning with its source line; the answer still comes."""
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir("mha"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mystery_knob": 3}))
    assert main(["--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1", "--compile-cache", ""]) == 0
    err = capsys.readouterr().err
    assert any(line.startswith("warning: config.json: unknown key(s) mystery_knob; ignored") for line in err.splitlines())
    assert "UserWarning" not in err and "warnings.warn" not in err and "config.py" not in err


def test_a_warning_while_stderr_is_gone_does_not_end_the_command():
    """As Python's own display, the `warning: ...` line is dropped where stderr cannot be written."""
    import warnings

    from vl2_jax.errors import guarded

    def gone(line: str) -> None:
        raise BrokenPipeError

    def body() -> int:
        warnings.warn("a note", stacklevel=1)
        return 0

    assert guarded(body, gone) == 0


def test_sigterm_after_the_kernels_import_is_no_stack_dump():
    """JAX's Mosaic example module imports JAX's test utilities, which install absl's failure signal
    handler; the kernels module puts SIGTERM's handler back, so a stop prints no '*** SIGTERM received'
    stack dump."""
    import signal

    code = "import vl2_jax.kernels, time; print('ready', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=Path(__file__).parent.parent)
    assert p.stdout.readline() == "ready\n"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM and "SIGTERM received" not in err, err


@pytest.mark.parametrize("command, argv", [
    ("generate.__main__:_parser", ["--model", "", "--prompt", "hi"]),
    ("convert.__main__:_parser", ["src", " "]),
    ("vl2_jax.serve:parser", ["--model", ""]),
    ("vl2_jax.finetune:parser", ["--model", "", "--data", "d.jsonl", "--out", "o"]),
    ("vl2_jax.finetune:parser", ["--model", "m", "--data", "d.jsonl", "--out", ""]),
    ("vl2_jax.finetune:parser", ["--model", "m", "--data", "d.jsonl", "--out", "o", "--export-hf", ""]),
    ("generate.__main__:_parser", ["--input", "in.jsonl", "--output", ""]),
    ("generate.__main__:_parser", ["--prompt", "hi", "--image", "a.png", "--draw-boxes", ""]),
    ("vl2_jax.bench:parser", ["--model", ""]),
])
def test_an_empty_model_or_folder_is_refused_by_the_parser(capsys, command, argv):
    """An empty --model, SRC, DST or output path (read as the current folder, or as the option left out) is
    one usage error."""
    import importlib

    module, name = command.split(":")
    with pytest.raises(SystemExit) as exit_:
        getattr(importlib.import_module(module), name)().parse_args(argv)
    assert exit_.value.code == 2 and "must not be empty or blank" in capsys.readouterr().err
