"""`vl2_jax.grounding`: parsing well-formed and malformed grounding answers, and drawing the boxes."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vl2_jax.errors import InputError
from vl2_jax.grounding import COLORS, Detection, draw_boxes, parse_boxes

SIZE = (999, 1998)  # x in pixels == grid, y in pixels == 2 * grid


def parse_quiet(text, size=SIZE):
    """parse_boxes with no warning allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return parse_boxes(text, size)


def parse_warned(text, match, size=SIZE):
    """parse_boxes, checking that one of its warnings matches the regex `match`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = parse_boxes(text, size)
    assert any(re.search(match, str(w.message)) for w in caught), [str(w.message) for w in caught]
    return found


def test_one_ref_one_box_scaled_to_the_original_image():
    (d,) = parse_quiet("<|ref|>the giraffe<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>")
    assert d == Detection("the giraffe", (580.0, 540.0, 999.0, 1800.0), (580.0, 270.0, 999.0, 900.0))
    (d,) = parse_quiet("<|ref|>x<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>", Image.new("RGB", (640, 480)))
    assert d.box == (0.0, 0.0, 640.0, 480.0)


def test_several_boxes_several_refs_and_surrounding_text():
    text = ("There are <|ref|>two cats<|/ref|><|det|>[[10, 20, 30, 40], [50,60,70,80]]<|/det|> and "
            "<|ref|>a dog<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>.")
    found = parse_quiet(text)
    assert [d.label for d in found] == ["two cats", "two cats", "a dog"]
    assert [d.grid for d in found] == [(10, 20, 30, 40), (50, 60, 70, 80), (1, 2, 3, 4)]


@pytest.mark.parametrize("det", ["[1, 2, 3, 4]", "[[1, 2, 3, 4]]", "[[[1,2,3,4]]]", " 1 2 3 4 ", "[[1.0,2.5e0,3,4]]"])
def test_nesting_and_spacing(det):
    (d,) = parse_quiet(f"<|ref|>a<|/ref|><|det|>{det}<|/det|>")
    assert d.grid[0] == 1 and d.grid[2:] == (3, 4)


def test_det_without_ref_is_an_object_and_ref_is_used_once():
    found = parse_quiet("<|det|>[[1,2,3,4]]<|/det|><|ref|>a<|/ref|><|det|>[[1,2,3,4]]<|/det|><|det|>[[5,6,7,8]]<|/det|>")
    assert [d.label for d in found] == ["object", "a", "object"]


def test_truncated_answer_keeps_complete_boxes():
    found = parse_warned("<|ref|>cats<|/ref|><|det|>[[10, 20, 30, 40], [50, 60, 7", "not closed|incomplete")
    assert [d.grid for d in found] == [(10, 20, 30, 40)]
    assert parse_warned("<|ref|>cats<|/ref|><|det|>[[10, 2", "incomplete") == []
    assert parse_quiet("<|ref|>cats<|/ref|>") == [] and parse_quiet("<|ref|>cat") == []


def test_out_of_range_numbers_are_clipped_and_empty_boxes_skipped():
    (d,) = parse_warned("<|det|>[[-20, 10, 1200, 500]]<|/det|>", "clipped")
    assert d.grid == (0, 10, 999, 500) and d.box == (0.0, 20.0, 999.0, 1000.0)
    assert parse_warned("<|det|>[[1000, 10, 1200, 500]]<|/det|>", "empty") == []


def test_reversed_corners_are_normalised():
    (d,) = parse_quiet("<|det|>[[300, 400, 100, 200]]<|/det|>")
    assert d.grid == (100, 200, 300, 400)


@pytest.mark.parametrize("junk", ["[[a, b, c, d]]", "[[1, 2, 3]]", "[[1,2,3,4,5]]", "[[nan, 1, 2, 3]]", "[[]]", "oops"])
def test_malformed_boxes_are_skipped_with_a_warning(junk):
    text = f"<|ref|>a<|/ref|><|det|>{junk}<|/det|><|ref|>b<|/ref|><|det|>[[1,2,3,4]]<|/det|>"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = parse_boxes(text, SIZE)
    assert [(d.label, d.grid) for d in found] == [("b", (1, 2, 3, 4))]
    assert junk == "oops" or any("grounding" in str(w.message) for w in caught)


def test_plain_text_has_no_boxes():
    assert parse_quiet("A cat on a sofa.") == []


@pytest.mark.parametrize("as_path", [str, Path])
def test_image_as_a_file_path_reads_only_its_size(tmp_path, as_path):
    """A path works as in draw_boxes; only the header is read, so a file cut after it still gives its size."""
    text = "<|ref|>x<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>"
    whole, cut = tmp_path / "photo.png", tmp_path / "cut.png"
    Image.effect_noise((640, 480), 64).convert("RGB").save(whole)
    cut.write_bytes(whole.read_bytes()[:100])
    for path in (whole, cut):
        assert parse_quiet(text, as_path(path)) == parse_quiet(text, (640, 480))
    (d,) = parse_quiet(text, np.array([640, 480]))
    assert d.box == (0.0, 0.0, 640.0, 480.0)


@pytest.mark.parametrize("image,message", [
    ("missing.jpg", r"^image file .*missing\.jpg does not exist; check the path\.$"),
    ("", r"^.* is a folder, not an image file; pass the image the answer is about\.$"),
    ("notes.txt", r"^.*notes\.txt is not an image file that PIL can read; pass the image the answer is about\.$"),
    (3, r"^parse_boxes needs the image as a PIL image, a file path, a uint8 array or \(width, height\), not int 3\.$"),
    (None, r"^parse_boxes needs the image as a PIL image, a file path, a uint8 array or \(width, height\), not NoneType None\.$"),
    ((640, 480, 3), r"not tuple \(640, 480, 3\)\.$"),
    ((0, 480), r"^parse_boxes needs an image size of two positive numbers \(width, height\), not \(0, 480\)\.$"),
    (("640", "480"), r"two positive numbers \(width, height\), not \('640', '480'\)\.$"),
    ((float("nan"), 480), r"two positive numbers"),
    (Image.new("RGB", (0, 0)), r"two positive numbers \(width, height\), not \(0, 0\)\.$"),
], ids=["missing", "folder", "not-an-image", "int", "none", "triple", "zero-width", "strings", "nan", "empty-pil"])
def test_a_bad_image_argument_is_one_clear_input_error(tmp_path, image, message):
    """Never a bare ValueError from unpacking: the error names what was passed, in one sentence."""
    (tmp_path / "notes.txt").write_text("not a picture")
    if isinstance(image, str):
        image = tmp_path / image if image else tmp_path
    with pytest.raises(InputError, match=message) as e:
        parse_boxes("<|det|>[[1, 2, 3, 4]]<|/det|>", image)
    assert "\n" not in str(e.value)


def test_draw_boxes_outlines_in_colour_and_leaves_the_inside():
    image = Image.new("RGB", (400, 300), (128, 128, 128))
    found = parse_quiet("<|ref|>cat<|/ref|><|det|>[[249, 333, 749, 999]]<|/det|>"
                        "<|ref|>dog<|/ref|><|det|>[[0, 0, 100, 100]]<|/det|>", image)
    out = draw_boxes(image, found)
    assert out is not image and out.size == image.size
    assert image.getpixel((200, 200)) == (128, 128, 128)  # the input is untouched
    x1, y1, x2, y2 = (round(v) for v in found[0].box)  # (100, 100, 300, 300): bottom at the image edge
    assert out.getpixel((x1, (y1 + y2) // 2)) == COLORS[0]
    assert out.getpixel((x2 - 1, (y1 + y2) // 2)) == COLORS[0]
    assert out.getpixel(((x1 + x2) // 2, 299)) == COLORS[0]  # clamped to the last row
    assert out.getpixel(((x1 + x2) // 2, (y1 + y2) // 2 + 20)) == (128, 128, 128)
    assert out.getpixel((20, 0)) == COLORS[1]  # second label, second colour


def test_a_list_for_the_text_is_named_with_the_row_to_pass():
    with pytest.raises(InputError, match=r"^parse_boxes reads the answer's text, a str, not list .*; a "
                                         r"GenerationResult's \.text holds a str per row: pass result\.text\[0\]\.$"):
        parse_boxes(["<|det|>[[1, 2, 3, 4]]<|/det|>"], SIZE)


def test_image_arrays_as_the_processor_takes_them():
    """An [H, W, 3] or [H, W] uint8 array is an image here too: its size for parse_boxes, its pixels for draw_boxes."""
    text = "<|det|>[[100, 100, 900, 900]]<|/det|>"
    pixels = np.full((48, 64, 3), 255, np.uint8)
    assert parse_quiet(text, pixels) == parse_quiet(text, pixels[..., 0]) == parse_quiet(text, (64, 48))
    drawn = draw_boxes(pixels, parse_quiet(text, pixels))
    assert drawn.size == (64, 48) and drawn.getpixel((6, 36)) == COLORS[0]
    for wrong, shape in ((pixels / 255, "float64 [48, 64, 3]"), (pixels.transpose(2, 0, 1), "uint8 [3, 48, 64]")):
        for call, args in ((parse_boxes, (text, wrong)), (draw_boxes, (wrong, []))):
            with pytest.raises(InputError, match=r"takes an image array as uint8 \[H, W\], \[H, W, 3\] or \[H, W, 4\], "
                                                 rf"not {re.escape(shape)}\.$"):
                call(*args)


def test_draw_boxes_on_a_missing_file_is_one_input_error(tmp_path):
    with pytest.raises(InputError, match=r"^image file .*gone\.png does not exist; check the path\.$"):
        draw_boxes(tmp_path / "gone.png", [])


@pytest.mark.parametrize("target", ["boxes.xyz", "missing/boxes.png"])
def test_draw_boxes_cannot_save_is_one_input_error(tmp_path, target):
    image = Image.new("RGB", (64, 48), "white")
    with pytest.raises(InputError, match=r"^cannot save the boxes to .*boxes\.\w+: "):
        draw_boxes(image, [], tmp_path / target)


def test_draw_boxes_saves(tmp_path):
    path = tmp_path / "boxes.png"
    image = Image.new("RGB", (64, 48), "white")
    draw_boxes(image, parse_quiet("<|det|>[[100, 100, 900, 900]]<|/det|>", image), path)
    with Image.open(path) as saved:
        assert saved.size == (64, 48) and saved.getpixel((6, 36)) == COLORS[0]


def test_cli_draw_boxes(tmp_path, monkeypatch, capsys):
    """`python -m generate --draw-boxes`: boxes relative to the first image, count on stderr (model faked)."""
    from types import SimpleNamespace

    import vl2_jax.cli
    import vl2_jax.load
    from generate.__main__ import main

    first, second, out = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "out.png"
    Image.new("RGB", (200, 100), "white").save(first)
    Image.new("RGB", (50, 50), "black").save(second)

    class FakeModel:
        """Only what the CLI touches outside `_answer`; any other attribute (layout, mesh, ...) is None."""

        processor = SimpleNamespace(load_image=lambda p: Image.open(p).convert("RGB"))

        def __getattr__(self, name):
            return None

    model = FakeModel()
    monkeypatch.setattr(vl2_jax.load, "load_model", lambda *a, **k: model)
    answer = "<|ref|>a<|/ref|><|det|>[[0, 0, 499, 999], [500, 0, 999, 999]]<|/det|><|det|>[[1, 2, 3]]<|/det|>"
    monkeypatch.setattr(vl2_jax.cli, "_answer", lambda *a, **k: answer)
    argv = ["--model", "random:test", "--image", str(first), "--image", str(second), "--prompt", "p"]
    assert main(argv + ["--draw-boxes", str(out)]) == 0
    err = capsys.readouterr().err
    assert "drew 2 boxes" in err and "warning: grounding: skipped a malformed box" in err
    with Image.open(out) as drawn:
        assert drawn.size == (200, 100) and drawn.getpixel((199, 50)) == COLORS[0]
    assert main(argv + ["--draw-boxes", str(tmp_path / "missing" / "out.png")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # refused before the model loads: one line
    assert lines == [f"error: --draw-boxes {tmp_path / 'missing' / 'out.png'}: the folder {tmp_path / 'missing'} "
                     "does not exist; create it or pick another path."]


def test_cli_draw_boxes_needs_an_image(capsys):
    from generate.__main__ import main

    assert main(["--model", "random:test", "--prompt", "hi", "--draw-boxes", "out.png"]) == 1
    assert capsys.readouterr().err.strip() == "error: --draw-boxes needs an --image (the boxes are drawn on the first image)."
