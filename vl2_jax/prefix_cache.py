"""The prefix cache, kept in the slots themselves: what each free slot's cache still holds of its last
answer, so that a new prompt that starts the same way (a shared system prompt, the same image, the
earlier turns of a chat) continues from there instead of prefilling it again.

A prompt is compared position by position through its signature (`signature`): token ids for text,
and for image tokens a digest of the tile they come from with their place in it, so that two
different images behind the same placeholder ids never match, and a re-tiled image (the cropping rule
re-tiles the first two images when a third arrives) matches only where its tiles are the same. Reuse
starts at the longest common prefix rounded down to the smallest prefill chunk, and always leaves at
least one prompt token to prefill (its logits give the first answer token). A slot keeps its entries
until a job that does not share them takes it: free slots are handed out hits first, then empty or
least recently used ones (eviction), among the slots that keep the decode program no larger than the
number of running jobs needs; a prefix cached in a slot further up trades places with the slot taken
(one device program swaps the two slots' rows: the taken slot's entries move up, nothing is lost), and
the entries a job is about to overwrite trade places with a free slot beyond those (empty, else
holding older entries), so the slots that a small decode program leaves idle keep the most recent
prefixes, each once. The memory is the slots' own cache.

Beside it, `TileFeatures` keeps the vision tower's output for recently seen tiles (by the same pixel
digest), so an image already seen behind a different prefix is not encoded again.
"""

from __future__ import annotations

import collections
import hashlib
import time

import numpy as np

from vl2_jax.processor import TILE_SOURCES

_MASK = np.uint64((1 << 62) - 1)


def signature(ids: np.ndarray, src: np.ndarray, image_mask: np.ndarray, tiles: np.ndarray | None,
              side: int, digests: list[int] | None = None) -> np.ndarray:
    """int64 [P]: a prompt's token ids (>= 0), with each image token replaced by a negative value
    derived from the digest of its tile's pixels and its row in the tile (or from the newline or
    separator row it uses). Arguments as `engine.Request`'s: ids, src, image_mask [P], tiles [I, S, S, 3];
    `digests`: `tile_digests(tiles)`, if already computed."""
    sig = ids.astype(np.int64).copy()
    if not image_mask.any():
        return sig
    hw = np.uint64(side * side)
    digests = np.array((tile_digests(tiles) if digests is None else digests) or [0], np.uint64)
    src = src[image_mask].astype(np.int64)
    in_tile = np.maximum(src - TILE_SOURCES, 0).astype(np.uint64)
    tile_value = (digests[np.minimum(in_tile // hw, len(digests) - 1).astype(np.int64)] * hw + in_tile % hw
                  + np.uint64(TILE_SOURCES)) & _MASK
    value = np.where(src >= TILE_SOURCES, tile_value, src.astype(np.uint64)).astype(np.int64)
    sig[image_mask] = -1 - value
    return sig


def tile_digests(tiles: np.ndarray | None) -> list[int]:
    """A 56-bit digest of each tile's pixels ([I, S, S, 3] uint8; None: no tiles)."""
    if tiles is None:
        return []
    return [int.from_bytes(hashlib.blake2b(t.tobytes(), digest_size=7).digest(), "little") for t in tiles]


class TileFeatures:
    """The vision tower's projected tokens of recently encoded tiles ([side * side, D] device arrays),
    by tile digest, least recently used dropped first beyond `budget` bytes. Counts tiles looked up and
    found."""

    def __init__(self, budget: int):
        self.budget, self.bytes = budget, 0
        self.entries: collections.OrderedDict[int, object] = collections.OrderedDict()
        self.lookups = self.hits = 0

    def get(self, digest: int):
        """The features of the tile with this digest, or None."""
        self.lookups += 1
        found = self.entries.get(digest)
        if found is not None:
            self.entries.move_to_end(digest)
            self.hits += 1
        return found

    def put(self, digest: int, features) -> None:
        if digest in self.entries or features.nbytes > self.budget:
            return
        self.entries[digest] = features
        self.bytes += features.nbytes
        while self.bytes > self.budget:
            self.bytes -= self.entries.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


class SlotPrefixes:
    """Per slot: the signatures of the cache entries its last job left (prompt and answer but the last
    token, which was never fed), and when that job ended."""

    def __init__(self, slots: int, granularity: int):
        self.granularity = granularity
        self.held = [np.zeros((0,), np.int64) for _ in range(slots)]
        self.used = [0.0] * slots
        self.lookups = self.hits = 0  # prompts looked up; prompt tokens served from a cache

    def choose(self, free: list[int], sig: np.ndarray, below: int | None = None) -> tuple[int, int, int | None]:
        """(slot, start, other) for a prompt of signature `sig`: the free slot to take, the number of its
        tokens that are cached there once the caller has swapped the rows of `slot` and `other` (0: none;
        a multiple of `granularity`, below len(sig)), and the free slot to swap with (None: no swap). The
        slot is one under `below` where there is any: a decode call runs every slot up to the highest
        live one, so a slot further up would slow every answer. A prefix cached further up trades places
        with the slot's entries; on a miss, entries the job would overwrite trade places with the idle
        slot further up that is empty or holds the oldest entries, if those are older."""
        source, start = None, 0
        for slot in free:
            held = self.held[slot]
            n = min(len(held), len(sig) - 1)
            same = np.flatnonzero(held[:n] != sig[:n])
            common = (int(same[0]) if len(same) else n) // self.granularity * self.granularity
            if common > start:  # (free is in order: on a tie the lower slot stays)
                source, start = slot, common
        near = [slot for slot in free if below is None or slot < below] or free
        if source is not None and source in near:
            slot = source
        else:  # an empty slot, else the one unused longest (never the source: it is swapped with)
            slot = min((s for s in near if s != source or len(near) == 1),
                       key=lambda s: (len(self.held[s]) > 0, self.used[s], s))
        self.lookups += 1
        self.hits += start
        other = None
        if source is not None and source != slot:
            other = source
        elif source is None and len(self.held[slot]):
            far = [s for s in free if s not in near]
            oldest = min(far, key=lambda s: (len(self.held[s]) > 0, self.used[s], s), default=None)
            if oldest is not None and (not len(self.held[oldest]) or self.used[oldest] < self.used[slot]):
                other = oldest
        if other is not None:
            self.held[slot], self.held[other] = self.held[other], self.held[slot]
            self.used[slot], self.used[other] = self.used[other], self.used[slot]
        return slot, start, other

    def keep(self, slot: int, sig: np.ndarray, answer: list[int]) -> None:
        """The slot's job ended: it holds the prompt (`sig`) and the answer's tokens but the last."""
        self.held[slot] = np.concatenate([sig, np.asarray(answer[:-1], np.int64)])
        self.used[slot] = time.monotonic()

    def forget(self, slot: int) -> None:
        """The slot's entries are not a prompt's (e.g. a prefill cut short)."""
        self.held[slot] = np.zeros((0,), np.int64)

    def clear(self) -> None:
        for slot in range(len(self.held)):
            self.forget(slot)
