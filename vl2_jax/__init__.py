"""DeepSeek-VL2 in JAX: a faithful, fast port of the official PyTorch implementation.

    import vl2_jax
    model = vl2_jax.load_pretrained("path/to/deepseek-vl2-tiny", dtype="bfloat16")
    one = model.processor([{"role": "user", "content": "<image>\\nDescribe it."}], ["cat.jpg"])
    batch = model.processor.batchify([one])
    logits = model.logits(batch)
"""

from vl2_jax.config import PRESETS, LanguageConfig, ProjectorConfig, VisionConfig, VL2Config
from vl2_jax.errors import CheckpointError, ConfigError, InputError, VL2Error
from vl2_jax.model import VL2Model, load_pretrained

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "LanguageConfig",
    "ProjectorConfig",
    "VL2Config",
    "VL2Error",
    "VL2Model",
    "VisionConfig",
    "load_pretrained",
]
