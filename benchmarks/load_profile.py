"""Where a converted checkpoint's load spends its time: each leaf's read, device_put and wait, timed.

    PYTHONPATH=. python benchmarks/load_profile.py CONVERTED_FOLDER --mode default
    PYTHONPATH=. python benchmarks/load_profile.py CONVERTED_FOLDER --mode readonly

Runs `orbax_io.restore` once in this process, from a cold page cache where it may drop it (root), with
`_read_leaf` replaced by a timed copy of its single-device path. Modes: `default` (tensorstore's
`read()`, then `jax.device_put`, then the wait for the device), `reuse` (each thread reads into one
reused host buffer), `readonly` (no device transfer: the reading and decoding alone), `threadsN` (N
leaves in flight instead of `orbax_io.READ_THREADS`). Prints one JSON line: wall seconds, when the first
leaf started (the stores' opening before it), and the per-leaf phases summed over threads.
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
    log, lock, local = [], threading.Lock(), threading.local()

    def timed(path, group, leaf, store, sharding):
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
            host = store.read().result()
        t1 = time.perf_counter()
        array, t2, t3 = host, t1, t1
        if args.mode != "readonly":
            array = jax.device_put(host, sharding)
            t2 = time.perf_counter()
            array.block_until_ready()
            t3 = time.perf_counter()
        with lock:
            log.append((host.nbytes, t0, t1, t2, t3))
        return array

    orbax_io._read_leaf = timed
    if args.mode.startswith("threads"):
        orbax_io.READ_THREADS = int(args.mode[len("threads"):])
    before, start = os.times(), time.perf_counter()
    params, _ = orbax_io.restore(args.folder, VL2Config.from_pretrained(args.folder))
    jax.block_until_ready(params)
    wall, after = time.perf_counter() - start, os.times()
    sizes = np.array([row[0] for row in log])
    t = np.array([row[1:] for row in log]) - start
    print(json.dumps({
        "mode": args.mode, "wall_s": round(wall, 2), "weights_gb": round(sizes.sum() / 1e9, 2), "leaves": len(log),
        "first_leaf_started_s": round(float(t[:, 0].min()), 2), "read_s_summed": round(float((t[:, 1] - t[:, 0]).sum()), 2),
        "device_put_s_summed": round(float((t[:, 2] - t[:, 1]).sum()), 2),
        "wait_s_summed": round(float((t[:, 3] - t[:, 2]).sum()), 2), "user_s": round(after.user - before.user, 1),
        "sys_s": round(after.system - before.system, 1), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
    }), flush=True)


if __name__ == "__main__":
    main()
