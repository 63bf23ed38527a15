"""The processor against the official DeepseekVLV2Processor outputs stored in the fixtures."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import VARIANTS, all_cases, ckpt_dir, load_case, open_images
from PIL import Image

from vl2_jax.errors import InputError, VL2Error
from vl2_jax.processor import Batch, Processor, ProcessorOutput, select_best_resolution

REPO = Path(__file__).resolve().parents[1]
EXACT_KEYS = ("input_ids", "attention_mask", "images_seq_mask", "images_spatial_crop")


@functools.cache
def processor(variant="mha") -> Processor:
    return Processor.from_pretrained(ckpt_dir(variant))


def run_case(variant, name, conversation=None, images=None) -> ProcessorOutput:
    case = load_case(variant, name)
    return processor(variant)(case["conversation"] if conversation is None else conversation,
                              open_images(case) if images is None else images)


def assert_same_output(a: ProcessorOutput, b: ProcessorOutput):
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.images_seq_mask, b.images_seq_mask)
    np.testing.assert_array_equal(a.images_spatial_crop, b.images_spatial_crop)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.prompt == b.prompt


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("variant,name", all_cases())
def test_matches_reference(variant, name):
    case = load_case(variant, name)
    out = run_case(variant, name)
    batch = processor(variant).batchify([out])
    for key in EXACT_KEYS:
        want = case["arrays"][key]
        got = getattr(batch, key)
        assert got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
    want_images = case["arrays"]["images"]
    assert batch.images.shape == want_images.shape and batch.images.dtype == np.float32
    np.testing.assert_array_equal(batch.images, want_images)
    assert out.prompt == case["prompt"]


def test_output_types():
    p = processor()
    out = run_case("mha", "two_images")
    assert out.input_ids.dtype == np.int32 and out.input_ids.ndim == 1
    assert out.images_seq_mask.dtype == np.bool_ and out.images_seq_mask.shape == out.input_ids.shape
    assert out.images_spatial_crop.dtype == np.int32 and out.images_spatial_crop.shape == (2, 2)
    assert out.images.shape[1:] == (3, p.image_size, p.image_size)
    # Every image token is flagged, nothing else is.
    np.testing.assert_array_equal(out.images_seq_mask, out.input_ids == p.image_token_id)
    assert out.input_ids[0] == p.bos_id and p.eos_id not in out.input_ids


def test_pixels_are_the_uint8_tiles_that_normalise_to_images():
    p = processor()
    out = run_case("mha", "two_images")
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == (out.images.shape[0], 70, 70, 3)
    assert out.pixel_norm == p.pixel_norm == ((0.5,) * 3, (0.5,) * 3)
    reference = (out.pixels.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(out.images, reference.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("norm", [((0.5,) * 3, (0.5,) * 3),
                                  ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                                  None])
def test_pixel_lookup_gives_the_reference_arithmetic_in_numpy_and_on_the_device(norm):
    """Every level of every channel: the lookup equals x / 255, then (x - mean) / std in float32, also
    jitted as the model runs it (where XLA would have turned the divisions into multiplications by
    reciprocals)."""
    import jax

    from vl2_jax.modules.vision import normalize_pixels as normalize_on_device
    from vl2_jax.processor import normalize_pixels

    levels = np.stack([np.roll(np.arange(256), 85 * c).reshape(16, 16) for c in range(3)], -1)[None].astype(np.uint8)
    want = levels.astype(np.float32) / np.float32(255)
    if norm is not None:
        want = (want - np.asarray(norm[0], np.float32)) / np.asarray(norm[1], np.float32)
    want = np.moveaxis(want, -1, -3)
    np.testing.assert_array_equal(normalize_pixels(levels, norm), want)
    on_device = jax.jit(lambda x: normalize_on_device(x, norm))(levels)
    np.testing.assert_array_equal(np.asarray(on_device), want)


def test_batchify_refuses_outputs_normalised_differently():
    out = run_case("mha", "one_photo")
    other = dataclasses.replace(out, pixel_norm=None)
    with pytest.raises(InputError, match="normalise"):
        processor().batchify([out, other])


def test_attributes():
    p = processor()
    assert p.image_size == 70 and p.patch_size == 14 and p.downsample_ratio == 2
    assert p.candidate_resolutions[0] == (70, 70) and (630, 70) in p.candidate_resolutions
    assert (p.bos_id, p.eos_id, p.pad_id, p.image_token_id) == (0, 1, 2, 3)


def test_image_token_count_formula():
    p = processor()
    # h = w = ceil((70 // 14) / 2) = 3: 3*4 global + 1 separator + (3*nh) * (3*nw + 1) local.
    assert p.num_image_tokens(1, 1) == 12 + 1 + 3 * 4
    assert p.num_image_tokens(2, 3) == 12 + 1 + 9 * 7
    for name in ("one_photo", "one_wide", "two_images"):
        out = run_case("mha", name)
        expected = sum(p.num_image_tokens(nw, nh) for nw, nh in out.images_spatial_crop)
        assert out.images_seq_mask.sum() == expected
        tiles = sum(1 + nw * nh for nw, nh in out.images_spatial_crop)
        assert out.images.shape[0] == tiles


def test_no_image_gives_one_zero_tile():
    out = run_case("mha", "text_only")
    assert out.images.shape == (1, 3, 70, 70) and not out.images.any()
    assert out.pixels.shape == (1, 70, 70, 3) and not out.pixels.any()
    np.testing.assert_array_equal(out.images_spatial_crop, [[0, 0]])
    assert not out.images_seq_mask.any()


# ------------------------------------------------------------------------------ conversation
@pytest.mark.parametrize("name", ["text_only", "one_photo", "history"])
def test_trailing_empty_assistant_is_optional(name):
    case = load_case("mha", name)
    conversation = case["conversation"]
    assert conversation[-1]["content"] == ""
    assert_same_output(run_case("mha", name, conversation[:-1]), run_case("mha", name))


def test_plain_role_names():
    case = load_case("mha", "history")
    rename = {"<|User|>": "user", "<|Assistant|>": "assistant"}
    conversation = [{"role": rename[m["role"]], "content": m["content"]} for m in case["conversation"]]
    out = run_case("mha", "history", conversation)
    assert_same_output(out, run_case("mha", "history"))
    assert out.prompt == case["prompt"]


def test_empty_user_turn_follows_template():
    # With an empty message the template writes "role:" with no space and no separator.
    p = processor()
    out = p([{"role": "user", "content": "  "}])
    assert out.prompt == "<|User|>:<|Assistant|>:"
    want = [p.bos_id] + p.tokenizer.encode("<|User|>:<|Assistant|>:")
    assert out.input_ids.tolist() == want


def test_ending_with_assistant_text_continues_it():
    # Inference mode drops the last eos, so a non-empty final assistant turn is left open.
    p = processor()
    out = p([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}])
    head = p([{"role": "user", "content": "Hi"}]).input_ids.tolist()
    tail = p.tokenizer.encode("Hello there")
    assert out.input_ids.tolist() == head + tail


def test_system_message_is_plain_text_first():
    p = processor()
    out = p([{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}])
    user = p([{"role": "user", "content": "Hi"}]).input_ids.tolist()
    system = p.tokenizer.encode("Be brief.")
    assert out.input_ids.tolist() == user[:1] + system + user[1:]
    with pytest.raises(InputError):
        p([{"role": "user", "content": "Hi"}, {"role": "system", "content": "late"}])


def test_images_as_paths():
    case = load_case("mha", "two_images")
    by_path = processor()(case["conversation"], [str(p) for p in case["image_paths"]])
    assert_same_output(by_path, run_case("mha", "two_images"))


def test_images_as_uint8_arrays_are_their_pil_images():
    import jax.numpy as jnp

    case = load_case("mha", "two_images")
    pil = [im.convert("RGB") for im in open_images(case)]
    arrays = [np.asarray(pil[0]), jnp.asarray(np.asarray(pil[1].convert("RGBA")))]  # (numpy, and JAX RGBA)
    assert_same_output(processor()(case["conversation"], arrays), processor()(case["conversation"], pil))
    grey = np.full((40, 90), 200, np.uint8)
    one = [{"role": "user", "content": "<image>"}]
    assert_same_output(processor()(one, [grey]), processor()(one, [Image.fromarray(grey).convert("RGB")]))
    for array, words in [(np.zeros((3, 64, 64), np.uint8), "got uint8 [3, 64, 64] (image 1 of 1) (channels first?"),
                         (np.zeros((64, 64, 3), np.float32), "got float32 [64, 64, 3] (image 1 of 1) (floats in [0, 1]?"),
                         (np.zeros((64,), np.uint8), "[H, W, 4], got uint8 [64] (image 1 of 1).")]:
        with pytest.raises(InputError, match=r"^an image array must be uint8") as e:
            processor()(one, [array])
        assert words in str(e.value)


def test_non_rgb_image_is_converted():
    p = processor()
    gray = Image.new("L", (90, 40), 200)
    out = p([{"role": "user", "content": "<image>"}], [gray])
    assert_same_output(out, p([{"role": "user", "content": "<image>"}], [gray.convert("RGB")]))


# -------------------------------------------------------------------------------------- errors
def test_count_mismatch_raises():
    p = processor()
    image = Image.new("RGB", (70, 70))
    with pytest.raises(InputError, match=r"(?s)\b2\b.*\b1\b"):
        p([{"role": "user", "content": "<image><image>"}], [image])
    with pytest.raises(InputError, match=r"(?s)\b0\b.*\b1\b"):
        p([{"role": "user", "content": "no placeholder"}], [image])
    with pytest.raises(InputError, match=r"(?s)\b1\b.*\b0\b"):
        p([{"role": "user", "content": "<image>"}])


def test_urls_given_as_paths_say_what_to_pass(tmp_path):
    """A file: URL of a file that exists was "does not exist; check the path"."""
    p = processor()
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    for ref, says in [("http://example.com/x.png", "is a URL, not a file path"), (image.as_uri(), "is a file: URL")]:
        with pytest.raises(InputError, match=says) as e:
            p([{"role": "user", "content": "<image>"}], [ref])
        assert "load_image(ref)" in str(e.value)


def test_text_that_is_not_unicode_is_an_input_error():
    """A lone surrogate (a byte Python kept from a non-UTF-8 source) reached the tokenizer: TypeError."""
    p = processor()
    for text in ["caf\udce9", "\ud800 alone"]:
        with pytest.raises(InputError, match=r"^the conversation's text is not UTF-8 text \(it holds \\u"):
            p([{"role": "user", "content": text}])
        with pytest.raises(InputError, match="not UTF-8"):
            p.raw(text)


@pytest.mark.parametrize("single", ["photo.png", "pil", "array"])
def test_a_single_image_not_in_a_list_is_refused(single):
    """One image passed bare is not taken apart (a path's characters, an array's rows) into many."""
    p = processor()
    image = {"photo.png": "photo.png", "pil": Image.new("RGB", (70, 70)), "array": np.zeros((10, 10, 3), np.uint8)}[single]
    conversation = [{"role": "user", "content": "<image>"}]
    with pytest.raises(InputError, match=r"^images must be a list, one image per <image> placeholder; got a single "
                                         r"\w+: pass \[image\] for one image\.$"):
        p(conversation, image)
    with pytest.raises(InputError, match="images must be a list"):
        p.raw("<image>", image)
    stack = np.zeros((1, 10, 10, 3), np.uint8)  # (a stack of images is a list of them, as are arrays of items)
    assert_same_output(p(conversation, stack), p(conversation, [stack[0]]))
    items = np.empty(1, object)
    items[0] = Image.new("RGB", (70, 70))
    assert_same_output(p(conversation, items), p(conversation, [items[0]]))


def test_batchify_refuses_what_is_no_processor_output():
    with pytest.raises(InputError, match=r"^batchify takes the processor's outputs; item 1 is a int\.$"):
        processor().batchify([run_case("mha", "one_photo"), 1])


def test_bad_messages_raise():
    p = processor()
    with pytest.raises(InputError, match="role"):
        p([{"role": "robot", "content": "hi"}])
    with pytest.raises(InputError, match="<image>"):
        p([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "<image>"}],
          [Image.new("RGB", (70, 70))])
    with pytest.raises(InputError):
        p([])
    with pytest.raises(InputError):
        p([{"role": "user"}])
    with pytest.raises(InputError):
        p([{"role": "user", "content": "<image>"}], [np.zeros((4, 4, 3))])
    assert issubclass(InputError, VL2Error)


# ------------------------------------------------------------------------------------- batching
def test_batchify_left_pads():
    p = processor()
    a, b = run_case("mha", "text_only"), run_case("mha", "two_images")
    batch = p.batchify([a, b])
    assert isinstance(batch, Batch)
    T = max(len(a.input_ids), len(b.input_ids))
    assert batch.input_ids.shape == (2, T) and batch.input_ids.dtype == np.int32
    assert batch.images.shape == (2, 8, 3, 70, 70) and batch.images_spatial_crop.shape == (2, 2, 2)
    for row, out in enumerate((a, b)):
        n, pad = len(out.input_ids), T - len(out.input_ids)
        assert (batch.input_ids[row, :pad] == p.pad_id).all()
        assert not batch.attention_mask[row, :pad].any() and batch.attention_mask[row, pad:].all()
        assert not batch.images_seq_mask[row, :pad].any()
        np.testing.assert_array_equal(batch.input_ids[row, pad:], out.input_ids)
        np.testing.assert_array_equal(batch.images_seq_mask[row, pad:], out.images_seq_mask)
        k = out.images.shape[0]
        np.testing.assert_array_equal(batch.images[row, :k], out.images)
        assert not batch.images[row, k:].any()
        m = out.images_spatial_crop.shape[0]
        np.testing.assert_array_equal(batch.images_spatial_crop[row, :m], out.images_spatial_crop)
        assert not batch.images_spatial_crop[row, m:].any()
        assert n + pad == T
    with pytest.raises(InputError):
        p.batchify([])


# ---------------------------------------------------------------------------------- tiling
CANDIDATES = tuple((70 * m, 70 * n) for m in range(1, 10) for n in range(1, 10) if m * n <= 9)


@pytest.mark.parametrize("size,best", [
    # 4000x50 into 630x70: scale 0.1575 -> 630 x int(7.875)=7 = 4410 kept pixels, the most possible.
    ((4000, 50), (630, 70)),
    ((50, 4000), (70, 630)),
    # 1x1: every canvas keeps the single pixel; least waste wins -> the smallest canvas.
    ((1, 1), (70, 70)),
    # 100x100: 140x140, 140x210, 210x210 ... all keep 10000 (capped at the original); least waste.
    ((100, 100), (140, 140)),
    # 232x347: 210x210 keeps int(140.40)*int(347*(210/347)) = 140*209 (float rounding gives
    # 209.99999999999997), tying 140x210's 140*int(209.40)=29260; the tie goes to less waste.
    ((232, 347), (140, 210)),
])
def test_select_best_resolution(size, best):
    assert select_best_resolution(size, CANDIDATES) == best


def test_select_best_resolution_full_tie_keeps_first():
    assert select_best_resolution((10, 10), [(20, 30), (30, 20)]) == (20, 30)


def test_three_images_disable_cropping():
    out = run_case("mha", "three_images_no_crop")
    np.testing.assert_array_equal(out.images_spatial_crop, [[1, 1]] * 3)
    assert out.images.shape[0] == 6


def test_a_tile_cache_gives_the_same_outputs_and_resamples_each_image_once(monkeypatch):
    """Against the fixtures' cases (one image, two, three: cropping off), processed twice through a
    `TileCache`: the outputs equal the cacheless processor's, and each image is resampled once."""
    from vl2_jax.processor import TileCache

    cached = Processor.from_pretrained(ckpt_dir("mha"))
    cached.tile_cache = TileCache(64 << 20)
    resampled = []
    resample = Processor._resample
    monkeypatch.setattr(Processor, "_resample", lambda self, image, cropping: (
        resampled.append(cropping) if self is cached else None) or resample(self, image, cropping))
    names = [name for variant, name in all_cases() if variant == "mha" and load_case("mha", name)["image_paths"]]
    assert "three_images_no_crop" in names and len(names) >= 3
    for round_ in range(2):
        for name in names:
            case = load_case("mha", name)
            assert_same_output(cached(case["conversation"], open_images(case)), run_case("mha", name))
        if round_ == 0:
            first = len(resampled)
            assert 0 < first <= sum(len(load_case("mha", n)["image_paths"]) for n in names)
    assert len(resampled) == first  # the second round found every image's tiles
    assert cached.tile_cache.hits == cached.tile_cache.lookups - first

    # a budget too small for an image's tiles keeps nothing (and still answers)
    small = Processor.from_pretrained(ckpt_dir("mha"))
    small.tile_cache = TileCache(1000)
    case = load_case("mha", names[0])
    assert_same_output(small(case["conversation"], open_images(case)), run_case("mha", names[0]))
    assert_same_output(small(case["conversation"], open_images(case)), run_case("mha", names[0]))
    assert small.tile_cache.hits == 0


