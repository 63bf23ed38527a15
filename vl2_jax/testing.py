"""Random checkpoints in the exact Hugging Face DeepSeek-VL2 layout, for tests and benchmarks.

`write_random_hf_checkpoint(PRESETS["small"], path, shards=4)` writes the 32 GB -small layout with
about 100 MB of memory: the safetensors files are written by hand (header, then each tensor's bytes
in chunks) instead of through `safetensors.save_file`, which needs every tensor in memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from vl2_jax.checkpoint import SAFETENSORS_DTYPES, conversion_plan
from vl2_jax.config import VL2Config

_ST_DTYPES = {ours: theirs for theirs, ours in SAFETENSORS_DTYPES.items()}
_CHUNK = 1 << 23  # elements generated at a time (32 MB of float32)


def hf_tensor_shapes(cfg: VL2Config, include_attn_pool: bool = True) -> dict[str, tuple[int, ...]]:
    """{checkpoint name: PyTorch shape} of a released checkpoint with this config, in checkpoint order.

    The names and shapes come from `conversion_plan(cfg)`; `vision.attn_pool.*` is SigLIP's pooling
    head, present in the released files but unused (C = vision width, F = vision MLP width).
    """
    shapes = {name: tuple(shape) for rule in conversion_plan(cfg) for name, shape in rule.sources}
    if not include_attn_pool:
        return shapes
    c, f = cfg.vision.width, cfg.vision.mlp_dim
    pool = {
        "latent": (1, 1, c), "q.weight": (c, c), "q.bias": (c,), "kv.weight": (2 * c, c), "kv.bias": (2 * c,),
        "proj.weight": (c, c), "proj.bias": (c,), "norm.weight": (c,), "norm.bias": (c,),
        "mlp.fc1.weight": (f, c), "mlp.fc1.bias": (f,), "mlp.fc2.weight": (c, f), "mlp.fc2.bias": (c,),
    }
    names = list(shapes)
    at = names.index("vision.norm.bias") + 1  # after the vision tower, before the projector
    items = list(shapes.items())
    return dict(items[:at] + [(f"vision.attn_pool.{k}", s) for k, s in pool.items()] + items[at:])


def _split(sizes: list[int], shards: int) -> list[int]:
    """Shard index of each tensor: contiguous runs of about equal bytes."""
    total, before, out = sum(sizes), 0, []
    for n in sizes:
        out.append(min(shards - 1, before * shards // total))
        before += n
    return out


def _write_safetensors(file: Path, shapes: dict[str, tuple[int, ...]], dtype, rng) -> None:
    """Writes one safetensors file of random normals (std 0.02; a norm's scale 1 plus them, so that the
    model's output depends on its input), tensor by tensor, chunk by chunk."""
    itemsize = np.dtype(dtype).itemsize
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": _ST_DTYPES[np.dtype(dtype).name], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        buf = np.empty(_CHUNK, np.float32)
        for name, shape in shapes.items():
            left = int(np.prod(shape))
            scale = name.endswith(".weight") and "norm" in name.split(".")[-2]
            while left:
                k = min(left, _CHUNK)
                x = buf[:k]
                rng.standard_normal(k, dtype=np.float32, out=x)
                x *= 0.02
                if scale:
                    x += 1.0
                f.write(x.astype(dtype).view(np.uint8))  # bfloat16 has no buffer format
                left -= k


def write_random_hf_checkpoint(
    cfg: VL2Config, path: str | Path, dtype="bfloat16", shards: int = 1, seed: int = 0, include_attn_pool: bool = True,
    assets: bool = False,
) -> Path:
    """Writes config.json and random weights (std 0.02) named and shaped like the released checkpoints.

    One `model.safetensors` when `shards == 1`, else `model-0000X-of-0000N.safetensors` and
    `model.safetensors.index.json`. With `assets`, also the processor and tokenizer files of `random:*`
    models (`load.write_assets`), so that the folder loads and converts as a released one does; without,
    none (copy them from a fixture). Returns the folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(jnp.dtype(dtype))
    if assets:
        from vl2_jax.load import write_assets

        write_assets(path, cfg)  # (its config.json is replaced below, with the dtype)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict() | {"torch_dtype": np_dtype.name}, indent=1) + "\n")
    shapes = hf_tensor_shapes(cfg, include_attn_pool)
    if shards < 1 or shards > len(shapes):
        raise ValueError(f"shards must be between 1 and {len(shapes)}, not {shards}")
    rng = np.random.default_rng(seed)
    if shards == 1:
        _write_safetensors(path / "model.safetensors", shapes, np_dtype, rng)
        return path
    sizes = [int(np.prod(s)) * np_dtype.itemsize for s in shapes.values()]
    owner = _split(sizes, shards)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for i, file in enumerate(files):
        _write_safetensors(path / file, {n: s for (n, s), o in zip(shapes.items(), owner, strict=True) if o == i}, np_dtype, rng)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": {n: files[o] for n, o in zip(shapes, owner, strict=True)}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return path
