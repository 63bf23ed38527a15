"""The prefix cache, kept in the slots themselves: what each free slot's cache still holds of its last
answer, so that a new prompt that starts the same way (a shared system prompt, the same image, the
earlier turns of a chat) continues from there instead of prefilling it again.

A prompt is compared position by position through its signature (`signature`): token ids for text, and
for image tokens a digest of the tile they come from with their place in it, so that two different
images behind the same placeholder ids never match, and a re-tiled image (the cropping rule re-tiles
the first two images when a third arrives) matches only where its tiles are the same. Reuse starts at
the longest common prefix rounded down to the smallest prefill chunk, and always leaves at least one
prompt token to prefill (its logits give the first answer token). A prompt also continues from the
prompt of a job still decoding in another slot (copied from there: a system prompt or an image that
several requests at once share; `generation.Batcher` holds a prompt back while one still being
prefilled shares a longer start with it than any slot holds). A slot keeps its entries until a job that
does not share them takes it: free slots are handed out hits first, then empty or least recently used
ones (eviction), among the slots that keep the decode program no larger than the number of running jobs
needs. A prefix cached in a slot further up comes down into the slot taken: where the prompt continues
or repeats that slot's whole conversation the two slots trade places (one device program swaps their
rows, so the taken slot's entries move up and no prefix is held twice); where it shares only a start (a
system prompt), the prefix is copied, the other conversation staying as it is. Entries a job is about
to overwrite trade places with a free slot beyond those (empty, else holding older entries), so the
slots that a small decode program leaves idle keep the most recent prefixes. The memory is the slots'
own cache.

Beside it, `TileFeatures` keeps the vision tower's output for recently seen tiles (by the same pixel
digest), so an image already seen behind a different prefix is not encoded again.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from vl2_jax.processor import TILE_SOURCES, BytesLRU

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


class TileFeatures(BytesLRU):
    """The vision tower's projected tokens of recently encoded tiles ([side * side, D] device arrays),
    by tile digest, least recently used dropped first beyond `budget` bytes. Counts tiles looked up and
    found."""

    def __init__(self, budget: int):
        super().__init__(budget, lambda features: features.nbytes)


class SlotPrefixes:
    """Per slot: the signatures of the cache entries its last job left (prompt and answer but the last
    token, which was never fed), and when that job ended."""

    def __init__(self, slots: int, granularity: int):
        self.granularity = granularity
        self.held = [np.zeros((0,), np.int64) for _ in range(slots)]
        self.used = [0.0] * slots
        self.lookups = self.hits = 0  # prompts looked up; prompt tokens served from a cache

    def choose(self, free: list[int], sig: np.ndarray, below: int | None = None,
               running: dict[int, np.ndarray] | None = None
               ) -> tuple[int, int, tuple[tuple[str, int, int], ...]]:
        """(slot, start, moves) for a prompt of signature `sig`: the free slot to take, the number of its
        tokens that are cached there once the caller has made `moves` (0: none; a multiple of
        `granularity`, below len(sig)), and the moves, in order: ("swap", a, b), slots a and b trade
        their rows, or ("copy", a, b), slot b's rows become a copy of slot a's. The slot is one under
        `below` where there is any: a decode call runs every slot up to the highest live one, so a slot
        further up would slow every answer (see the module docstring for what moves where).
        `running`: {slot: the signature of the entries written there} of the slots whose jobs are
        decoding; a prefix found only there is copied (the job there goes on)."""
        # (free slots first: on a tie the lower free slot stays, and a prefix there needs no copy)
        source, start, reach = self.longest([*((s, self.held[s]) for s in free), *(running or {}).items()], sig)
        busy = source is not None and source not in free
        near = [slot for slot in free if below is None or slot < below] or free
        if source is not None and source in near:
            slot = source
        else:  # an empty slot, else the one unused longest (never a free source: it is moved from)
            slot = min((s for s in near if s != source or len(near) == 1),
                       key=lambda s: (len(self.held[s]) > 0, self.used[s], s))
        self.lookups += 1
        self.hits += start
        if source == slot:
            return slot, start, ()
        if not busy and source is not None and (reach == len(self.held[source]) or reach >= len(sig) - 1):
            return slot, start, (self._swap(slot, source),)  # (the prompt continues or repeats it all)
        moves = []
        if len(self.held[slot]):  # the entries the job would overwrite go up, if an idle slot holds older
            far = [s for s in free if s not in near and s != source]
            oldest = min(far, key=lambda s: (len(self.held[s]) > 0, self.used[s], s), default=None)
            if oldest is not None and (not len(self.held[oldest]) or self.used[oldest] < self.used[slot]):
                moves.append(self._swap(slot, oldest))
        if source is not None:
            self.held[slot] = (running[source] if busy else self.held[source])[:start].copy()
            moves.append(("copy", source, slot))
        return slot, start, tuple(moves)

    def longest(self, candidates, sig: np.ndarray) -> tuple[int | None, int, int]:
        """(key, start, common) of the first of `candidates` ((key, signature) pairs) that shares the
        longest reusable prefix with `sig`: `start` its length rounded down to `granularity` (0 and key
        None: none shares one), `common` the positions the two share (at most len(sig) - 1)."""
        source, start, reach = None, 0, 0
        for key, held in candidates:
            n = min(len(held), len(sig) - 1)
            same = np.flatnonzero(held[:n] != sig[:n])
            common = int(same[0]) if len(same) else n
            if common // self.granularity * self.granularity > start:
                source, start, reach = key, common // self.granularity * self.granularity, common
        return source, start, reach

    def _swap(self, a: int, b: int) -> tuple[str, int, int]:
        self.held[a], self.held[b] = self.held[b], self.held[a]
        self.used[a], self.used[b] = self.used[b], self.used[a]
        return ("swap", a, b)

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