# ---------------------------------------------------------------------------------- tokenizer
SPECIAL = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image>",
           "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>")


def test_special_tokens_are_single_special_ids():
    tok = processor().tokenizer
    for i, text in enumerate(SPECIAL):
        assert tok.encode("a" + text + "b")[1:-1] == [i], text
    assert processor().decode(list(range(len(SPECIAL))), skip_special_tokens=True) == ""


def test_missing_special_tokens_are_added(tmp_path):
    # A tokenizer.json whose added-token list only has bos/eos: the processor must still treat the
    # grounding, chat and pad tokens as unsplittable special tokens with their vocab ids. (The image token,
    # in the vocabulary, stays a plain entry as the official processor leaves it; its id is still what the
    # image tokens use, so the processor's output is the official one.)
    src = ckpt_dir("mha")
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = data["added_tokens"][:2]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    for name in ("tokenizer_config.json", "processor_config.json"):
        (tmp_path / name).write_text((src / name).read_text(encoding="utf-8"), encoding="utf-8")
    p = Processor.from_pretrained(tmp_path)
    assert (p.pad_id, p.image_token_id) == (2, 3)
    for i, text in enumerate(SPECIAL):
        if text != "<image>":
            assert p.tokenizer.encode("a" + text + "b")[1:-1] == [i], text
    assert p.decode([i for i, t in enumerate(SPECIAL) if t != "<image>"], skip_special_tokens=True) == ""
    assert_same_output(run_case("mha", "one_photo"),
                       p(load_case("mha", "one_photo")["conversation"],
                         open_images(load_case("mha", "one_photo"))))


def test_decode_keeps_grounding_tokens():
    p = processor()
    text = "<|ref|>the giraffe<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>"
    ids = p.tokenizer.encode(text)
    assert p.decode(np.asarray(ids)) == text


def test_loading_is_quiet_and_does_not_import_transformers():
    # transformers' "PyTorch was not found" advice and tokenizer-class notes would only confuse users, and
    # importing transformers (and torch, where installed) took seconds of every load.
    code = (f"import sys; from vl2_jax.processor import Processor; Processor.from_pretrained({str(ckpt_dir('mha'))!r}); "
            f"print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    output = res.stdout + res.stderr
    for noise in ("PyTorch was not found", "None of PyTorch", "tokenizer_class", "TokenizersBackend"):
        assert noise not in output
    assert res.stdout.strip() == "[]"


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_share_processor_settings(variant):
    p = processor(variant)
    assert p.image_size == 70 and p.image_token_id == 3
