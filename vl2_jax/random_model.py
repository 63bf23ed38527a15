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


def init_params(cfg: VL2Config, dtype, seed: int = 0, shardings: dict | None = None) -> dict:
    """Random parameters `{"params": ...}` drawn on the default device: normal(0.02) weights, norm scales 1,
    biases 0. Shapes come from tracing the model (`eval_shape`), so nothing but the draws is compiled.
    With `shardings` (a params-like tree of Shardings) every leaf is drawn directly in its shards."""
    from vl2_jax.modules.vl2 import VL2

    s, t = cfg.vision.image_size, 4
    args = (
        jnp.zeros((1, t), jnp.int32), jnp.zeros((1, 3, s, s), dtype), jnp.zeros((1, t), jnp.int32),
        jnp.zeros((1, t), bool), jnp.zeros((1, t), jnp.int32), jnp.ones((1, t), bool),
    )
    shapes = jax.eval_shape(VL2(cfg, dtype).init, jax.random.key(seed), *args)
    return draw_like(shapes, seed, shardings)


def draw_like(shapes, seed: int = 0, shardings: dict | None = None):
    """Random arrays shaped as the tree `shapes` (of `jax.ShapeDtypeStruct`s), by `init_params`' rules."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(shapes)[0])
    keys = jax.random.split(jax.random.key(seed, impl="unsafe_rbg"), len(leaves))  # RngBitGenerator: quick to compile
    out = []
    # One small jitted draw per leaf (compiled once per distinct shape): a single jit over every leaf
    # takes minutes to compile at the real sizes.
    targets = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
    for path, leaf, key, sharding in zip(paths, leaves, keys, targets):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        kind = "ones" if name == "scale" else "zeros" if name.endswith(("_b", "bias")) else "normal"
        out.append(_draw(kind, leaf.shape, jnp.dtype(leaf.dtype), sharding)(key))
    return jax.tree.unflatten(jax.tree.structure(shapes), out)


@functools.cache
def _draw(kind: str, shape, dtype, sharding):
    def draw(key):
        if kind == "normal":
            return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        return (jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype)

    return jax.jit(draw, out_shardings=sharding)


def random_model(name: str, dtype="float32", seed: int = 0, moe_impl: str = "auto", mesh=None, attention: str = "auto"):
    """A `VL2Model` with random weights at a preset size ("tiny", "small", "base", "test"), on one device
    or across `mesh` (see `load_pretrained`)."""
    from vl2_jax.checkpoint import param_shapes
    from vl2_jax.model import VL2Model, resolve_dtype
    from vl2_jax.processor import Processor
    from vl2_jax.sharding import Layout, make_mesh

    if name not in PRESETS:
        raise ConfigError(f"unknown random model size {name!r}; use one of {', '.join(PRESETS)}.")
    cfg = PRESETS[name]
    dtype = resolve_dtype(dtype) or jnp.float32
    folder = write_assets(Path(tempfile.mkdtemp(prefix=f"vl2-random-{name}-")), cfg)
    mesh = make_mesh(mesh, cfg)
    shardings = Layout(mesh).param_shardings(param_shapes(cfg, dtype)) if mesh is not None else None
    params = init_params(cfg, dtype, seed, shardings)
    return VL2Model(cfg, params, Processor.from_pretrained(folder), dtype, moe_impl, mesh, attention)
