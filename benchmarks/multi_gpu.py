"""One model on one GPU, then the same weights sharded over all visible GPUs: same greedy tokens?
Decode speed and memory per GPU of each. (GPU; random weights.)

    python benchmarks/multi_gpu.py --model small --mesh expert=2 --tokens 32

The weights are drawn once on the first device and then placed into the shards, so both runs use the
same values. Prints one JSON line per run and a comparison line.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vl2_jax.checkpoint import param_shapes
from vl2_jax.config import PRESETS
from vl2_jax.load import init_params, write_assets
from vl2_jax.model import VL2Model
from vl2_jax.processor import Processor
from vl2_jax.sharding import Layout, make_mesh


def run(model, batch, tokens):
    model.generate(batch, max_new_tokens=tokens, ignore_eos=True)
    r = model.generate(batch, max_new_tokens=tokens, ignore_eos=True)
    mem = [d.memory_stats().get("bytes_in_use", 0) / 1e9 if d.memory_stats() else 0 for d in jax.devices()]
    return r, {"decode_tokens_per_s": r.decode_tokens_per_s, "ttft_ms": 1e3 * r.ttft_s,
               "gb_in_use_per_device": [round(m, 2) for m in mem]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small")
    p.add_argument("--mesh", default="auto")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--image-size", type=int, default=768)
    args = p.parse_args()
    cfg, dtype = PRESETS[args.model], jnp.bfloat16
    import tempfile

    proc = Processor.from_pretrained(write_assets(tempfile.mkdtemp(), cfg))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.image_size,) * 2 + (3,), dtype=np.uint8))
    batch = proc.batchify([proc([{"role": "user", "content": "<image>\nDescribe this image."}], [image])])
    params = init_params(cfg, dtype)
    r1, one = run(VL2Model(cfg, params, proc, dtype), batch, args.tokens)
    print(json.dumps({"model": args.model, "layout": "1 device", **one}), flush=True)
    mesh = make_mesh(args.mesh, cfg)
    shardings = Layout(mesh).param_shardings(param_shapes(cfg, dtype))
    sharded = jax.device_put(params, shardings)
    del params
    r2, many = run(VL2Model(cfg, sharded, proc, dtype, mesh=mesh), batch, args.tokens)
    print(json.dumps({"model": args.model, "layout": str(dict(mesh.shape)), **many}), flush=True)
    same = r1.token_ids == r2.token_ids
    first_diff = next((i for i, (a, b) in enumerate(zip(r1.token_ids[0], r2.token_ids[0])) if a != b), None)
    print(json.dumps({"model": args.model, "greedy_tokens_equal": same, "first_difference_at": first_diff,
                      "devices": len(jax.devices()), "device": jax.devices()[0].device_kind, "jax": jax.__version__}))


if __name__ == "__main__":
    main()
