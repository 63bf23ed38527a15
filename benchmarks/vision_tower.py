"""Where does the vision tower's time go, and would cuDNN attention help? (GPU)

    python benchmarks/vision_tower.py [--tiles 5]

Runs the SigLIP tower of the real preset (random bf16 weights) on `--tiles` 384x384 tiles with the
same parameters: the library's module with the plain einsum-softmax attention, with cuDNN flash
attention (the default on GPUs), and a functional copy with attention left out (a bound on what
attention costs). Prints one JSON line per variant with the median milliseconds and the cosine
similarity of its features to the plain path's (the fast path's check on the GPU).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from vl2_jax.bench import median_time
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


if __name__ == "__main__":
    main()
