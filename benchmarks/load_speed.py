"""Load speed of a converted checkpoint beside a plain read of the same files, from a cold page cache.

    PYTHONPATH=. python benchmarks/load_speed.py CONVERTED_FOLDER [--dtype bfloat16] [--repeats 3]
    PYTHONPATH=. python benchmarks/load_speed.py --make tiny --workdir /tmp/vl2-load-bench   # writes one first

Each repeat, for the files under FOLDER/params (what a load reads):
1. evicts them from the page cache, then reads them plainly: one thread in 16 MB reads into one reused
   buffer (what `cat` does), and again with 16 threads (what the disk gives to parallel readers);
2. evicts them again and times `vl2_jax.load_model(FOLDER, dtype)` in a fresh process: JAX is started
   before the clock starts, and the clock stops when every weight is on its device.
With `--readers`, also `orbax_io.restore` with each reader named ("orbax" is the plain path: one group
at a time through Orbax), each in a fresh process after an eviction.

Eviction (`--evict auto`) writes 3 to /proc/sys/vm/drop_caches where that is permitted (root);
otherwise it calls posix_fadvise(POSIX_FADV_DONTNEED) on every file of the checkpoint, which drops their
clean cached pages without privileges (`--evict fadvise` does so even as root, leaving other
programs' caches alone); `--evict warm` skips it. Every JSON line names the method in "cache".

Prints one JSON line per measurement: "metric" (plain_read, plain_read_parallel, load_model,
restore_<reader>), "seconds", "file_gb" (bytes on disk; Orbax compresses each leaf with zstd) and
"file_gb_per_s"; the loads also give "weights_gb" (bytes of the weights in --dtype), "gb_per_s"
(weights_gb / seconds), the load's CPU seconds ("user_s", "sys_s") and its minor "page_faults" (in a
VM, first touches of memory can cost more than the reading). A summary line (metric "summary") gives
the medians. `--file-io-mode direct` tries tensorstore's O_DIRECT reads (no page cache).

`--make PRESET` writes a random checkpoint of that preset in the Hugging Face layout
(`vl2_jax.testing`) under --workdir, converts it with `python -m convert --dtype bfloat16`, measures
it and deletes both folders unless --keep (tiny: 6.7 GB of weights, 4.9 GB on disk after conversion;
about 12 GB of free disk while both exist). Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vl2_jax import prefetch  # noqa: E402 - the read-ahead's reader is the plain read (no JAX imported)


def repo_env() -> dict:
    """os.environ for a child process: this repository first on PYTHONPATH, the caller's path after it
    (e.g. wheels installed with `pip install --target`)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


THREADS = 16


def evict(files: list[Path], how: str) -> str:
    """Drops `files` from the page cache ("auto": drop_caches where permitted, else fadvise); the method used."""
    if how == "warm":
        return "warm"
    if how in ("auto", "drop_caches"):
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            if how == "drop_caches":
                sys.exit("cannot write /proc/sys/vm/drop_caches (it needs root); use --evict fadvise.")
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise_dontneed"


def plain_read(folder: Path, files: list[Path], threads: int) -> int:
    """Reads every byte of `files` (`prefetch.PIECE`-sized pieces, `threads` at a time, reused buffers:
    what `vl2_jax.prefetch` does ahead of a load); the bytes."""
    reading = prefetch.Reading(folder, {f: f.stat().st_size for f in files}, threads)
    read = reading.wait()
    if read != reading.total:
        sys.exit(f"read {read} of {reading.total} bytes of {folder}: a file could not be read.")
    return read


def child(mode: str, folder: str, dtype: str, mesh: str | None, file_io_mode: str | None) -> None:
    """Runs in a fresh process: one load, timed; prints {"seconds", "weights_bytes", CPU and page faults}."""
    import jax

    from vl2_jax import load, orbax_io
    from vl2_jax.config import VL2Config

    if file_io_mode:
        orbax_io.READ_CONTEXT = {**orbax_io.READ_CONTEXT, "file_io_mode": {"mode": file_io_mode}}
    jax.devices()  # the backend starts before the clock
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if mode == "load_model":
        with load.progress_bar() as bar:
            params = load.load_model(folder, dtype, mesh=mesh, bytes_progress=bar).params
    else:
        reader = mode.removeprefix("restore_")
        params, _ = orbax_io.restore(folder, VL2Config.from_pretrained(folder), load.resolve_dtype(dtype), reader=reader)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "weights_bytes": sum(x.nbytes for x in jax.tree.leaves(params)),
                      "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
                      "page_faults": after.ru_minflt - before.ru_minflt}))


