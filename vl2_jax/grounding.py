"""Boxes in grounding answers: parse `<|ref|>LABEL<|/ref|><|det|>[[x1,y1,x2,y2], ...]<|/det|>`, draw them.

    detections = parse_boxes(answer, image)          # image: a PIL image, a file path, a uint8 array or (width, height)
    draw_boxes(image, detections, "boxes.png")       # a new PIL image with outlines and labels

The model writes boxes on a 0-999 grid relative to the ORIGINAL image; a box becomes pixels as
`x * W / 999`, `y * H / 999` (as the official demo). Parsing never raises on what the model wrote; it
skips what it cannot use with a `warnings.warn` and keeps the rest:

- several boxes per `<|det|>`, several refs, any nesting of lists (`[x1,y1,x2,y2]`, `[[...]]`, `[[[...]]]`),
  or four bare numbers without brackets;
- a `<|det|>` without a preceding `<|ref|>` is labelled "object";
- a `<|det|>` cut off by the end of the answer (or by the next tag) keeps its complete boxes and skips the
  incomplete last one;
- a list that is not exactly four finite numbers (junk, three numbers, `nan`) is skipped;
- numbers outside 0..999 are CLIPPED to the grid (so to the image), with a warning; a box that is empty
  after clipping (zero width or height) is skipped;
- a box with x2 < x1 or y2 < y1 is NORMALISED (the coordinates are swapped): the region is unambiguous.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vl2_jax.errors import InputError

GRID = 999
DEFAULT_LABEL = "object"
# Saturated colours that stay distinct from each other and from most photos; one per label, cycling.
COLORS = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (255, 225, 25), (0, 128, 128),
)

_TAGS = re.compile(
    r"<\|ref\|>(?P<ref>(?:(?!<\|).)*?)<\|/ref\|>"
    r"|<\|det\|>(?P<det>.*?)(?P<end><\|/det\|>|(?=<\|ref\|>|<\|det\|>)|\Z)",
    re.S,
)
_INNER_LIST = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True)
class Detection:
    """One box: `label` (the ref's text), `box` in pixels of the original image as floats (x1, y1, x2, y2)
    with x1 <= x2 and y1 <= y2, and `grid`, the same box on the model's 0-999 grid (after clipping)."""

    label: str
    box: tuple[float, float, float, float]
    grid: tuple[float, float, float, float]


def _image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image, of an image file (only its header is read), of a uint8 image
    array or of a (width, height) pair of positive numbers; an InputError (one sentence) for anything else."""
    if isinstance(image, (str, os.PathLike)):
        return _file_size(os.fspath(image))
    size = getattr(image, "size", None)  # a PIL image's is a tuple; a numpy array's is a count
    if hasattr(image, "__array__") and np.ndim(image) >= 2:  # (a 1-D array may be the pair)
        size = _pixels(image, "parse_boxes").shape[1::-1]
    size = size if isinstance(size, tuple) else image
    try:
        width, height = size
    except (TypeError, ValueError):
        raise InputError(
            f"parse_boxes needs the image as a PIL image, a file path, a uint8 array or (width, height), not {_describe(image)}."
        ) from None
    pair = (width, height)
    numeric = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
    if not numeric or int(width) < 1 or int(height) < 1:
        raise InputError(f"parse_boxes needs an image size of two positive numbers (width, height), not {pair!r}.")
    return int(width), int(height)


def _pixels(image, who: str) -> np.ndarray:
    """An image array as the processor takes it, uint8 [H, W] or [H, W, 3|4]; an InputError otherwise (a
    float array or a channels-first one would give wrong boxes without a word)."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(f"{who} takes an image array as uint8 [H, W], [H, W, 3] or [H, W, 4], not "
                         f"{array.dtype} {list(array.shape)}.")
    return array


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _file_size(path: str) -> tuple[int, int]:
    """(width, height) from an image file's header: PIL opens lazily and decodes no pixels here."""
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not an image file; pass the image the answer is about.")
    try:
        with Image.open(path) as opened:
            width, height = opened.size
    except FileNotFoundError:
        raise InputError(f"image file {path} does not exist; check the path.") from None
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image file that PIL can read; pass the image the answer is about.") from None
    except OSError as e:
        raise InputError(f"cannot read image file {path} ({e.strerror or e}); check the file and its permissions.") from None
    if width < 1 or height < 1:
        raise InputError(f"image file {path} is {width}x{height} pixels; a box needs an image with an area.")
    return width, height


