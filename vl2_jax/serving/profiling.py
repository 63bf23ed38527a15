"""Device traces of a running server: SGLang's `POST /start_profile` and `POST /stop_profile`.

    python -m vl2_jax.serve --model M --profile-dir /tmp/traces
    curl -X POST localhost:30000/start_profile; sleep 5; curl -X POST localhost:30000/stop_profile

Between the two calls `jax.profiler` records every thread of the process and the device's kernels
(the scheduler's programs as they run under load), and Python's own calls only where the start asks
(SGLang's `with_stack`: they slow the server while recorded and make the trace several times larger);
`stop` writes the trace (Perfetto's `perfetto_trace.json.gz` and TensorBoard's profile) into a new
folder under the profile directory and answers its path. `python benchmarks/serve_profile.py` takes such a window and sums it by program.
"""

from __future__ import annotations

import datetime
import threading
from pathlib import Path

import jax

from vl2_jax.errors import InputError
from vl2_jax.traces import profiler_options


class Profiler:
    """One trace at a time, into folders under `directory` (created on the first start). Thread-safe."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._current: Path | None = None

    @property
    def running(self) -> bool:
        return self._current is not None

    def start(self, python: bool = False) -> Path:
        """Starts a trace -> the folder it will be written to. InputError if one is already running.
        `python`: Python's calls too (every thread's; slower while it runs, and far larger to write)."""
        with self._lock:
            if self._current is not None:
                raise InputError(f"a profile is already being recorded (into {self._current}); POST /stop_profile "
                                 f"first.")
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            folder = self.directory / f"trace-{stamp}"
            folder.mkdir(parents=True)
            jax.profiler.start_trace(str(folder), create_perfetto_trace=True, **profiler_options(python))
            self._current = folder
            return folder

    def stop(self) -> tuple[Path, list[Path]]:
        """Stops the trace and writes it -> (its folder, the trace files in it). InputError if none runs."""
        with self._lock:
            if self._current is None:
                raise InputError("no profile is being recorded; POST /start_profile first.")
            folder, self._current = self._current, None
            jax.profiler.stop_trace()
        return folder, sorted(p for p in folder.rglob("*") if p.name.endswith((".json.gz", ".xplane.pb")))
