"""A JSONL dataset -> examples -> the fixed-shape, stacked inputs of each optimizer step (host, numpy).

Bad input, as `read_examples` treats it:
- a line that is not JSON, or not a record (`data.record`), or an image that is missing or unreadable,
  is refused: an InputError naming the file and line (and the image);
- a conversation whose last turn is not an assistant's answer, or whose tokens (image tokens
  included) are more than `max_seq_len`, is skipped and counted (`Skipped`), since a large scraped
  dataset usually holds a few; a file with nothing left is refused.

Shapes: every microbatch holds `batch` rows, left padded to a length from `length_buckets` (the
smallest that fits the step's longest example), with its used image tiles padded with zero tiles to a
power of two (0 without images). A step stacks its `grad_accum` microbatches on a leading axis
[A, ...] at one shape, so a run compiles one program per (length, tiles) pair it meets, a handful.
The order is a fresh permutation of the examples per epoch, drawn from (seed, epoch): step s reads
the same examples whether or not the run was resumed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np

from vl2_jax.errors import InputError, read_lines, some
from vl2_jax.images import local_path
from vl2_jax.processor import IGNORE_ID, Processor
from vl2_jax.training import data
from vl2_jax.training.loss import LossInputs

ASSISTANT_ROLES = ("assistant", "<|Assistant|>")
MIN_BUCKET = 64


@dataclasses.dataclass
class Skipped:
    """Conversations left out, by their line numbers: without an assistant answer at the end (an empty
    answer is none), and longer than max_seq_len."""

    no_answer: list[int] = dataclasses.field(default_factory=list)
    too_long: list[int] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        said = lambda lines: f" (line{'s' if len(lines) > 1 else ''} {some([str(n) for n in lines])})" if lines else ""  # noqa: E731
        return (f"{len(self.no_answer)} without an assistant answer at the end{said(self.no_answer)}, "
                f"{len(self.too_long)} longer than --max-seq-len{said(self.too_long)}")

    @property
    def total(self) -> int:
        return len(self.no_answer) + len(self.too_long)


def _ends_with_answer(messages) -> bool:
    last = messages[-1] if messages else None
    return isinstance(last, dict) and last.get("role") in ASSISTANT_ROLES and bool(str(last.get("content", "")).strip())


def read_examples(processor: Processor, path: str | Path, max_seq_len: int) -> tuple[list[data.Example], Skipped]:
    """A JSONL file (see `data`) -> (its usable examples in file order, what was skipped). Raises
    InputError naming the file and line (see the module docstring)."""
    path = Path(path)
    lines = read_lines(path)
    examples, skipped = [], Skipped()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{where} is not valid JSON ({exc}).") from None
        rec = data.record(obj, where, path.parent)
        try:  # (a line that is skipped is checked all the same: a typo in its last role is no reason to skip it)
            processor.check_conversation(rec.messages, len(rec.images))
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        for ref in rec.images:
            file = local_path(ref) if isinstance(ref, str) else None
            if file is not None and Path(file).is_dir():
                raise InputError(f"{where}: image {file} is a folder, not an image file.")
            if file is not None and not Path(file).is_file():
                raise InputError(f"{where}: image {file} does not exist.")
        if not _ends_with_answer(rec.messages):
            skipped.no_answer.append(n)
            continue
        try:
            ex = data.example(processor, rec)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        if len(ex.labels) > max_seq_len:
            skipped.too_long.append(n)
            continue
        examples.append(ex)
    if not examples:
        raise InputError(f"{path} has no usable conversation ({skipped} skipped).")
    return examples, skipped


def length_buckets(max_seq_len: int) -> tuple[int, ...]:
    """The padded lengths: powers of two from MIN_BUCKET below `max_seq_len`, then `max_seq_len`."""
    out, n = [], MIN_BUCKET
    while n < max_seq_len:
        out.append(n)
        n *= 2
    return (*out, max_seq_len)


def tile_bucket(tiles: int) -> int:
    """Tiles a microbatch is padded to: 0, or the next power of two."""
    return 0 if tiles == 0 else 1 << (tiles - 1).bit_length()


def blank(example: data.Example) -> data.Example:
    """The example with no target: a filler row for a short last eval microbatch."""
    return data.Example(example.output, np.full_like(example.labels, IGNORE_ID))


def stack(processor: Processor, microbatches: list[list[data.Example]], max_seq_len: int) -> LossInputs:
    """Microbatches (lists of examples, each as long) -> one LossInputs with leaves [A, ...], at the
    bucketed length and tile count of the longest and most tiled microbatch."""
    longest = max(len(e.labels) for mb in microbatches for e in mb)
    length = next(b for b in length_buckets(max_seq_len) if b >= longest)
    batches = [data.collate(processor, mb, length) for mb in microbatches]
    used = max(len(t) if (t := b.batch.used_tiles()) is not None else 0 for b in batches)
    inputs = [LossInputs.from_batch(b, tiles=tile_bucket(used)) for b in batches]
    return jax.tree.map(lambda *xs: np.stack(xs), *inputs)


def targets(inputs: LossInputs) -> int:
    """Target tokens of (stacked) inputs: labels past the first that are not IGNORE_ID, at real tokens."""
    return int(np.sum((np.asarray(inputs.labels)[..., 1:] != IGNORE_ID) & np.asarray(inputs.valid)[..., :-1]))


@dataclasses.dataclass(frozen=True)
class Order:
    """Which examples each optimizer step reads: `batch` * `grad_accum` per step, epoch after epoch."""

    size: int
    batch: int
    grad_accum: int
    seed: int

    def step(self, s: int) -> list[list[int]]:
        """Example indices of step `s` (from 0), as `grad_accum` microbatches of `batch`."""
        per = self.batch * self.grad_accum
        idx = [self._at(i) for i in range(s * per, (s + 1) * per)]
        return [idx[m * self.batch:(m + 1) * self.batch] for m in range(self.grad_accum)]

    def _at(self, i: int) -> int:
        epoch, k = divmod(i, self.size)
        return int(permutation(self.size, self.seed, epoch)[k])


@functools.lru_cache(maxsize=4)
def permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s order of `size` examples."""
    return np.random.default_rng([seed, epoch]).permutation(size)


def eval_batches(processor: Processor, examples: list[data.Example], batch: int, max_seq_len: int):
    """The eval set in microbatches of `batch` rows (the last filled with target-less rows), each a
    stacked LossInputs with A = 1."""
    for start in range(0, len(examples), batch):
        rows = examples[start:start + batch]
        rows += [blank(examples[0])] * (batch - len(rows))
        yield stack(processor, [rows], max_seq_len)
