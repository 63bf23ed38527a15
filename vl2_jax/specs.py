"""Model specs (what a user types as a model) and where their files are on disk.

No JAX here: a command asks where its model's files are before it imports JAX (`vl2_jax.prefetch`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model"]


def cache_home() -> Path:
    """`$XDG_CACHE_HOME` where set, else `~/.cache`: the folder this package's caches go under."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def cache_dir() -> Path:
    """Where hub checkpoints are converted to: `$VL2_JAX_CACHE`, default `~/.cache/vl2_jax` (`cache_home`)."""
    return Path(os.environ.get("VL2_JAX_CACHE") or cache_home() / "vl2_jax")


def is_hub_id(spec: str) -> bool:
    """True iff `spec` names a Hugging Face hub repository rather than something on this disk."""
    return not Path(spec).exists() and HUB_ID.match(spec) is not None


def hub_folder(repo_id: str) -> Path:
    """Where a hub checkpoint's converted copy lives (whether or not it is there yet)."""
    return cache_dir() / repo_id.replace("/", "--")


def folder_of(spec: str) -> Path | None:
    """The folder a spec loads from: the folder itself, the converted copy of a hub id, or None for
    `random:*` (no files)."""
    if spec.startswith("random:"):
        return None
    return hub_folder(spec) if is_hub_id(spec) else Path(spec)
