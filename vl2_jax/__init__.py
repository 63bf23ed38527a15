"""DeepSeek-VL2 in JAX: a faithful, fast port of the official PyTorch implementation.

    import vl2_jax
    model = vl2_jax.load_model("deepseek-ai/deepseek-vl2-tiny")   # or a folder, or "random:test"
    one = model.processor([{"role": "user", "content": "<image>\\nDescribe it."}], ["cat.jpg"])
    batch = model.processor.batchify([one])
    result = model.generate(batch, max_new_tokens=64)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vl2_jax.config import PRESETS, LanguageConfig, ProjectorConfig, Runtime, VisionConfig, VL2Config
from vl2_jax.errors import CheckpointError, ConfigError, InputError, VL2Error

if TYPE_CHECKING:
    from vl2_jax.load import load_model, load_pretrained
    from vl2_jax.model import VL2Model

# Importing the package does not import JAX (a command can start reading a checkpoint first,
# `vl2_jax.prefetch`); these come from their modules on first use.
_LAZY = {"load_model": "vl2_jax.load", "load_pretrained": "vl2_jax.load", "VL2Model": "vl2_jax.model"}


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")  # a submodule, e.g. `vl2_jax.load.progress_bar`
    else:
        raise AttributeError(f"module 'vl2_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "LanguageConfig",
    "ProjectorConfig",
    "Runtime",
    "VL2Config",
    "VL2Error",
    "VL2Model",
    "VisionConfig",
    "load_model",
    "load_pretrained",
]
