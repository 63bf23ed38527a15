"""Peak host memory and wall time of `python -m convert` on a random checkpoint at a real size.

    PYTHONPATH=. python benchmarks/convert_memory.py --preset small --shards 4 --workdir /work/convert-bench

Writes a random bf16 checkpoint in the Hugging Face layout (`vl2_jax.testing`), converts it under
`/usr/bin/time -v`, prints one JSON line (peak resident set size, wall time) and deletes both folders
unless --keep. Needs about twice the checkpoint size in free disk (-small: 2 x 32 GB). Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from load_speed import repo_env  # noqa: E402 - the same child environment

FIXTURE = REPO.parent / "shared" / "fixtures" / "mla" / "ckpt"  # tokenizer + processor files to copy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workdir", default="/work/convert-bench")
    p.add_argument("--keep", action="store_true", help="keep the generated and converted folders")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    import jax.numpy as jnp
    import numpy as np

    from vl2_jax.config import PRESETS
    from vl2_jax.testing import hf_tensor_shapes, write_random_hf_checkpoint

    cfg = PRESETS[args.preset]
    size = sum(math.prod(s) for s in hf_tensor_shapes(cfg).values()) * np.dtype(jnp.dtype(args.dtype)).itemsize
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < 2.1 * size:
        sys.exit(f"{work} has {free / 1e9:.1f} GB free; this run needs about {2.1 * size / 1e9:.1f} GB.")
    src, dst = work / "hf", work / "orbax"
    try:
        t = time.time()
        write_random_hf_checkpoint(cfg, src, args.dtype, shards=args.shards)
        for f in FIXTURE.glob("*"):
            if f.name.startswith(("tokenizer", "processor")):
                shutil.copyfile(f, src / f.name)
        generate_s = time.time() - t
        print(f"generated {size / 1e9:.1f} GB in {generate_s:.0f} s", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "convert", str(src), str(dst)]
        run = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=REPO, env=repo_env(), stderr=subprocess.PIPE, text=True)
        sys.stderr.write(run.stderr)
        if run.returncode:
            sys.exit(f"conversion failed with status {run.returncode}")
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", run.stderr).group(1)
        seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
        out_gb = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) / 1e9
        print(json.dumps({
            "preset": args.preset, "shards": args.shards, "dtype": args.dtype, "checkpoint_gb": round(size / 1e9, 2),
            "output_gb": round(out_gb, 2), "generate_s": round(generate_s), "convert_wall_s": round(seconds),
            "peak_rss_gb": round(peak_kb * 1024 / 1e9, 2), "cpus": os.cpu_count(),
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "command": " ".join(["python", "-m", "convert", str(src), str(dst)]),
        }))
    finally:
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)


if __name__ == "__main__":
    main()
