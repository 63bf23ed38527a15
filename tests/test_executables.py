"""Compiled programs kept on disk: a fresh model (as in a fresh process) loads them and then neither
traces nor compiles; a file that does not load is compiled again; the key changes with what the
programs depend on; old folders are pruned; an answer's programs load ahead, side by side, as
forecast when it is admitted, and every kept program starts loading while the weights do."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import vl2_jax
from tests.test_engine import EVENTS, count_compiles, image
from vl2_jax import Runtime, executables, specs
from vl2_jax.errors import ConfigError
from vl2_jax.executables import ExecutableStore, fingerprint

# One slot of 128 tokens, one prefill chunk: a dozen programs, quick to compile on a CPU.
SMALL = Runtime(max_batch=1, max_seq_len=128, prefill_chunks=(128,))


def _model(runtime=SMALL):
    return vl2_jax.load_model("random:test", "float32", runtime=runtime)


def _ask(model, **options):
    p = model.processor
    batch = p.batchify([p([{"role": "user", "content": "<image>\nWhat is this?"}], [image(3, 70, 50)])])
    assert batch.input_ids.shape[1] < 100
    return model.generate(batch, max_new_tokens=12, **options).token_ids[0]


def test_a_fresh_model_loads_every_program_and_traces_nothing(tmp_path):
    first = _model()
    store = first.keep_executables(tmp_path)
    report = first.warmup()
    made = report["programs"] + 1  # and the program that makes the empty state
    assert store.report() | {"load_s": 0} == {"loaded": 0, "compiled": made, "failures": 0, "load_s": 0}
    expected = _ask(first)

    second = _model()  # new programs (new functions): without the store they would be traced again
    again = second.keep_executables(tmp_path)
    assert second.warmup()["programs"] == report["programs"]
    assert again.report() | {"load_s": 0} == {"loaded": made, "compiled": 0, "failures": 0, "load_s": 0}
    assert again.report()["load_s"] > 0
    tokens, counts = count_compiles(lambda: _ask(second))
    assert counts == dict.fromkeys(EVENTS, 0), counts
    assert tokens == expected

    # the control: the same questions with no store trace and compile
    _, counts = count_compiles(lambda: _ask(_model()))
    assert all(counts[e] > 0 for e in EVENTS), counts


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 3}], ids=["greedy", "sampled"])
def test_an_answer_loads_its_programs_ahead_side_by_side(tmp_path, sampling):
    first = _model()
    first.keep_executables(tmp_path)
    expected = _ask(first, **sampling)

    second = _model()
    store = second.keep_executables(tmp_path)
    engine = second.engine
    before = set(engine._loaded)
    tokens, counts = count_compiles(lambda: _ask(second, **sampling))
    assert tokens == expected and counts == dict.fromkeys(EVENTS, 0), counts
    ran = set(engine._loaded) - before
    # every program the answer ran was started ahead (the forecast), found by the key its call has
    assert ran and ran <= set(engine._loading), (ran, set(engine._loading))
    assert store.report()["compiled"] == 0 and store.report()["loaded"] == len(engine._loading)


def test_a_load_that_fails_on_its_thread_is_tried_again_by_the_call(tmp_path):
    first = _model()
    first.keep_executables(tmp_path)
    expected = _ask(first)

    second = _model()
    store = second.keep_executables(tmp_path)
    load = store.load_or_compile

    def failing_on_threads(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("a load that failed")
        return load(*args, **kwargs)

    store.load_or_compile = failing_on_threads
    assert _ask(second) == expected
    assert second.engine._loading and store.report()["compiled"] == 0  # (loaded by the calls themselves)


def test_the_forecast_covers_prompts_admitted_together(tmp_path):
    # three prompts of different first chunks in four slots: grouped calls, inserts and decode buckets
    runtime = Runtime(max_batch=4, max_seq_len=1024, prefill_chunks=(128, 512))

    def ask(model):
        p = model.processor
        rows = [p([{"role": "user", "content": "Hello there."}], []),
                p([{"role": "user", "content": "<image>\nWhat is this?"}], [image(5, 90, 60)]),
                p([{"role": "user", "content": "tell me more " * 20}], [])]
        assert [len(r.input_ids) > 128 for r in rows] == [False, False, True]
        return model.generate(p.batchify(rows), max_new_tokens=40).token_ids

    first = _model(runtime)
    first.keep_executables(tmp_path)
    expected = ask(first)

    second = _model(runtime)
    second.keep_executables(tmp_path)
    engine, forecasts = second.engine, []
    preload = engine.preload
    engine.preload = lambda params, state, programs: forecasts.append(programs) or preload(params, state, programs)
    before = set(engine._loaded)
    assert ask(second) == expected
    ran = set(engine._loaded) - before - {"state()"}
    forecast = {f"{kind}{static}" for programs in forecasts for kind, static in programs}
    assert ran <= forecast, ran - forecast
    assert ran <= set(engine._loading)
    assert len(forecast - ran) <= 4, forecast - ran  # (a guess, not every bucket and row count)


def test_kept_programs_load_beside_the_weights_those_of_a_first_token_first(tmp_path, monkeypatch):
    import concurrent.futures
    import os
    import time

    first = vl2_jax.load_model("random:test", "float32", runtime=SMALL, programs=str(tmp_path))
    expected = _ask(first)
    files = sorted(tmp_path.rglob("*.bin"))
    assert len(files) >= 5 and first.engine.executables.report()["compiled"] == len(files)
    kinds = ["state", "table", "encode", "embed", "prefill", "extend", "insert"]
    later = [f for f in files if not f.name.startswith(tuple(kinds))]
    assert later and [f for f in files if f.name.startswith("prefill")]
    newest = later[-1]  # (within a kind, the most recently used first)
    os.utime(newest, (time.time() + 60, time.time() + 60))

    reads = []
    read = ExecutableStore._read
    monkeypatch.setattr(ExecutableStore, "_read", lambda self, path, device: reads.append(
        (threading.current_thread().name, path)) or read(self, path, device))
    second = vl2_jax.load_model("random:test", "float32", runtime=SMALL, programs=str(tmp_path))
    store = second.engine.executables
    assert store is not None and store.directory == files[0].parent  # kept while the weights loaded
    order = list(store._ahead)
    rank = [next((i for i, k in enumerate(kinds) if f.name.startswith(k)), len(kinds)) for f in order]
    assert rank == sorted(rank) and order[rank.index(len(kinds))] == newest
    concurrent.futures.wait([future for _, future in store._ahead.values()] + list(second.engine._loading.values()))
    # every one, once, on background threads (the state's program on the engine's, which starts it at once)
    assert sorted(path for name, path in reads if name.startswith(("vl2-programs", "vl2-preload"))) == files
    reads.clear()
    tokens, counts = count_compiles(lambda: _ask(second))
    assert tokens == expected and counts == dict.fromkeys(EVENTS, 0), counts
    assert reads == []  # (the calls took them: none read again)
    assert store.report()["compiled"] == 0 and store.report()["loaded"] == len(files)


def test_loads_not_begun_are_dropped_when_the_process_exits(tmp_path):
    """40 queued loads of 0.4 s each on one thread: the process exits after the one under way (without
    the exit hook the interpreter would wait ~16 s for the queue)."""
    import subprocess
    import sys
    import time

    script = f"""