def _grid_box(raw: str, notes: list[str]) -> tuple[float, float, float, float] | None:
    """'x1, y1, x2, y2' -> a clipped, ordered, non-empty box on the grid, or None (with a note why)."""
    parts = [p for p in re.split(r"[,\s]+", raw.strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        notes.append(f"skipped a malformed box [{raw.strip()}] (want four numbers x1, y1, x2, y2)")
        return None
    clipped = [min(max(v, 0.0), float(GRID)) for v in values]
    if clipped != values:
        notes.append(f"clipped box [{raw.strip()}] to the 0-{GRID} grid")
    x1, y1, x2, y2 = clipped
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    if x1 == x2 or y1 == y2:
        notes.append(f"skipped an empty box [{raw.strip()}]")
        return None
    return x1, y1, x2, y2


def _boxes_in(det: str, terminated: bool, notes: list[str]) -> list[tuple[float, float, float, float]]:
    """Every usable innermost list in the text of one `<|det|>` (or the whole text if it has no brackets)."""
    if "[" not in det and "]" not in det and re.search(r"\d", det):
        raws, rest = [det], ""
    else:
        raws, rest = [m.group(1) for m in _INNER_LIST.finditer(det)], _INNER_LIST.sub(" ", det)
    boxes = [b for raw in raws if (b := _grid_box(raw, notes)) is not None]
    if not terminated:
        notes.append("a <|det|> is not closed (truncated answer?)")
    if re.search(r"\d", rest):
        why = "an incomplete box" if not terminated else "numbers outside a [x1, y1, x2, y2] list"
        notes.append(f"skipped {why} in <|det|>{det.strip()}")
    return boxes


def parse_boxes(text: str, image) -> list[Detection]:
    """The boxes of a grounding answer, in pixels of `image`, in order.

    `image` is the picture the answer is about: a PIL image, an image file path (str or Path; only its
    size is read, no pixels are decoded), a uint8 array [H, W(, 3|4)] or (width, height). Each `<|det|>` takes the label of the
    `<|ref|>` just before it (since the previous `<|det|>`), else "object". Malformed boxes are skipped
    with a warning (see the module docstring); never raises on what the model wrote. Raises InputError (one
    sentence) for `text` that is not a str, an `image` that is none of the above, a missing file, or a file
    that is not an image.
    """
    if not isinstance(text, str):
        hint = "; a GenerationResult's .text holds a str per row: pass result.text[0]" if isinstance(text, list) else ""
        raise InputError(f"parse_boxes reads the answer's text, a str, not {_describe(text)}{hint}.")
    width, height = _image_size(image)
    found: list[Detection] = []
    notes: list[str] = []
    label = None
    for m in _TAGS.finditer(text):
        if m.group("ref") is not None:
            label = " ".join(m.group("ref").split()) or None
            continue
        for g in _boxes_in(m.group("det"), m.group("end").startswith("<"), notes):
            x1, y1, x2, y2 = g
            pixels = (x1 * width / GRID, y1 * height / GRID, x2 * width / GRID, y2 * height / GRID)
            found.append(Detection(label or DEFAULT_LABEL, pixels, g))
        label = None
    for note in notes:
        warnings.warn("grounding: " + note, stacklevel=2)
    return found


def draw_boxes(image, boxes, out_path: str | Path | None = None):
    """A new RGB image: `image` (a PIL image, a path or a uint8 array, as the processor takes them) with
    each box outlined and labelled.

    `boxes` are `Detection`s (or anything with `.label` and a pixel `.box`). Boxes of the same label share
    a colour, labels get `COLORS` in order of first appearance. The label is written with PIL's default
    font on a filled tag above the box (inside it when there is no room above). Saved to `out_path` if given.
    """
    from PIL import Image, ImageDraw, ImageFont

    if isinstance(image, (str, os.PathLike)):
        _file_size(os.fspath(image))  # (a missing file, a folder or no image: one InputError)
        with Image.open(image) as opened:
            canvas = opened.convert("RGB")
    elif hasattr(image, "__array__"):
        canvas = Image.fromarray(_pixels(image, "draw_boxes")).convert("RGB")
    else:
        canvas = image.convert("RGB")  # a copy, also when already RGB
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width, height = canvas.size
    line = max(2, round(min(width, height) / 200))
    colours: dict[str, tuple[int, int, int]] = {}
    for det in boxes:
        colour = colours.setdefault(det.label, COLORS[len(colours) % len(COLORS)])
        x1, y1, x2, y2 = (int(round(v)) for v in det.box)
        x1, x2 = (min(max(v, 0), width - 1) for v in (x1, x2))
        y1, y2 = (min(max(v, 0), height - 1) for v in (y1, y2))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        left, top, right, bottom = draw.textbbox((0, 0), det.label, font=font)
        tw, th = right - left + 4, bottom - top + 4
        ty = y1 - th if y1 - th >= 0 else y1 + line
        tx = max(0, min(x1, width - 1 - tw))  # keep the tag inside the image
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=colour)
        ink = (0, 0, 0) if sum(colour) > 450 else (255, 255, 255)  # readable on light and dark tags
        draw.text((tx + 2 - left, ty + 2 - top), det.label, fill=ink, font=font)
    if out_path is not None:
        try:
            canvas.save(out_path)
        except (OSError, ValueError) as e:  # (a missing folder, an extension PIL does not write)
            raise InputError(f"cannot save the boxes to {out_path}: {e}") from None
    return canvas
