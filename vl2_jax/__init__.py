"""DeepSeek-VL2 in JAX: a faithful, fast port of the official PyTorch implementation.

    import vl2_jax
    model = vl2_jax.load_model("deepseek-ai/deepseek-vl2-tiny")   # or a folder, or "random:test"
    one = model.processor([{"role": "user", "content": "<image>\\nDescribe it."}], ["cat.jpg"])
    batch = model.processor.batchify([one])
    result = model.generate(batch, max_new_tokens=64)
"""

from vl2_jax.config import PRESETS, LanguageConfig, ProjectorConfig, Runtime, VisionConfig, VL2Config
from vl2_jax.errors import CheckpointError, ConfigError, InputError, VL2Error
from vl2_jax.load import load_model, load_pretrained
from vl2_jax.model import VL2Model

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