import time
from vl2_jax.executables import ExecutableStore
store = ExecutableStore({str(tmp_path)!r}, "key")
for i in range(40):
    (store.directory / f"decode-{{i}}.bin").write_bytes(b"not a program")
read = ExecutableStore._read
ExecutableStore._read = lambda self, path, device: time.sleep(0.4) or read(self, path, device)
assert store.prefetch(threads=1) == 40
print(time.time(), flush=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    exited = time.time()
    assert out.returncode == 0, out.stderr[-2000:]
    assert exited - float(out.stdout.split()[-1]) < 5


def test_a_file_that_does_not_load_is_compiled_again(tmp_path):
    first = _model()
    first.keep_executables(tmp_path)
    expected = _ask(first)
    files = sorted(p for p in tmp_path.rglob("decode*.bin"))
    assert files
    files[0].write_bytes(b"not an executable")

    second = _model()
    store = second.keep_executables(tmp_path)
    assert _ask(second) == expected
    assert store.report()["failures"] == 1 and store.report()["compiled"] == 1
    third = _model()
    store = third.keep_executables(tmp_path)
    assert _ask(third) == expected
    assert store.report()["compiled"] == 0 and store.report()["failures"] == 0  # it was written whole again


def test_the_key_follows_what_the_programs_depend_on():
    cfg = vl2_jax.load_model("random:test", "float32").cfg
    same = fingerprint(cfg, np.dtype("float32"), SMALL)
    assert fingerprint(cfg, np.dtype("float32"), SMALL) == same
    assert fingerprint(cfg, np.dtype("bfloat16"), SMALL) != same
    assert fingerprint(cfg, np.dtype("float32"), Runtime(max_batch=2, max_seq_len=128, prefill_chunks=(128,))) != same


def test_old_folders_are_pruned(tmp_path):
    import os
    import time

    for i in range(6):
        (tmp_path / f"old{i}").mkdir()
        os.utime(tmp_path / f"old{i}", (time.time() - 100 + i, time.time() - 100 + i))
    ExecutableStore(tmp_path, "current", keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "old4", "old5"]


def test_under_a_mesh_programs_are_not_kept(tmp_path):
    model = vl2_jax.load_model("random:test", "float32", runtime=SMALL, mesh="auto")
    with pytest.raises(ConfigError, match="mesh"):
        model.keep_executables(tmp_path)


def test_kept_programs_and_jax_own_cache_do_not_mix(tmp_path):
    """An executable JAX loaded from its own persistent cache serializes without the functions it calls
    (a later process fails to run it): the store refuses to start beside that cache, and the entry
    points' `keep` then leaves the programs to it, with a note."""
    import jax

    from vl2_jax import executables

    lines = []
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    try:
        with pytest.raises(ConfigError, match="persistent compilation cache"):
            ExecutableStore(tmp_path / "kept", "key")
        assert executables.keep(_model(), str(tmp_path), lines.append) is None
        assert len(lines) == 1 and "JAX's own compilation cache" in lines[0]
    finally:
        jax.config.update("jax_compilation_cache_dir", None)


def test_the_caches_go_under_xdg_cache_home_where_it_is_set(monkeypatch, tmp_path):
    """Compiled programs and hub conversions share one base: $XDG_CACHE_HOME, else ~/.cache; their own
    variables win, and the flag wins over everything."""
    for name in ("XDG_CACHE_HOME", "VL2_JAX_COMPILE_CACHE", "VL2_JAX_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert executables.cache_dir(None) == str(tmp_path / "home" / ".cache" / "vl2_jax" / "xla")
    assert specs.cache_dir() == tmp_path / "home" / ".cache" / "vl2_jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert executables.cache_dir(None) == str(tmp_path / "xdg" / "vl2_jax" / "xla")
    assert specs.cache_dir() == tmp_path / "xdg" / "vl2_jax"
    monkeypatch.setenv("VL2_JAX_COMPILE_CACHE", str(tmp_path / "cc"))
    monkeypatch.setenv("VL2_JAX_CACHE", str(tmp_path / "conv"))
    assert executables.cache_dir(None) == str(tmp_path / "cc") and specs.cache_dir() == tmp_path / "conv"
    assert executables.cache_dir("") == "" and executables.cache_dir("mine") == "mine"
