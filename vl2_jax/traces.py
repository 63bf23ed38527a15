"""The device kernels of a `jax.profiler` trace: launches and busy time by kernel and by program (GPU).

    launches, busy, programs = read_trace(".../plugins/profile/<run>/<host>.trace.json.gz")
    result, wall_s, launches, busy = traced(lambda: model.generate(batch, max_new_tokens=32))
    result, launches, busy, steps = decode_step_kernels(model, batch, 33, model.engine.steps(1))

A GPU trace holds one event per kernel on the device's stream threads (`/device:GPU:0` ... `Stream`);
a kernel's name loses its numeric suffix (all `input_reduce_fusion_N` together) unless `exact_names`,
and its program is the XLA module the event names (`jit_decode`, `jit_prefill`, ...). Other backends'
traces hold no such events: the counters come back empty. `python -m vl2_jax.bench` counts a decode
step's launches with these; `benchmarks/profile_decode.py` and `benchmarks/serve_profile.py` go further.
The module needs only JAX, so a script can load it by path while another checkout's `vl2_jax` is the
one on `PYTHONPATH` (profile_decode's side-by-side profiles).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable


def read_trace(path: str, exact_names: bool = False, intervals: list | None = None, arg_keys: set | None = None):
    """The device kernels of a trace file (`*.trace.json.gz`) -> (launches by name, busy us by name, busy
    us by program). `intervals`, if given, receives every kernel as (start us, duration us, name,
    program); `arg_keys` the argument names the kernels' events carry (what the trace can tell)."""
    events = json.load(gzip.open(path))["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    launches, busy, programs = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        where = procs.get(e["pid"], "") + " " + threads.get((e["pid"], e["tid"]), "")
        if "/device:GPU" not in where or "Stream" not in where:
            continue
        name = e["name"] if exact_names else re.sub(r"[._]\d+$", "", e["name"])
        program = re.sub(r"\(\d+\)$", "", str(e.get("args", {}).get("hlo_module", "(not named)")))
        launches[name] += 1
        busy[name] += e["dur"]
        programs[program] += e["dur"]
        if arg_keys is not None:
            arg_keys.update(e.get("args", {}))
        if intervals is not None:
            intervals.append((float(e["ts"]), float(e["dur"]), name, program))
    return launches, busy, programs


def traced(fn: Callable, exact_names: bool = False, intervals: list | None = None, keep: str | None = None,
           python: bool = False):
    """Runs fn() under the profiler -> (its result, wall seconds, launches by name, busy us by name), the
    kernels as `read_trace`'s. `keep`: a path to copy the trace to (gzipped Chrome trace JSON, host
    threads included; Perfetto opens it). `python`: Python's calls too (JAX's Python tracer, which
    slows the host while it records: off by default, so the wall time stays close to an untraced run's)."""
    import jax

    trace_dir = tempfile.mkdtemp()
    try:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True, **profiler_options(python)):
            start = time.perf_counter()
            result = fn()
            wall = time.perf_counter() - start
        path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
        if keep:
            shutil.copyfile(path, keep)
        launches, busy, _ = read_trace(path, exact_names, intervals)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    return result, wall, launches, busy


def decode_step_kernels(model, batch, tokens: int, steps_per_call: int, exact_names: bool = False,
                        intervals: list | None = None, python: bool = False):
    """The kernels of a `tokens`-token answer's decode steps: traces (`traced`) of that greedy answer
    (EOS ignored) and of a one-token one, the same prefill and first sample, and their difference ->
    (the long answer's result, launches by name, busy us by name, the decode steps it ran: its tokens
    - 1, rounded up to whole calls of `steps_per_call`, which run all their steps). A name the long
    answer ran less often than the short one (noise) is left at or below zero: sum the positive counts.
    `model`: anything with `generate(batch, max_new_tokens=, ignore_eos=)` whose result has `decode_s`;
    `intervals` as `traced`'s, of the long answer."""
    run = lambda n: model.generate(batch, max_new_tokens=n, ignore_eos=True)  # noqa: E731
    _, _, launches_one, busy_one = traced(lambda: run(1), exact_names, python=python)
    result, _, launches, busy = traced(lambda: run(tokens), exact_names, intervals, python=python)
    launches.subtract(launches_one)
    busy.subtract(busy_one)
    return result, launches, busy, -(-(tokens - 1) // steps_per_call) * steps_per_call


def profiler_options(python: bool) -> dict:
    """`jax.profiler.start_trace`'s and `trace`'s keyword for recording Python's calls or not (JAX's
    Python tracer); {} on a JAX without `ProfileOptions` (before 0.6.1), whose traces always hold them."""
    import jax

    if not hasattr(jax.profiler, "ProfileOptions"):
        return {}
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = int(python)
    return {"profiler_options": options}


def idle_gaps(intervals: list[tuple], top: int = 8) -> dict:
    """Where the device waits: kernels (start us, duration us, name, ...) -> the span from the first kernel's
    start to the last one's end, the time inside it with no kernel running, and the `top` longest such
    gaps with the kernels on either side (a gap after a kernel usually means host work or a transfer
    before the next launch)."""
    spans = sorted(intervals)
    gaps, idle, end, last = [], 0.0, None, None
    for start, dur, name, *_ in spans:
        if end is not None and start > end:
            idle += start - end
            gaps.append((start - end, last, name))
        if end is None or start + dur > end:
            end, last = start + dur, name
    span = end - spans[0][0] if spans else 0.0
    return {"span_ms": span / 1e3, "idle_ms": idle / 1e3,
            "largest_gaps": [{"ms": g / 1e3, "after": a[:60], "before": b[:60]} for g, a, b in sorted(gaps, reverse=True)[:top]]}
