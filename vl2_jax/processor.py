"""Turn a chat conversation plus images into DeepSeek-VL2 model inputs (numpy, PIL, the `tokenizers` library).

This re-implements the official ``DeepseekVLV2Processor`` (``deepseek`` chat template) without torch: the
token ids, image tiles and masks it returns are the ones the official code returns, in inference mode
(``Processor.__call__``) and in training mode with labels (``Processor.supervised``: ``inference_mode=False``,
``mask_prompt``).

Prompt layout, per turn of the conversation (``S`` is the tile size, e.g. 384):

* ``bos`` once, at the very start;
* a user turn is tokenized on its own as ``"<|User|>: " + content.strip() + "\\n\\n<|Assistant|>:"``
  (``"<|User|>:<|Assistant|>:"`` when the stripped content is empty), each ``<image>`` in it being
  replaced by that image's run of image tokens;
* an assistant turn is ``content.strip()`` followed by ``eos``;
* the final ``eos`` is dropped, so the model continues the last assistant turn. A conversation that
  ends with a user turn is treated as if an empty assistant turn followed it. (Training mode keeps it:
  the model learns to stop.)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import re
import threading
from pathlib import Path

import cachetools
import numpy as np
from PIL import Image, ImageOps

from vl2_jax.errors import ConfigError, InputError, check_text, one_line, read_json_object
from vl2_jax.images import describe, is_url, looks_like_base64, without_bomb_warning
from vl2_jax.tokenizer import Tokenizer

USER_ROLE = "<|User|>"
ASSISTANT_ROLE = "<|Assistant|>"
SYSTEM_ROLE = "system"
_ROLES = {USER_ROLE: USER_ROLE, "user": USER_ROLE, ASSISTANT_ROLE: ASSISTANT_ROLE,
          "assistant": ASSISTANT_ROLE, SYSTEM_ROLE: SYSTEM_ROLE}
_SEP = "\n\n"  # the "deepseek" template's separator after a user message
IMAGE_TOKEN = "<image>"
IGNORE_ID = -100  # the label of a token the loss skips (the official processor's `ignore_id`)
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
# Special tokens the official processor makes sure of, in the order it adds any that are missing.
EXTRA_SPECIAL_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", USER_ROLE, ASSISTANT_ROLE)


PixelNorm = tuple[tuple[float, ...], tuple[float, ...]] | None  # (mean, std) per channel, or None


def _normalize_host(pixels_NSS3, norm: PixelNorm) -> np.ndarray:
    """The reference's arithmetic in numpy: uint8 [..., S, S, 3] -> float32 [..., S, S, 3], x / 255,
    then (x - mean) / std when ``norm`` = (mean, std)."""
    x = pixels_NSS3.astype(np.float32) / np.float32(255)
    if norm is not None:
        x = (x - np.asarray(norm[0], np.float32)) / np.asarray(norm[1], np.float32)
    return x


@functools.lru_cache(maxsize=8)
def _table(norm: PixelNorm) -> np.ndarray:
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 3))  # [level, channel]
    table = np.ascontiguousarray(_normalize_host(levels, norm).T)
    table.setflags(write=False)  # shared by every caller (cached)
    return table


def canonical_pixel_norm(norm) -> PixelNorm:
    """(mean, std) as tuples of floats (hashable, comparable), or None."""
    return None if norm is None else tuple(tuple(float(v) for v in part) for part in norm)


def pixel_table(norm) -> np.ndarray:
    """[3, 256] float32: every uint8 level of each channel normalised as the reference normalises it
    (`_normalize_host`). ``norm``: (mean, std), each 3 floats, or None."""
    return _table(canonical_pixel_norm(norm))


def normalize_pixels(pixels_NSS3: np.ndarray, norm) -> np.ndarray:
    """uint8 pixels [..., S, S, 3] -> the reference's tiles [..., 3, S, S] float32, looked up in
    ``pixel_table(norm)`` (the device's twin is ``modules.vision.normalize_pixels``)."""
    flat = pixels_NSS3.astype(np.int32) + 256 * np.arange(3, dtype=np.int32)  # level + 256 * channel
    return np.moveaxis(pixel_table(norm).reshape(-1)[flat], -1, -3)


def _tiles_used(images_spatial_crop_N2) -> int:
    """Tiles of one conversation: a global view plus width x height local tiles per image."""
    return sum(1 + int(w) * int(h) for w, h in images_spatial_crop_N2 if w and h)


def _reference_images(pixels_TSS3, crop_N2, norm) -> np.ndarray:
    """[tiles, S, S, 3] uint8 -> [tiles, 3, S, S] float32, normalised; tiles past the used ones zero."""
    used = _tiles_used(crop_N2)
    out = np.zeros((pixels_TSS3.shape[0], 3) + pixels_TSS3.shape[1:3], np.float32)
    out[:used] = np.moveaxis(_normalize_host(pixels_TSS3[:used], norm), -1, -3)
    return out


NEWLINE_SOURCE, SEPARATOR_SOURCE, TILE_SOURCES = 0, 1, 2  # rows of the image-token table (image_token_sources)


def image_token_sources(
    images_spatial_crop: np.ndarray, images_seq_mask: np.ndarray, side: int
) -> tuple[np.ndarray, np.ndarray]:
    """Where each sequence position takes its image embedding from: the image-token layout.

    Per image, the reference's ``global_view_pos="head"`` 2D layout: the global tile's side x side grid
    with ``image_newline`` after each row, ``view_separator``, then the local tiles stitched into one
    (nh*side) x (nw*side) grid, again with ``image_newline`` after each row.

    Args:
      images_spatial_crop: [B, n_images, 2] (width tiles, height tiles); rows of zeros end a row's images.
      images_seq_mask: [B, T] True at image-token positions.
      side: tokens per tile side after the projector.

    Returns:
      tiles: [I, 2] (batch row, tile within the row) of the tiles actually used, in feature order.
      src: [B, T] int32 indices into ``[image_newline, view_separator, I * side * side tile tokens]``
        (0 where ``images_seq_mask`` is False). The newline and separator come first, so that tiles
        appended past the I used (a padded tile bucket) change no index.
    """
    b = images_spatial_crop.shape[0]
    hw = side * side
    tiles: list[tuple[int, int]] = []  # (row, tile within row)
    streams: list[list[int]] = []
    for row in range(b):
        stream: list[int] = []
        first_tile = 0
        for nw, nh in images_spatial_crop[row]:
            nw, nh = int(nw), int(nh)
            if nw == 0 or nh == 0:
                break
            base = len(tiles)
            tiles.extend((row, first_tile + i) for i in range(1 + nw * nh))
            first_tile += 1 + nw * nh
            grid = np.arange(hw).reshape(side, side)
            for r in range(side):  # global view
                stream.extend((base * hw + grid[r]).tolist())
                stream.append(-1)
            stream.append(-2)
            for th in range(nh):  # local views, stitched
                for r in range(side):
                    for tw in range(nw):
                        stream.extend(((base + 1 + th * nw + tw) * hw + grid[r]).tolist())
                    stream.append(-1)
        streams.append(stream)
    src = np.zeros(images_seq_mask.shape, np.int32)
    for row, stream in enumerate(streams):
        positions = np.flatnonzero(images_seq_mask[row])
        if len(positions) != len(stream):
            raise InputError(
                f"batch row {row} has {len(positions)} image-token positions but its images_spatial_crop "
                f"gives {len(stream)} image tokens; the batch was not made by this model's processor."
            )
        s = np.asarray(stream, np.int64)
        src[row, positions] = np.where(s == -1, NEWLINE_SOURCE, np.where(s == -2, SEPARATOR_SOURCE, s + TILE_SOURCES))
    return np.asarray(tiles, np.int32).reshape(-1, 2), src


def left_pad(a_BT, length: int, value) -> np.ndarray:
    """[B, T] host array -> [B, length], ``value`` in the new columns on the left."""
    a_BT = np.asarray(a_BT)
    return np.pad(a_BT, ((0, 0), (length - a_BT.shape[1], 0)), constant_values=value)


def left_pad_positions(attention_mask_BT: np.ndarray) -> np.ndarray:
    """Positions of left-padded rows: ``cumsum(mask) - 1``, 0 on padding (as the reference's generate)."""
    return np.maximum(np.cumsum(attention_mask_BT, axis=-1) - 1, 0).astype(np.int32)


def _read_only(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)  # the model reads `pixels`: an edit here would be silently ignored
    return a


@dataclasses.dataclass(frozen=True)
class ProcessorOutput:
    """One processed conversation (numpy arrays; ``T`` tokens, ``S`` tile size).

    input_ids: [T] int32. pixels: [tiles, S, S, 3] uint8, the tiles as cropped (per image a global view
    then its local tiles, rows outer; one all-zero tile when there is no image). images_seq_mask: [T]
    bool, True at image tokens. images_spatial_crop: [n_images, 2] int32 (width tiles, height tiles);
    [[0, 0]] when there is no image. prompt: the formatted conversation as text (the reference's
    ``sft_format``). pixel_norm: (mean, std) the tiles are normalised with, or None (x / 255 alone).
    ``images`` is the reference's tensor, made on first access (read-only): [tiles, 3, S, S] float32,
    normalised (all zero when there is no image). The model reads ``pixels`` and normalises on the device.
    """

    input_ids: np.ndarray
    pixels: np.ndarray
    images_seq_mask: np.ndarray
    images_spatial_crop: np.ndarray
    prompt: str
    pixel_norm: PixelNorm

    @functools.cached_property
    def images(self) -> np.ndarray:
        return _read_only(_reference_images(self.pixels, self.images_spatial_crop, self.pixel_norm))


@dataclasses.dataclass(frozen=True)
class Batch:
    """Several outputs padded together (numpy arrays; ``B`` rows, left padded with ``pad_id``).

    input_ids: [B, T] int32. attention_mask: [B, T] bool, False at padding. pixels:
    [B, max_tiles, S, S, 3] uint8, zero tiles appended. images_seq_mask: [B, T] bool, False at padding.
    images_spatial_crop: [B, max_images, 2] int32, zero rows appended. pixel_norm: as in
    ProcessorOutput. image_tiles [I, 2] and image_src [B, T]: the image-token layout
    (``image_token_sources``): which tiles the image tokens use, and where each position's embedding
    comes from. rows: the ProcessorOutputs batched (what the engine runs, unpadded). ``images``: the
    reference's [B, max_tiles, 3, S, S] float32, zero tiles appended (made on first access, read-only).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixels: np.ndarray
    images_seq_mask: np.ndarray
    images_spatial_crop: np.ndarray
    pixel_norm: PixelNorm
    image_tiles: np.ndarray
    image_src: np.ndarray
    rows: tuple = ()  # the ProcessorOutputs batched, one per row

    def used_tiles(self) -> np.ndarray | None:
        """The pixels of the tiles the image tokens use, in feature order: [I, S, S, 3] uint8, or None
        without images. A view of ``pixels`` when every tile slot is used in order, else a copy."""
        if len(self.image_tiles) == 0:
            return None
        b, n = self.pixels.shape[:2]
        every_slot = np.stack(np.divmod(np.arange(b * n), n), axis=1)
        if np.array_equal(self.image_tiles, every_slot):
            return self.pixels.reshape(b * n, *self.pixels.shape[2:])
        return self.pixels[self.image_tiles[:, 0], self.image_tiles[:, 1]]

    @functools.cached_property
    def images(self) -> np.ndarray:
        return _read_only(np.stack([_reference_images(p, c, self.pixel_norm)
                                    for p, c in zip(self.pixels, self.images_spatial_crop, strict=True)]))


def select_best_resolution(image_size, candidate_resolutions):
    """Pick the candidate canvas (width, height) for an image of ``image_size`` = (width, height).

    The winner keeps the most pixels after an aspect-preserving fit (sizes truncated to int, counted at
    most at the original pixel count); a tie goes to the candidate that wastes the least canvas, and
    a full tie to the earliest candidate.
    """
    orig_w, orig_h = image_size
    best, best_effective, best_waste = None, 0, float("inf")
    for width, height in candidate_resolutions:
        scale = min(width / orig_w, height / orig_h)
        effective = min(int(orig_w * scale) * int(orig_h * scale), orig_w * orig_h)
        waste = width * height - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (width, height), effective, waste
    return best


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    """Decodes (a lazily opened file is read here) and converts with `convert("RGB")`, as the reference."""
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(f"{label} has zero area ({width}x{height} pixels); pass an image at least 1 pixel wide and high.")
    try:
        image.load()  # a truncated or corrupt file often fails only here, not at Image.open
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
        raise InputError(f"{label} could not be decoded ({one_line(exc)}); the file is truncated or corrupt, "
                         f"so re-save or re-download it.") from None
    try:
        return image.convert("RGB")
    except MemoryError:
        raise
    except ValueError as exc:
        raise InputError(f"{label} has mode {image.mode!r}, which PIL cannot convert to RGB ({one_line(exc)}); "
                         f"save it as an RGB image first.") from None
    except Exception as exc:  # noqa: BLE001 - e.g. a decoder error surfacing at conversion
        raise InputError(f"{label} could not be decoded ({one_line(exc)}); the file is truncated or corrupt, "
                         f"so re-save or re-download it.") from None


def _array_image(array: np.ndarray, where: str) -> Image.Image:
    """A uint8 [H, W] (grey), [H, W, 3] (RGB) or [H, W, 4] (RGBA) array as a PIL image; InputError otherwise."""
    shape = list(array.shape)
    fits = array.ndim == 2 or (array.ndim == 3 and shape[-1] in (3, 4))
    if array.dtype != np.uint8 or not fits:
        channels_first = array.ndim == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4)
        hint = (" (channels first? move them last)" if channels_first
                else " (floats in [0, 1]? scale them to 0-255 and cast to uint8)" if array.dtype.kind == "f" else "")
        raise InputError(f"an image array must be uint8 [H, W], [H, W, 3] or [H, W, 4], got {array.dtype} "
                         f"{shape}{where}{hint}.")
    return Image.fromarray(np.ascontiguousarray(array))


def _image_list(images) -> list:
    """A conversation's images as a list (None: none; an array of paths or images, or an [N, H, W, C]
    stack: its items). A single image (a PIL image, a path, an [H, W(, C)] array of numbers) is refused
    rather than taken apart: a path's characters or an image's rows are no list of images."""
    if images is None:
        return []
    array = np.asarray(images) if hasattr(images, "__array__") else None
    one_image = array is not None and array.dtype.kind in "uifb" and array.ndim in (2, 3)
    if isinstance(images, (Image.Image, str, bytes, os.PathLike)) or one_image:
        raise InputError(f"images must be a list, one image per {IMAGE_TOKEN} placeholder; got a single "
                         f"{type(images).__name__}: pass [image] for one image.")
    try:
        return list(images)
    except TypeError:
        raise InputError(f"images must be a list of images, not a {type(images).__name__}.") from None


def open_image(image, name: str | None = None) -> Image.Image:
    """A PIL image, an image file path or a uint8 array ([H, W], [H, W, 3] RGB or [H, W, 4] RGBA: numpy,
    or anything numpy reads, as a JAX array) -> a fully decoded RGB PIL image, exactly ``img.convert("RGB")``.

    Every mode PIL can convert (L, LA, P, RGBA, CMYK, I;16, ...) is converted as the reference's callers do;
    ``name`` (e.g. "image 2 of 3") labels an in-memory image in messages, a file is named by its path.

    Raises:
      InputError: one sentence naming the image, for a file that is missing, a folder, empty, unreadable,
        not an image, truncated or corrupt; an image over PIL's decompression-bomb limit
        (``PIL.Image.MAX_IMAGE_PIXELS``, checked before decoding; set it to None to lift the limit); a
        zero-area image; or a mode that PIL cannot convert to RGB.
    """
    if isinstance(image, Image.Image):
        return _to_rgb(image, name or "the PIL image")
    where = f" ({name})" if name else ""
    if hasattr(image, "__array__") and not isinstance(image, (str, bytes)):
        return _to_rgb(_array_image(np.asarray(image), where), name or "the image array")
    if not isinstance(image, (str, os.PathLike)):
        raise InputError(f"an image must be a PIL image, a file path or a uint8 array, got "
                         f"{type(image).__name__}{where}.")
    path = os.fspath(image)
    if not os.path.exists(path):
        if isinstance(path, str) and is_url(path):
            raise InputError(f"image {describe(path)} is a URL, not a file path; the processor takes paths and "
                             f"PIL images: pass vl2_jax.images.load_image(ref) (the PIL image it reads) instead.")
        if isinstance(path, str) and path[:5].lower() == "file:":
            raise InputError(f"image {describe(path)} is a file: URL; the processor takes file paths: pass the path "
                             f"itself, or the PIL image vl2_jax.images.load_image(ref) reads.")
        if isinstance(path, str) and looks_like_base64(path):  # (or a long path of such characters)
            raise InputError(f"image file {describe(path) if len(path) > 1024 else path} does not exist; check "
                             f"the path (base64 is read by vl2_jax.images.load_image(ref), whose PIL image the "
                             f"processor takes).")
        raise InputError(f"image file {path} does not exist; check the path.")
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not an image file; pass the path of an image file.")
    if os.path.getsize(path) == 0:
        raise InputError(f"image file {path} is empty (0 bytes); pass a complete image file.")
    try:
        with without_bomb_warning():  # PIL warns between 1x and 2x its limit; we refuse from 1x below
            opened = Image.open(path)
    except Image.DecompressionBombError as exc:  # over 2x the limit: PIL refuses at open
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(pixels.group(1)):,}" if pixels else "too many"
        raise InputError(f"image {path} has {count} pixels, over PIL's "
                         f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS); "
                         f"downscale it first.") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{path} is not an image file that PIL can read; convert it to PNG or JPEG.") from None
    except OSError as exc:
        raise InputError(f"cannot read image file {path} ({exc.strerror or one_line(exc)}); "
                         f"check the file and its permissions.") from None
    except Exception as exc:  # noqa: BLE001 - a malformed header can raise SyntaxError, ValueError, ...
        raise InputError(f"image file {path} is corrupt ({one_line(exc)}); re-save or re-download it.") from None
    with opened:
        limit, (width, height) = Image.MAX_IMAGE_PIXELS, opened.size
        if limit and width * height > limit:
            raise InputError(f"image {path} is {width}x{height} = {width * height:,} pixels, over PIL's "
                             f"decompression-bomb limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS); downscale it first.")
        return _to_rgb(opened, f"image {path}")


class BytesLRU:
    """Values by key, the least recently used dropped first beyond `budget` bytes (`sizeof(value)`;
    cachetools' LRUCache); a value larger than the whole budget is not kept. Counts lookups and hits.
    Safe to use from several threads."""

    def __init__(self, budget: int, sizeof):
        self.entries = cachetools.LRUCache(budget, getsizeof=sizeof)
        self._lock = threading.Lock()
        self.lookups = self.hits = 0

    @property
    def bytes(self) -> int:
        """Bytes held."""
        return self.entries.currsize

    def get(self, key):
        """The value kept for `key` (now the most recently used), or None."""
        with self._lock:
            self.lookups += 1
            found = self.entries.get(key)
            self.hits += found is not None
        return found

    def put(self, key, value) -> None:
        with self._lock:
            if key not in self.entries and self.entries.getsizeof(value) <= self.entries.maxsize:
                self.entries[key] = value

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()


class TileCache(BytesLRU):
    """The tiles of images processed lately, by a digest of their pixels and the cropping rule, the least
    recently used dropped beyond `budget` bytes: a server's repeated images, and a chat's earlier images
    sent again with each turn, skip the resampling (~10 ms for a 1000 px image on one CPU core, against
    ~2 ms for the digest). Counts images looked up and found. Safe to use from several threads."""

    def __init__(self, budget: int):
        super().__init__(budget, lambda entry: sum(t.nbytes for t in entry[0]))

    def tiles(self, image: Image.Image, cropping: bool, make) -> tuple[tuple[np.ndarray, ...], tuple[int, int]]:
        """`make(image, cropping)` (tiles, (nw, nh)), from the cache when these pixels were tiled so before
        (the tiles are then shared: a tuple of read-only arrays)."""
        key = (hashlib.blake2b(image.tobytes(), digest_size=16).digest(), image.size, image.mode, cropping)
        found = self.get(key)
        if found is not None:
            return found
        tiles, grid = make(image, cropping)
        entry = (tuple(_read_only(t) for t in tiles), grid)
        self.put(key, entry)
        return entry


class Processor:
    """DeepSeek-VL2 processor: conversation + images -> :class:`ProcessorOutput` (inference mode), or
    with training labels (`supervised`). `tile_cache` (None, or a `TileCache` a server or a chat sets):
    where images tiled before are found again."""

    def __init__(self, tokenizer, candidate_resolutions, patch_size, downsample_ratio,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), normalize=True,
                 image_token=IMAGE_TOKEN):
        self.tokenizer = tokenizer
        self.candidate_resolutions = tuple((int(w), int(h)) for w, h in candidate_resolutions)
        if not self.candidate_resolutions:
            raise ConfigError("candidate_resolutions is empty")
        self.image_size = self.candidate_resolutions[0][0]
        self.patch_size = int(patch_size)
        self.downsample_ratio = int(downsample_ratio)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.normalize = bool(normalize)
        self.image_token = image_token
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.image_token_id = tokenizer.token_to_id(image_token)
        # Padding colour: the mean colour, truncated to int as the reference does (127 for 0.5).
        self._fill = tuple(int(m * 255) for m in self.image_mean)
        side = math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)
        self._tokens_per_side = side
        self.tile_cache: TileCache | None = None

    @classmethod
    def from_pretrained(cls, path) -> Processor:
        """Build from a folder with tokenizer.json, tokenizer_config.json and processor_config.json."""
        path = Path(path)
        config_file = path / "processor_config.json"
        if not config_file.is_file():
            raise ConfigError(f"{path} has no processor_config.json; copy it from the original Hugging Face "
                              f"checkpoint into it.")
        config = read_json_object(config_file)
        missing = [k for k in ("candidate_resolutions", "patch_size", "downsample_ratio") if k not in config]
        if missing:
            raise ConfigError(f"{config_file} lacks {', '.join(missing)}")
        if config.get("sft_format", "deepseek") != "deepseek":
            raise ConfigError(f"only the 'deepseek' chat template is supported, not {config['sft_format']!r}")
        image_token = config.get("image_token", IMAGE_TOKEN)
        tokenizer = Tokenizer.from_folder(path, config.get("pad_token", PAD_TOKEN), image_token, EXTRA_SPECIAL_TOKENS)
        return cls(tokenizer, config["candidate_resolutions"], config["patch_size"],
                   config["downsample_ratio"], config.get("image_mean", (0.5, 0.5, 0.5)),
                   config.get("image_std", (0.5, 0.5, 0.5)), config.get("normalize", True), image_token)

    # ----------------------------------------------------------------------------------------- text
    def _encode(self, text):
        check_text(text, "the conversation's text")
        return self.tokenizer.encode(text)

    def decode(self, ids, skip_special_tokens=False) -> str:
        """Token ids (any int sequence or array) -> text."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def check_conversation(self, conversation, num_images: int) -> None:
        """Raises InputError where `conversation` with `num_images` images is not one the processor takes
        (its messages' shape, roles and contents, images only in user turns and one per placeholder, a
        system message only first); the images themselves are not read."""
        turns = self._normalize_conversation(conversation)
        self._check_image_count(turns, num_images)

    def _check_image_count(self, turns, num_images: int) -> None:
        n_placeholders = sum(c.count(self.image_token) for r, c in turns if r == USER_ROLE)
        if n_placeholders != num_images:
            raise InputError(f"the conversation has {n_placeholders} {self.image_token} placeholder(s) "
                             f"but {num_images} image(s) were given; pass one image per placeholder.")

    def _normalize_conversation(self, conversation):
        """Validate; return [(template role, stripped content)], ending with an assistant turn."""
        if isinstance(conversation, (str, bytes)) or not conversation:
            raise InputError("the conversation must be a non-empty list of {'role', 'content'} dicts.")
        turns = []
        for i, message in enumerate(conversation):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise InputError(f"message {i} must be a dict with 'role' and 'content', got {message!r}.")
            role = _ROLES.get(message["role"]) if isinstance(message["role"], str) else None
            content = message["content"]
            if role is None:
                raise InputError(f"message {i} has unknown role {message['role']!r}; use "
                                 f"'<|User|>'/'user', '<|Assistant|>'/'assistant' or 'system'.")
            if not isinstance(content, str):
                raise InputError(f"message {i} content must be a str, got {type(content).__name__}.")
            if role != USER_ROLE and self.image_token in content:
                raise InputError(f"message {i} ({message['role']}) contains {self.image_token}; "
                                 f"images may only appear in user turns.")
            if role == SYSTEM_ROLE and i != 0:
                raise InputError(f"a system message may only be the first message, found at {i}.")
            turns.append((role, content.strip()))
        if turns[-1][0] != ASSISTANT_ROLE:
            # The empty assistant turn the reference expects at the end (its eos is dropped below).
            turns.append((ASSISTANT_ROLE, ""))
        return turns

    def _format_prompt(self, turns):
        """The reference's ``sft_format`` text: separators alternate with message position."""
        seps = (_SEP, self.tokenizer.eos_token)
        text = ""
        for i, (role, content) in enumerate(turns):
            text += f"{role}: {content}{seps[i % 2]}" if content else f"{role}:"
        return text.strip()

    # --------------------------------------------------------------------------------------- images
    @property
    def pixel_norm(self) -> PixelNorm:
        """(mean, std) the tiles are normalised with, or None: see `pixel_table`."""
        return (self.image_mean, self.image_std) if self.normalize else None

    def _tile(self, image, cropping):
        """One image -> ([1 + nw*nh] tiles, each [S, S, 3] uint8, (nw, nh)); from `tile_cache`, if any."""
        if self.tile_cache is not None:
            return self.tile_cache.tiles(image, cropping, self._resample)
        return self._resample(image, cropping)

    def _resample(self, image, cropping):
        """`_tile`'s work: the global view padded to a square, the local views padded to the best
        resolution and cut."""
        size = self.image_size
        if cropping:
            best_w, best_h = select_best_resolution(image.size, self.candidate_resolutions)
        else:
            best_w, best_h = size, size
        tiles = [np.asarray(ImageOps.pad(image, (size, size), color=self._fill), np.uint8)]
        local = ImageOps.pad(image, (best_w, best_h), color=self._fill)
        for top in range(0, best_h, size):
            for left in range(0, best_w, size):
                tiles.append(np.asarray(local.crop((left, top, left + size, top + size)), np.uint8))
        return tiles, (best_w // size, best_h // size)

    def num_image_tokens(self, num_width_tiles, num_height_tiles):
        """Image tokens for one image: global grid rows + newlines, separator, stitched local grid."""
        h = w = self._tokens_per_side
        return h * (w + 1) + 1 + (num_height_tiles * h) * (num_width_tiles * w + 1)

    def load_image(self, image, name: str | None = None):
        """A PIL image, a file path or a uint8 array -> an RGB PIL image; see :func:`open_image` (``name``
        labels errors)."""
        return open_image(image, name)

    # ----------------------------------------------------------------------------------------- main
    def __call__(self, conversation, images=()) -> ProcessorOutput:
        """Process one conversation (list of {'role', 'content'}) with its images (PIL images, paths or
        uint8 arrays).

        Images are taken in order by the ``<image>`` placeholders of the user turns; there must be
        exactly one per placeholder.
        """
        turns = self._normalize_conversation(conversation)
        parts = self._parts(turns, images)
        # Inference mode: drop the closing eos of the last (assistant) turn.
        parts.ids, parts.seq_mask, parts.labels = parts.ids[:-1], parts.seq_mask[:-1], parts.labels[:-1]
        return parts.output(self._format_prompt(turns))

    def supervised(self, conversation, images=(), mask_prompt: bool = True) -> tuple[ProcessorOutput, np.ndarray]:
        """A conversation that ends with an assistant answer -> (its :class:`ProcessorOutput`, labels [T]
        int32), as the official processor gives them with ``inference_mode=False``: every answer ends with
        ``eos`` (kept), and the labels are the token ids, with ``IGNORE_ID`` at image tokens and, when
        ``mask_prompt``, at user and system turns. ``bos`` is its own label (a shifted loss never reads
        the first label)."""
        turns = self._normalize_conversation(conversation)
        if _ROLES.get(conversation[-1].get("role")) != ASSISTANT_ROLE:
            raise InputError(f"a training conversation must end with an assistant answer; message "
                             f"{len(conversation) - 1} is a {conversation[-1]['role']!r} turn.")
        parts = self._parts(turns, images, mask_prompt)
        return parts.output(self._format_prompt(turns)), np.asarray(parts.labels, np.int32)

    def _parts(self, turns, images, mask_prompt: bool = True) -> _Parts:
        """Every turn's ids, image tokens, tiles and labels; each assistant turn ends with eos."""
        images = _image_list(images)
        self._check_image_count(turns, len(images))
        images = [self.load_image(im, f"image {i + 1} of {len(images)}") for i, im in enumerate(images)]
        cropping = len(images) <= 2  # the reference tiles only when the whole conversation has <= 2

        parts = _Parts(self, images, cropping)
        parts.add_ids([self.bos_id], target=True)
        for role, content in turns:
            if role == USER_ROLE:
                # Each user turn is formatted on its own, as if followed by an empty assistant turn.
                parts.add_text(f"{USER_ROLE}: {content}{_SEP}{ASSISTANT_ROLE}:" if content else
                               f"{USER_ROLE}:{ASSISTANT_ROLE}:", target=not mask_prompt)
            elif role == ASSISTANT_ROLE:
                parts.add_ids(self._encode(content) + [self.eos_id], target=True)
            else:  # system (first message only): text, no separator
                parts.add_ids(self._encode(content), target=not mask_prompt)
        return parts

    def raw(self, prompt: str, images=()) -> ProcessorOutput:
        """A prompt already in the chat template's format (an OpenAI completions ``prompt``, SGLang's
        ``/generate`` ``text``: the role markers are the caller's) with its images (PIL images, paths or
        uint8 arrays), one per ``<image>`` placeholder, in order -> :class:`ProcessorOutput`. ``bos`` comes first unless the
        prompt starts with it; nothing else is added."""
        if not isinstance(prompt, str) or not prompt:
            raise InputError("the prompt must be a non-empty str.")
        images = _image_list(images)
        n_placeholders = prompt.count(self.image_token)
        if n_placeholders != len(images):
            raise InputError(f"the prompt has {n_placeholders} {self.image_token} placeholder(s) "
                             f"but {len(images)} image(s) were given; pass one image per placeholder.")
        images = [self.load_image(im, f"image {i + 1} of {len(images)}") for i, im in enumerate(images)]
        parts = _Parts(self, images, len(images) <= 2)
        if not prompt.startswith(self.tokenizer.bos_token):
            parts.add_ids([self.bos_id])
        parts.add_text(prompt)
        return parts.output(prompt)

    def batchify(self, outputs) -> Batch:
        """Stack outputs into one :class:`Batch`, padding tokens on the left (see Batch for shapes)."""
        outputs = list(outputs)
        if not outputs:
            raise InputError("batchify needs at least one ProcessorOutput.")
        for n, o in enumerate(outputs):
            if not isinstance(o, ProcessorOutput):
                raise InputError(f"batchify takes the processor's outputs; item {n} is a {type(o).__name__}.")
            if np.asarray(o.pixels).dtype != np.uint8:
                raise InputError(f"batchify takes the processor's uint8 tiles; item {n}'s pixels are "
                                 f"{np.asarray(o.pixels).dtype} (`images` is derived from them).")
        batch, length = len(outputs), max(len(o.input_ids) for o in outputs)
        max_tiles = max(o.pixels.shape[0] for o in outputs)
        max_images = max(o.images_spatial_crop.shape[0] for o in outputs)
        input_ids = np.full((batch, length), self.pad_id, dtype=np.int32)
        attention_mask = np.zeros((batch, length), dtype=bool)
        seq_mask = np.zeros((batch, length), dtype=bool)
        pixels = np.zeros((batch, max_tiles) + outputs[0].pixels.shape[1:], dtype=np.uint8)
        crops = np.zeros((batch, max_images, 2), dtype=np.int32)
        for b, o in enumerate(outputs):
            start = length - len(o.input_ids)
            input_ids[b, start:] = o.input_ids
            attention_mask[b, start:] = True
            seq_mask[b, start:] = o.images_seq_mask
            pixels[b, :o.pixels.shape[0]] = o.pixels
            crops[b, :o.images_spatial_crop.shape[0]] = o.images_spatial_crop
        norms = {o.pixel_norm for o in outputs}
        if len(norms) > 1:
            raise InputError("batchify got outputs of processors that normalise images differently.")
        tiles, src = image_token_sources(crops, seq_mask, self._tokens_per_side)
        return Batch(input_ids, attention_mask, pixels, seq_mask, crops, norms.pop(), tiles, src, tuple(outputs))


class _Parts:
    """A prompt's token ids, image-token mask, tiles and crops as they are built, text and images in order."""

    def __init__(self, processor: Processor, images, cropping: bool):
        self.processor, self.images, self.cropping = processor, iter(images), cropping
        self.ids, self.seq_mask, self.tiles, self.crops, self.labels = [], [], [], [], []

    def add_ids(self, ids, target: bool = False) -> None:
        """Text tokens; their labels are themselves when `target`, else IGNORE_ID."""
        self.ids += ids
        self.seq_mask += [False] * len(ids)
        self.labels += ids if target else [IGNORE_ID] * len(ids)

    def add_text(self, text: str, target: bool = False) -> None:
        """Text whose `<image>` placeholders each take the next image's run of image tokens (labels
        IGNORE_ID); the text's own labels as in `add_ids`."""
        p = self.processor
        pieces = text.split(p.image_token)
        for k, piece in enumerate(pieces):
            self.add_ids(p._encode(piece), target)
            if k + 1 < len(pieces):
                image_tiles, (nw, nh) = p._tile(next(self.images), self.cropping)
                self.tiles += image_tiles
                self.crops.append((nw, nh))
                n = p.num_image_tokens(nw, nh)
                self.ids += [p.image_token_id] * n
                self.seq_mask += [True] * n
                self.labels += [IGNORE_ID] * n

    def output(self, prompt: str) -> ProcessorOutput:
        size = self.processor.image_size
        return ProcessorOutput(
            input_ids=np.asarray(self.ids, dtype=np.int32),
            pixels=np.stack(self.tiles) if self.tiles else np.zeros((1, size, size, 3), np.uint8),
            images_seq_mask=np.asarray(self.seq_mask, dtype=bool),
            images_spatial_crop=np.asarray(self.crops if self.crops else [(0, 0)], dtype=np.int32).reshape(-1, 2),
            prompt=prompt, pixel_norm=self.processor.pixel_norm)
