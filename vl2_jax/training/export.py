"""Trained parameters -> a model folder that `load_model` and `python -m generate --model` read, and
the Hugging Face safetensors layout that the official PyTorch code loads.

`write_hf` inverts the conversion (`checkpoint.to_hf`) into `model.safetensors`, with config.json and
the tokenizer and processor files, and restores what conversion drops: the vision tower's unused
`attn_pool` head, copied from the source checkpoint where it has one, else zeros (the official model
builds it, never calls it). `save_model` converts that folder (`orbax_io.convert_checkpoint`) and moves
the result into the output folder, beside whatever else the folder holds (the train state, the
adapters): the manifest goes in last, so an interrupted save never leaves a folder `load_model` takes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from vl2_jax.checkpoint import SafetensorsFolder, to_hf
from vl2_jax.config import VL2Config
from vl2_jax.errors import CheckpointError, InputError, some
from vl2_jax.load import write_assets
from vl2_jax.orbax_io import COPIED_FILES, MANIFEST, convert_checkpoint
from vl2_jax.testing import hf_tensor_shapes

ATTN_POOL = "vision.attn_pool."
HF_INDEX = "model.safetensors.index.json"


def weight_files(folder: str | Path) -> list[Path]:
    """The Hugging Face weight files in `folder` (its *.safetensors and the shard index), sorted; none
    where it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name == HF_INDEX))


def _attn_pool(cfg: VL2Config, source: Path | None) -> dict[str, np.ndarray]:
    shapes = {n: s for n, s in hf_tensor_shapes(cfg).items() if n.startswith(ATTN_POOL)}
    try:
        folder = SafetensorsFolder(source) if source is not None else None
    except CheckpointError:  # a converted folder: no safetensors, the head was dropped
        folder = None
    have = set(folder.names()) if folder is not None else set()
    return {n: (folder.get(n) if n in have else np.zeros(s, np.float32)) for n, s in shapes.items()}


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict | None = None) -> None:
    """safetensors' `save_file`, the file then readable as the umask allows (as every other file a run
    writes): safetensors 0.8 leaves it readable by its owner only."""
    from safetensors.numpy import save_file

    save_file({n: np.ascontiguousarray(a) for n, a in tensors.items()}, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (`os.umask` sets it, for a
    moment, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_hf(cfg: VL2Config, params: dict, dst: str | Path, source: Path | None, dtype=None) -> Path:
    """`params` ({"params": tree}) as a Hugging Face DeepSeek-VL2 folder `dst` (created; must not hold
    weights yet, `weight_files`: else InputError): model.safetensors in `dtype` (default: the
    parameters'), config and tokenizer files from `source` (a folder; None: a random model's,
    `write_assets`)."""
    dst = Path(dst)
    if held := weight_files(dst):
        raise InputError(f"{dst} already holds weights ({some([p.name for p in held], 3)}); remove them or choose another folder.")
    dst.mkdir(parents=True, exist_ok=True)
    if source is None:
        write_assets(dst, cfg)
    else:
        for name in COPIED_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, dst / name)
    host = jax.device_get(params)
    tensors = {**to_hf(cfg, host), **_attn_pool(cfg, source)}
    want = np.dtype(dtype) if dtype is not None else np.asarray(jax.tree.leaves(host)[0]).dtype
    _save_safetensors({n: a.astype(want) for n, a in tensors.items()}, dst / "model.safetensors", {"format": "pt"})
    return dst


def replace_into(staged: Path, dst: Path) -> None:
    """Moves the files of `staged` (a `write_hf` folder, written in full first) into the folder `dst`,
    whose weight files (`weight_files`) go first, so no shard of an older export stays beside the new
    model.safetensors; other files of `dst` stay unless `staged` has one of that name. `staged` goes."""
    dst.mkdir(parents=True, exist_ok=True)
    for file in weight_files(dst):
        file.unlink()
    for entry in staged.iterdir():
        os.replace(entry, dst / entry.name)
    staged.rmdir()


def save_model(cfg: VL2Config, params: dict, out: str | Path, source: Path | None, dtype=None) -> Path:
    """`params` as a converted checkpoint in the folder `out` (kept: files the checkpoint does not
    write stay), loadable by `load_model(out)`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as tmp:
        hf = write_hf(cfg, params, Path(tmp) / "hf", source, dtype)
        converted = Path(tmp) / "converted"
        convert_checkpoint(hf, converted, dtype)
        manifest = json.loads((converted / MANIFEST).read_text())
        manifest["source"] = None if source is None else str(Path(source).resolve())  # (not the temporary folder)
        (converted / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        (out / MANIFEST).unlink(missing_ok=True)
        for entry in converted.iterdir():
            if entry.name == MANIFEST:
                continue
            target = out / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
        os.replace(converted / MANIFEST, out / MANIFEST)
    return out


def save_adapters(adapters: dict, folder: str | Path, config: dict) -> Path:
    """LoRA adapters ({key: array}, `lora`'s keys) as `adapters.safetensors` and `adapter_config.json`
    (rank, alpha, parts) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_safetensors({k: np.asarray(v) for k, v in jax.device_get(adapters).items()}, folder / "adapters.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


def load_adapters(folder: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(adapters, config) as `save_adapters` wrote them."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    return load_file(str(folder / "adapters.safetensors")), json.loads((folder / "adapter_config.json").read_text())
