"""Models with random weights at any preset size, for offline runs, tests and benchmarks.

`random_model("tiny" | "small" | "base" | "test")` needs no download: weights are drawn on the device and
the tokenizer is a byte-level BPE without merges (one token per byte) that carries DeepSeek-VL2's special
tokens at the ids the config expects, written with the `tokenizers` library into a folder next to the
config and processor files, so everything loads through the same code as a real checkpoint.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from vl2_jax.config import PRESETS, VL2Config
from vl2_jax.errors import ConfigError

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPECIAL = ("<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>")


def write_tokenizer(folder: Path, cfg: VL2Config) -> None:
    """tokenizer.json + tokenizer_config.json: bytes and special tokens, bos/eos at the config's ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    lc = cfg.language
    vocab = {BOS: lc.bos_token_id, EOS: lc.eos_token_id}
    free = (i for i in range(lc.vocab_size) if i not in vocab.values())
    for token in (PAD, *SPECIAL, *sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[token] = next(free)
    if max(vocab.values()) >= lc.vocab_size:
        raise ConfigError(f"vocab_size {lc.vocab_size} is too small for the random tokenizer ({len(vocab)} tokens).")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, PAD, *SPECIAL)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "model_max_length": lc.max_position_embeddings}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))


def write_assets(folder: str | Path, cfg: VL2Config) -> Path:
    """config.json, processor_config.json and the tokenizer files of a random model, in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=1))
    processor = {
        "candidate_resolutions": [list(r) for r in cfg.candidate_resolutions],
        "patch_size": cfg.vision.patch_size,
        "downsample_ratio": cfg.projector.downsample_ratio,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "normalize": True,
        "image_token": "<image>",
        "pad_token": PAD,
        "sft_format": "deepseek",
    }
    (folder / "processor_config.json").write_text(json.dumps(processor, ensure_ascii=False, indent=1))
    write_tokenizer(folder, cfg)
    return folder


def init_params(cfg: VL2Config, dtype, seed: int = 0) -> dict:
    """Random parameters `{"params": ...}` drawn on the default device: normal(0.02) weights, norm scales 1,
    biases 0. Shapes come from tracing the model (`eval_shape`), so nothing but the draws is compiled."""
    from vl2_jax.modules.vl2 import VL2

    s, t = cfg.vision.image_size, 4
    args = (
        jnp.zeros((1, t), jnp.int32), jnp.zeros((1, 3, s, s), dtype), jnp.zeros((1, t), jnp.int32),
        jnp.zeros((1, t), bool), jnp.zeros((1, t), jnp.int32), jnp.ones((1, t), bool),
    )
    shapes = jax.eval_shape(VL2(cfg, dtype).init, jax.random.key(seed), *args)
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(shapes)[0])
    keys = jax.random.split(jax.random.key(seed, impl="unsafe_rbg"), len(leaves))  # RngBitGenerator: quick to compile
    out = []
    # One small jitted draw per leaf (compiled once per distinct shape): a single jit over every leaf
    # takes minutes to compile at the real sizes.
    for path, leaf, key in zip(paths, leaves, keys):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            out.append(jnp.ones(leaf.shape, leaf.dtype))
        elif name.endswith(("_b", "bias")):
            out.append(jnp.zeros(leaf.shape, leaf.dtype))
        else:
            out.append(_normal(key, leaf.shape, leaf.dtype))
    return jax.tree.unflatten(jax.tree.structure(shapes), out)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_model(name: str, dtype="float32", seed: int = 0, moe_impl: str = "auto"):
    """A `VL2Model` with random weights at a preset size ("tiny", "small", "base", "test")."""
    from vl2_jax.model import VL2Model, resolve_dtype
    from vl2_jax.processor import Processor

    if name not in PRESETS:
        raise ConfigError(f"unknown random model size {name!r}; use one of {', '.join(PRESETS)}.")
    cfg = PRESETS[name]
    dtype = resolve_dtype(dtype) or jnp.float32
    folder = write_assets(Path(tempfile.mkdtemp(prefix=f"vl2-random-{name}-")), cfg)
    return VL2Model(cfg, init_params(cfg, dtype, seed), Processor.from_pretrained(folder), dtype, moe_impl)