def measure_load(mode: str, args, files: list[Path], file_bytes: int) -> dict:
    cache = evict(files, args.evict)
    cmd = [sys.executable, __file__, "--child", mode, str(args.folder), "--dtype", args.dtype]
    if args.mesh:
        cmd += ["--mesh", args.mesh]
    if args.file_io_mode:
        cmd += ["--file-io-mode", args.file_io_mode]
    run = subprocess.run(cmd, cwd=REPO, env=repo_env(), stdout=subprocess.PIPE, text=True)
    if run.returncode:
        sys.exit(f"{mode} failed (exit {run.returncode}); its error is above.")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    s = out["seconds"]
    return {"metric": mode, "cache": cache, "seconds": s, "file_gb": file_bytes / 1e9, "file_gb_per_s": file_bytes / 1e9 / s,
            "weights_gb": out["weights_bytes"] / 1e9, "gb_per_s": out["weights_bytes"] / 1e9 / s, "dtype": args.dtype,
            "user_s": out["user_s"], "sys_s": out["sys_s"], "page_faults": out["page_faults"],
            "file_io_mode": args.file_io_mode or "default"}


def measure(args) -> None:
    files = prefetch.weight_files(args.folder) if (args.folder / "params").is_dir() else []
    if not files:
        sys.exit(f"{args.folder} has no params/ folder; pass a `python -m convert` output.")
    file_bytes = sum(p.stat().st_size for p in files)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    modes = ["load_model", *(f"restore_{r}" for r in args.readers.split(",") if r)]
    for _ in range(args.repeats):
        for metric, threads in (("plain_read", 1), ("plain_read_parallel", THREADS)):
            cache = evict(files, args.evict)
            start = time.perf_counter()
            n = plain_read(args.folder, files, threads)
            s = time.perf_counter() - start
            emit({"metric": metric, "threads": threads, "cache": cache, "seconds": s, "file_gb": n / 1e9,
                  "file_gb_per_s": n / 1e9 / s})
        for mode in modes:
            emit(measure_load(mode, args, files, file_bytes))
    summary = {"metric": "summary", "folder": str(args.folder), "repeats": args.repeats}
    for metric in ("plain_read", "plain_read_parallel", *modes):
        mine = [r for r in rows if r["metric"] == metric]
        summary[f"{metric}_s"] = statistics.median(r["seconds"] for r in mine)
        summary[f"{metric}_file_gb_per_s"] = statistics.median(r["file_gb_per_s"] for r in mine)
        if "gb_per_s" in mine[0]:
            summary[f"{metric}_gb_per_s"] = statistics.median(r["gb_per_s"] for r in mine)
    print(json.dumps(summary), flush=True)


def make(args) -> Path:
    """A random --make checkpoint, converted: the converted folder (the Hugging Face one is deleted)."""
    import math

    from vl2_jax.config import PRESETS
    from vl2_jax.testing import hf_tensor_shapes, write_random_hf_checkpoint

    cfg = PRESETS[args.make]
    size = sum(math.prod(s) for s in hf_tensor_shapes(cfg).values()) * 2
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(work).free < 1.9 * size:
        sys.exit(f"{work} has {shutil.disk_usage(work).free / 1e9:.1f} GB free; --make {args.make} needs about "
                 f"{1.9 * size / 1e9:.1f} GB.")
    src, dst = work / f"{args.make}-hf", work / f"{args.make}-converted"
    start = time.time()
    write_random_hf_checkpoint(cfg, src, "bfloat16", shards=max(1, round(size / 4e9)), assets=True)
    print(f"wrote {size / 1e9:.1f} GB of random {args.make} weights in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    run = subprocess.run([sys.executable, "-m", "convert", str(src), str(dst), "--dtype", "bfloat16", "--force"],
                         cwd=REPO, env=repo_env())
    shutil.rmtree(src)
    if run.returncode:
        sys.exit("conversion failed; its error is above.")
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", type=Path, help="a `python -m convert` output (or use --make)")
    p.add_argument("--dtype", default="bfloat16", help="dtype to load in (default: bfloat16, the saved one)")
    p.add_argument("--mesh", default=None, help="load_model's mesh, e.g. auto or expert=2 (default: one device)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--readers", default="", help="also time orbax_io.restore with these readers, e.g. tensorstore,orbax")
    p.add_argument("--evict", choices=["auto", "drop_caches", "fadvise", "warm"], default="auto",
                   help="how to empty the page cache before each read: auto (drop_caches where permitted, else "
                        "fadvise), drop_caches (every file's pages, needs root), fadvise (the checkpoint's files "
                        "only), warm (none)")
    p.add_argument("--file-io-mode", choices=["default", "direct", "memmap"], default=None,
                   help="tensorstore's file_io_mode for the direct reader (default: orbax_io.READ_CONTEXT's)")
    p.add_argument("--make", metavar="PRESET", help="write and convert a random checkpoint of this preset first")
    p.add_argument("--workdir", default="/tmp/vl2-load-bench", help="where --make writes (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the --make checkpoint")
    p.add_argument("--child", metavar="MODE", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, str(args.folder), args.dtype, args.mesh, args.file_io_mode)
    if (args.folder is None) == (args.make is None):
        p.error("give a converted folder or --make PRESET (one of them)")
    if args.make:
        args.folder = make(args)
    try:
        measure(args)
    finally:
        if args.make and not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
