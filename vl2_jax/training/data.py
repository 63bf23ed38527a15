"""Supervised conversations -> token ids, labels and padded batches (host, numpy).

A record is one conversation whose last turn is the assistant's answer, with one image per `<image>`
placeholder of its user turns. Roles are `user`/`assistant`/`system` or the official `<|User|>`/
`<|Assistant|>`. On disk, records are ms-swift's JSONL, one object a line:

    {"messages": [{"role": "user", "content": "<image>\\nWhat is it?"},
                  {"role": "assistant", "content": "A cat."}],
     "images": ["cat.png"]}

Images are paths (relative ones to the JSONL file's folder), file://, http(s) or data: URLs, or
`{"path": ...}` objects (in memory, PIL images too). Ids and labels are the official processor's in training mode
(`Processor.supervised`): the loss covers the assistants' tokens and their closing eos only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from vl2_jax.errors import InputError, read_lines
from vl2_jax.images import ImageLimits, load_image, local_path
from vl2_jax.processor import IGNORE_ID, Batch, Processor, ProcessorOutput, left_pad


@dataclasses.dataclass(frozen=True)
class Record:
    """A conversation as read: messages ({'role', 'content'} dicts) and its images (references or PIL
    images), in order."""

    messages: tuple[dict, ...]
    images: tuple = ()


@dataclasses.dataclass(frozen=True)
class Example:
    """One processed conversation: the processor's output and labels [T] int32 (IGNORE_ID where the
    loss skips a token; ``labels[t]`` is the target of the logits at ``t - 1``)."""

    output: ProcessorOutput
    labels: np.ndarray

    @property
    def targets(self) -> int:
        """Tokens the loss covers (labels past the first that are not IGNORE_ID)."""
        return int(np.sum(self.labels[1:] != IGNORE_ID))


@dataclasses.dataclass(frozen=True)
class LabelledBatch:
    """Examples padded together on the left (`Processor.batchify`), with labels [B, T] int32 padded
    with IGNORE_ID."""

    batch: Batch
    labels: np.ndarray


def _image_ref(ref, folder: Path | None, where: str):
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, dict) and isinstance(ref.get("path"), str):
        ref = ref["path"]
    if not isinstance(ref, str) or not ref.strip():
        raise InputError(f"{where}: an image must be a path or URL string, {{'path': ...}} or a PIL image, "
                         f"got {ref!r}.")
    path = local_path(ref)
    if path is not None and folder is not None and not Path(path).is_absolute():
        return str(folder / path)
    return ref


def record(obj, where: str = "the record", folder: Path | None = None) -> Record:
    """A JSON object {"messages": [...], "images": [...]} -> a Record (`folder`: where relative image
    paths start). Raises InputError naming `where`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise InputError(f"{where} must be an object with a non-empty list 'messages'.")
    images = obj.get("images") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list):
        raise InputError(f"{where}: 'images' must be a list, got {type(images).__name__}.")
    return Record(tuple(obj["messages"]), tuple(_image_ref(r, folder, where) for r in images))


def read_jsonl(path: str | Path) -> list[Record]:
    """ms-swift's JSONL (one record a line; blank lines skipped) -> Records. Relative image paths are
    relative to the file's folder."""
    path = Path(path)
    lines = read_lines(path)
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{n} is not valid JSON ({exc}).") from None
        out.append(record(obj, f"{path}:{n}", path.parent))
    if not out:
        raise InputError(f"{path} holds no records.")
    return out


def open_image(processor: Processor, ref):
    """An image reference (or a PIL image) -> an RGB PIL image (local files and PIL images as
    `Processor.load_image`; URLs as `images.load_image` with the CLI's limits)."""
    if isinstance(ref, Image.Image):
        return processor.load_image(ref)
    path = local_path(ref)
    if path is not None:
        return processor.load_image(path)
    return load_image(ref, ImageLimits.cli())


def example(processor: Processor, rec: Record | dict, mask_prompt: bool = True) -> Example:
    """A Record (or its JSON object) -> an Example, as the official processor in training mode."""
    rec = rec if isinstance(rec, Record) else record(rec)
    images = [open_image(processor, ref) for ref in rec.images]
    output, labels = processor.supervised(list(rec.messages), images, mask_prompt)
    return Example(output, labels)


def collate(processor: Processor, examples, length: int | None = None) -> LabelledBatch:
    """Examples -> one LabelledBatch, left padded to the longest (or to `length`, for fixed shapes)."""
    examples = list(examples)
    if not examples:
        raise InputError("collate needs at least one example.")
    batch = processor.batchify([e.output for e in examples])
    longest = batch.input_ids.shape[1]
    length = longest if length is None else length
    if length < longest:
        raise InputError(f"an example has {longest} tokens, more than the batch length {length}.")
    if length > longest:
        batch = dataclasses.replace(
            batch, input_ids=left_pad(batch.input_ids, length, processor.pad_id),
            attention_mask=left_pad(batch.attention_mask, length, False),
            images_seq_mask=left_pad(batch.images_seq_mask, length, False),
            image_src=left_pad(batch.image_src, length, 0))
    labels = np.stack([left_pad(e.labels[None], length, IGNORE_ID)[0] for e in examples]).astype(np.int32)
    return LabelledBatch(batch, labels)
