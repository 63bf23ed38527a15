"""Where does the vision tower's time go, and which attention is fastest? (GPU)

    python benchmarks/vision_tower.py [--tiles 5]

Runs the SigLIP tower of the real preset (random bf16 weights) on `--tiles` 384x384 tiles with the
same parameters: the library's module with the plain einsum-softmax attention, with cuDNN flash
attention (the default on GPUs), and a functional copy with attention left out (a bound on what
attention costs). Prints one JSON line per variant with the median milliseconds and the cosine
similarity of its features to the plain path's (the fast path's check on the GPU). Then times the
attention alone, one layer's shapes chained `layers` times, in the forms cuDNN could take: the head dim
as it is (72 at the real sizes), zero-padded to a larger multiple of 8 (q k^T and the kept columns of
p v are unchanged), and XLA's own attention in bf16.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from vl2_jax.bench import median_time, pipelined_time
from vl2_jax.config import PRESETS
from vl2_jax.modules.vision import VisionTransformer


def _layer_norm(x, p, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]).astype(x.dtype)


def tower_without_attention(params, images, cfg):
    p, g = cfg.patch_size, cfg.grid
    x = images[:, :, : g * p, : g * p].astype(jnp.bfloat16).reshape(images.shape[0], 3, g, p, g, p)
    x = jnp.einsum("Icyhxw,chwC->IyxC", x, params["patch_w"]).reshape(images.shape[0], g * g, cfg.width)
    x = x + params["patch_b"] + params["pos_embed"]
    for i in range(cfg.layers):
        b = params[f"block_{i}"]
        h = _layer_norm(x, b["norm1"], cfg.layer_norm_eps)
        h = _layer_norm(x, b["norm2"], cfg.layer_norm_eps)
        h = jax.nn.gelu(jnp.einsum("IPC,CF->IPF", h, b["fc1_w"]) + b["fc1_b"], approximate=True)
        x = x + jnp.einsum("IPF,FC->IPC", h, b["fc2_w"]) + b["fc2_b"]
    return _layer_norm(x, params["norm"], cfg.layer_norm_eps)


def padded_cudnn(q, k, v, head: int):
    """cuDNN flash attention with the head dim zero-padded to `head`: same scores (the scale stays
    that of the real head dim), the padded output columns dropped."""
    d = q.shape[-1]
    pad = [(0, 0)] * 3 + [(0, head - d)]
    out = jax.nn.dot_product_attention(*(jnp.pad(t, pad) for t in (q, k, v)), scale=d**-0.5,
                                       implementation="cudnn")
    return out[..., :d]


def attention_rows(cfg, tiles: int) -> list[dict]:
    """Milliseconds for the tower's attention alone (one layer's q, k, v, `cfg.layers` calls chained)."""
    shape = (tiles, cfg.num_patches, cfg.heads, cfg.head_dim)
    q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
    forms = {"cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
             "xla bf16": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")}
    for head in (80, 96, 128):
        forms[f"cudnn, head padded to {head}"] = lambda q, k, v, head=head: padded_cudnn(q, k, v, head)
    ref = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))(q, k, v)
    rows = []
    for name, form in forms.items():
        def chained(q, k, v, form=form):
            for _ in range(cfg.layers):
                q = form(q, k, v)
            return q
        try:
            one = jax.jit(form)(q, k, v).astype(jnp.float32)
            cos = float((one * ref).sum() / jnp.linalg.norm(one) / jnp.linalg.norm(ref.astype(jnp.float32)))
            fn = jax.jit(chained)
            ms = 1e3 * pipelined_time(lambda fn=fn: fn(q, k, v))
            rows.append({"variant": f"attention only x{cfg.layers}: {name}", "ms": ms, "cosine_vs_xla": cos})
        except Exception as e:  # noqa: BLE001  (cuDNN refuses shapes it cannot run: report and go on)
            rows.append({"variant": f"attention only: {name}", "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tiles", type=int, default=5)
    a = ap.parse_args()
    cfg = PRESETS[a.model].vision
    images = jax.random.normal(jax.random.key(1), (a.tiles, 3, cfg.image_size, cfg.image_size), jnp.float32)
    params = jax.jit(VisionTransformer(cfg, jnp.bfloat16).init)(jax.random.key(0), images)
    variants = {f"library, attention={impl}": jax.jit(VisionTransformer(cfg, jnp.bfloat16, impl).apply)
                for impl in ("plain", "cudnn")}
    variants["no attention (bound)"] = jax.jit(lambda p, im: tower_without_attention(p["params"], im, cfg))
    base = variants["library, attention=plain"](params, images).astype(jnp.float32)
    for name, fn in variants.items():
        try:
            ms = 1e3 * median_time(lambda fn=fn: fn(params, images), 10)
            out = fn(params, images).astype(jnp.float32)
            cos = float((out * base).sum() / jnp.linalg.norm(out) / jnp.linalg.norm(base))
            row = {"variant": name, "ms": ms, "cosine_vs_plain": cos}
        except Exception as e:  # cuDNN refuses shapes it cannot run: report and go on
            row = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        row |= {"tiles": a.tiles, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
        print(json.dumps(row), flush=True)
    for row in attention_rows(cfg, a.tiles):
        print(json.dumps(row | {"tiles": a.tiles}), flush=True)


if __name__ == "__main__":
    main()
