"""The prefix cache's slot moves on a model's whole KV cache: the engine's swap and copy of two slots'
rows (`vl2_jax.engine.SLOT_MOVES`: one scatter of the gathered rows, in place) against a swap written as
two row writes, the second reading the row the first overwrote (the form before 7b9d817, which made XLA
copy every cache array twice). Each form runs as one donated program over every cache array, as the
engine's does; the table gives its median time and the copy and convert operations in its optimized
program (a copy or a convert of a cache array is whole-cache traffic).

    python benchmarks/slot_moves.py --model tiny --slots 64 --capacity 4096          # on a GPU
    python benchmarks/slot_moves.py --model tiny --slots 4 --capacity 256 --dtype float32   # CPU

On a CPU in bfloat16 every form converts the cache to float32 and back (XLA's CPU backend has no
bfloat16 scatter), so the CPU comparison is made in float32.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["test", "tiny", "small", "base"], help="the preset whose cache (default tiny)")
    p.add_argument("--slots", type=int, default=64, help="max_batch (default 64)")
    p.add_argument("--capacity", type=int, default=4096, help="tokens per slot (default 4096)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from vl2_jax.cache import KVCache
    from vl2_jax.engine import SLOT_MOVES
    from vl2_jax.load import preset

    def two_row_writes(v, a, b):
        at = lambda i: jax.lax.dynamic_slice_in_dim(v, i, 1, 0)  # noqa: E731
        swapped_a = jax.lax.dynamic_update_slice_in_dim(v, at(b), a, 0)
        return jax.lax.dynamic_update_slice_in_dim(swapped_a, jax.lax.dynamic_slice_in_dim(v, a, 1, 0), b, 0)

    cache = KVCache.zeros(preset(args.model).language, args.slots, args.capacity, jnp.dtype(args.dtype))
    gb = sum(v.nbytes for v in jax.tree.leaves(cache)) / 1e9
    forms = {"swap, two row writes (before)": two_row_writes, "swap (engine)": SLOT_MOVES["swap"],
             "copy (engine)": SLOT_MOVES["copy"]}
    for name, move in forms.items():
        program = jax.jit(lambda c, a, b, move=move: jax.tree.map(lambda v: move(v, a, b), c), donate_argnums=(0,))
        hlo = program.lower(cache, np.int32(0), np.int32(1)).compile().as_text()
        cache = jax.block_until_ready(program(cache, np.int32(0), np.int32(1)))
        times = []
        for i in range(args.repeats):
            start = time.perf_counter()
            cache = jax.block_until_ready(program(cache, np.int32(i % args.slots), np.int32((i + 1) % args.slots)))
            times.append(time.perf_counter() - start)
        print(json.dumps({"form": name, "model": args.model, "slots": args.slots, "capacity": args.capacity,
                          "dtype": args.dtype, "cache_gb": round(gb, 3), "median_ms": round(float(np.median(times)) * 1e3, 3),
                          "min_ms": round(min(times) * 1e3, 3), "copies": hlo.count(" copy("),
                          "converts": hlo.count(" convert("), "device": jax.devices()[0].device_kind}), flush=True)


if __name__ == "__main__":
    main()
