"""Where a converted checkpoint's load spends its time: each leaf's read and its placing, timed.

    PYTHONPATH=. python benchmarks/load_profile.py CONVERTED_FOLDER --mode default
    PYTHONPATH=. python benchmarks/load_profile.py CONVERTED_FOLDER --mode readonly

Runs `orbax_io.restore` once in this process, from a cold page cache where it may drop it (root), JAX's
backend started before the clock, with `_read_host` (file to host memory) and `place` (host to device,
waited for) replaced by timed copies. Modes: `default`, `reuse` (each reader thread reads into one
reused host buffer), `readonly` (no device transfer: the reading and decoding alone), `threadsN` (N
leaves read at once instead of `orbax_io.READ_THREADS`), `placeN` (N leaves placed at once instead of
`orbax_io.PLACE_THREADS`). Prints one JSON line: wall seconds, when the first leaf started and the last
read ended, and each phase summed over its threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time

import jax
import numpy as np

from vl2_jax import orbax_io
from vl2_jax.config import VL2Config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--mode", default="default", help="default, reuse, readonly or threadsN")
    args = p.parse_args(argv)
    if os.geteuid() == 0:
        subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=False)
    reads, places, lock, local = [], [], threading.Lock(), threading.local()
    read_host, place = orbax_io._read_host, orbax_io.place

    def timed_read(path, group, leaf, store, sharding):
        import tensorstore as ts

        t0 = time.perf_counter()
        if args.mode == "reuse":
            dtype = store.dtype.numpy_dtype
            n = int(np.prod(store.shape)) * dtype.itemsize
            if getattr(local, "buf", None) is None or local.buf.nbytes < n:
                local.buf = np.empty(n, np.uint8)
            host = local.buf[:n].view(dtype).reshape(store.shape)
            ts.array(host, copy=False, write=True).write(store).result()
        else:
            host = read_host(path, group, leaf, store, sharding)
        with lock:
            reads.append((host.nbytes, t0, time.perf_counter()))
        return host

    def timed_place(host, sharding):
        if args.mode == "readonly":
            return host
        t0 = time.perf_counter()
        array = place(host, sharding)
        with lock:
            places.append((t0, time.perf_counter()))
        return array

    orbax_io._read_host, orbax_io.place = timed_read, timed_place
    if args.mode.startswith("threads"):
        orbax_io.READ_THREADS = int(args.mode[len("threads"):])
    if args.mode.startswith("place"):
        orbax_io.PLACE_THREADS = int(args.mode[len("place"):])
    jax.devices()  # the backend's start is not the load's
    before, start = os.times(), time.perf_counter()
    params, _ = orbax_io.restore(args.folder, VL2Config.from_pretrained(args.folder))
    jax.block_until_ready(params)
    wall, after = time.perf_counter() - start, os.times()
    sizes = np.array([row[0] for row in reads])
    t, placed = np.array([row[1:] for row in reads]) - start, np.array(places).reshape(-1, 2) - start
    print(json.dumps({
        "mode": args.mode, "wall_s": round(wall, 2), "weights_gb": round(sizes.sum() / 1e9, 2), "leaves": len(reads),
        "first_leaf_started_s": round(float(t[:, 0].min()), 2), "last_read_ended_s": round(float(t[:, 1].max()), 2),
        "read_s_summed": round(float((t[:, 1] - t[:, 0]).sum()), 2),
        "place_s_summed": round(float((placed[:, 1] - placed[:, 0]).sum()), 2),
        "user_s": round(after.user - before.user, 1),
        "sys_s": round(after.system - before.system, 1), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
    }), flush=True)


if __name__ == "__main__":
    main()
