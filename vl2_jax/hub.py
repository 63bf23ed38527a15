"""Resolve what users type as a model into a loaded `VL2Model`.

- `random:tiny|small|base|test`: random weights at that size with a byte-level tokenizer (offline).
- a local folder: a Hugging Face checkpoint or a `python -m convert` output.
- a Hugging Face hub id (`deepseek-ai/deepseek-vl2-tiny`): downloaded once through `huggingface_hub`
  into its cache, converted once into `$VL2_JAX_CACHE` (default `~/.cache/vl2_jax`), then loaded from
  the converted copy.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from vl2_jax.errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model"]


def cache_dir() -> Path:
    return Path(os.environ.get("VL2_JAX_CACHE", Path.home() / ".cache" / "vl2_jax"))


def load_model(
    spec: str, dtype, progress: Callable[[str], None] = lambda s: None, seed: int = 0, moe_impl: str = "auto",
    mesh=None, attention: str = "auto",
):
    """`spec` (see the module docstring) -> VL2Model in `dtype` ("bfloat16", "float32" or None), on one
    device or across `mesh` ("auto", "expert=4,tensor=2", ...; see `load_pretrained`)."""
    from vl2_jax.model import load_pretrained
    from vl2_jax.random_model import random_model

    start = time.perf_counter()
    if spec.startswith("random:"):
        progress(f"initialising random {spec[7:]} weights ...")
        model = random_model(spec[7:], dtype or "float32", seed, moe_impl, mesh, attention)
    elif Path(spec).exists() or not HUB_ID.match(spec):
        progress(f"loading {spec} ...")
        model = load_pretrained(spec, dtype, moe_impl, mesh, attention)
    else:
        model = load_pretrained(_converted_from_hub(spec, progress), dtype, moe_impl, mesh, attention)
    progress(f"model ready in {time.perf_counter() - start:.1f} s")
    return model


def _converted_from_hub(repo_id: str, progress) -> Path:
    from vl2_jax.orbax_io import convert_checkpoint, is_converted

    target = cache_dir() / repo_id.replace("/", "--")
    if is_converted(target):
        return target
    progress(f"downloading {repo_id} from the Hugging Face hub (once) ...")
    try:
        from huggingface_hub import snapshot_download

        source = snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS)
    except Exception as e:  # network, auth and not-found errors all come as different types
        raise CheckpointError(
            f"{repo_id} is not a local folder, and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); check the path or the hub id and your "
            "connection, or pass random:tiny."
        ) from None
    progress(f"converting {repo_id} to {target} (once) ...")
    convert_checkpoint(source, target, None, force=True, progress=progress)
    return target
