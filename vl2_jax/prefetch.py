"""A checkpoint's files read into the page cache while the process starts.

A fresh `python -m generate` first imports JAX and starts the accelerator's backend (seconds, with the
disk idle) and only then reads the weights. `start(spec)`, called as soon as a command knows its model
and before it imports JAX, reads the weight files on background threads, so that the loader later
finds them in memory. The bytes go nowhere but the operating system's page cache. Files that would take
more than half the memory available are not read (they would push each other out before the loader
came to them), and the loader stops the reading once it is done (`Reading.stop`).

Standard library only: this module is imported before JAX.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from vl2_jax.specs import folder_of

PIECE = 16 << 20  # bytes per read
THREADS = 8  # reads in flight: enough to keep a local NVMe disk busy


def weight_files(folder: Path) -> list[Path]:
    """The files a load reads most of: a converted checkpoint's `params/` tree, else the folder's
    `*.safetensors` (a Hugging Face checkpoint). Config and tokenizer files are small and left out."""
    params = folder / "params"
    if params.is_dir():
        return sorted(p for p in params.rglob("*") if p.is_file())
    return sorted(folder.glob("*.safetensors"))


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux's MemAvailable); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Reading:
    """Background threads reading files (`sizes`: path -> bytes) in `PIECE`-sized pieces, in order,
    until all is read or `stop()`."""

    def __init__(self, folder: Path, sizes: dict[Path, int], threads: int = THREADS):
        self.folder = folder
        self.total = sum(sizes.values())
        self.started = time.perf_counter()
        self.finished: float | None = None  # perf_counter time when the last thread ended
        pieces = [(f, offset) for f, size in sizes.items() for offset in range(0, size, PIECE)]
        self._pieces = iter(pieces)
        self._piece = min(PIECE, max(sizes.values()))  # (small files: small buffers)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._read = 0
        threads = max(1, min(threads, len(pieces)))
        self._running = threads
        self._threads = [threading.Thread(target=self._work, name=f"vl2-prefetch-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    @property
    def read(self) -> int:
        """Bytes read so far."""
        return self._read

    def _next(self) -> tuple[Path, int] | None:
        with self._lock:
            return None if self._stopped.is_set() else next(self._pieces, None)

    def _work(self) -> None:
        buf = bytearray(self._piece)
        try:
            while (piece := self._next()) is not None:
                path, offset = piece
                try:
                    with open(path, "rb", buffering=0) as f:
                        f.seek(offset)
                        n = f.readinto(buf) or 0
                except OSError:  # a file gone or unreadable: the loader will say what is wrong
                    n = 0
                with self._lock:
                    self._read += n
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
                if last:
                    self.finished = time.perf_counter()
            if last:
                self._forget()

    def _forget(self) -> None:
        with _REGISTRY_LOCK:
            if _READINGS.get(self.folder) is self:
                del _READINGS[self.folder]

    def stop(self) -> None:
        """No more pieces are started (those being read finish); forgets this reading. A load that
        shares the reading with another load of the same folder ends it for both (it only reads ahead)."""
        self._stopped.set()
        self._forget()

    def wait(self, timeout: float | None = None) -> int:
        """Blocks until every thread is done (all read, or stopped), or `timeout` seconds; the bytes read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._read


_READINGS: dict[Path, Reading] = {}
_REGISTRY_LOCK = threading.Lock()


def start(spec: str | os.PathLike, *, threads: int = THREADS, memory: int | None = None) -> Reading | None:
    """Starts reading the weight files `spec` loads from (a folder, or a hub id's converted copy) into
    the page cache; the reading, or None where there is nothing to read (random weights, a folder not on
    disk yet) or the files exceed half of `memory` (default: `available_memory()`, and nothing is read
    where that is unknown). A folder being read returns that reading. It never fails: a folder it cannot
    list or a file it cannot stat (a broken link, no permission) reads nothing, and the loader says
    what is wrong."""
    try:
        folder = folder_of(os.fspath(spec))
        if folder is None or not folder.is_dir():
            return None
        folder = folder.resolve()
        with _REGISTRY_LOCK:
            if folder in _READINGS:
                return _READINGS[folder]
            sizes = {f: f.stat().st_size for f in weight_files(folder)}
            memory = available_memory() if memory is None else memory
            if not sizes or memory is None or sum(sizes.values()) > memory // 2:
                return None
            reading = _READINGS[folder] = Reading(folder, sizes, threads)
        return reading
    except (OSError, ValueError):  # (ValueError: a path with a NUL byte)
        return None
