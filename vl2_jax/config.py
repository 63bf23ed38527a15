"""Frozen, typed configuration of DeepSeek-VL2, read from a Hugging Face `config.json`.

`VL2Config.from_hf_dict` is the one place that translates the checkpoint's JSON. Absent keys take the
reference's defaults (`VisionEncoderConfig`, `MlpProjectorConfig` and `DeepseekV2Config` of the official
code). Values we do not implement, and keys the official code reads that we do not implement
(`_STRUCTURAL`), are refused with a `ConfigError` that names the key; any other key we do not know is
ignored with one `warnings.warn` per section naming it, since the official code does not read it either.
`VL2Config.check_candidate_resolutions` checks a processor's tile canvases against the vision tower.
Presets: `PRESETS["tiny" | "small" | "base"]` are the released models, `PRESETS["test"]` is a small model
with distinct sizes for tests and offline runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import warnings
from pathlib import Path
from typing import Any

from vl2_jax.errors import ConfigError

# The routed experts' dispatches (`vl2_jax.modules.moe.MoE`); here so that the command line can check
# --moe without importing jax.
MOE_IMPLS = ("auto", "dense", "gather", "grouped", "ragged", "blocked")
# How attention runs, in the vision tower and the language model: "plain" is the reference's einsums and
# float32 softmax, "cudnn" and "xla" are `jax.nn.dot_product_attention`'s implementations, "auto" picks
# cuDNN where it applies (`modules/attention.py`, `modules/vision.py`).
ATTENTION_IMPLS = ("auto", "plain", "cudnn", "xla")
# The compute dtypes a model runs in, by name (values: numpy-compatible scalar types; jnp.bfloat16 is
# ml_dtypes' bfloat16, which numpy understands too).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Weight-only quantization of the language model (`vl2_jax.quant`); here for the command lines' --quant.
QUANTS = ("none", "int8", "fp8")
MAX_DECODE_STEPS = 1024  # tokens a decode call may run (`Runtime.decode_steps`)


def dtype_of(name_or_dtype):
    """A dtype name ("float32", "bfloat16", "float16") or a dtype -> its numpy-compatible scalar type;
    None stays None. An unknown name is a `ConfigError`."""
    import ml_dtypes
    import numpy as np

    if name_or_dtype is None:
        return None
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in DTYPE_NAMES:
            raise ConfigError(f"unknown dtype {name_or_dtype!r}; use one of {', '.join(DTYPE_NAMES)}.")
        return ml_dtypes.bfloat16 if name_or_dtype == "bfloat16" else np.dtype(name_or_dtype).type
    return np.dtype(name_or_dtype).type


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the model runs, never what it computes: every runtime choice in one explicit value.

    moe: the routed experts' dispatch (`MOE_IMPLS`): "auto" picks per token count (`modules/moe.py`),
      "dense" is the plain reference path (every expert on every token).
    attention: `ATTENTION_IMPLS`: "auto" runs cuDNN flash attention for prompts and the vision tower on
      NVIDIA GPUs in bf16/f16, and decoding through the decode attention kernel where it runs
      (`modules.attention.ragged_decode`); "plain" the reference's arithmetic everywhere.
    kernels: whether accelerator kernels (`vl2_jax.kernels`: Pallas grouped matmul, matrix-vector and
      decode attention kernels, cuDNN attention under "auto") may run where they apply; False runs the
      portable paths.
    max_batch: the engine's decode slots (requests decoded together; a larger batch runs in waves).
    max_seq_len: tokens per slot, prompt and answer together (None: the model's context).
    prefill_chunks: the lengths a prompt is written into the cache in, each a compiled program: a prompt
      runs as one chunk, the smallest that holds it (padded to a longer one only in a row that a call of
      longer prompts pads anyway), or, longer than the largest, in chunks of the largest and then the
      smallest that covers the rest (less memory for activations).
    prefill_tokens: how many tokens one prefill call may hold beyond a single prompt's chunk: the first
      chunks of one length of several waiting prompts go through the model together (in row counts of
      1, 2, 4, ... up to max_batch; shorter ones fill rows the count pads) while their rows times that
      chunk fit in it, and their later chunks of one length in calls of one or `engine.EXTEND_ROWS`
      (4) prompts (fewer pad; where 4 such chunks fit in it and max_batch is 4 or more); a lone chunk
      may be longer. Bounds the prefill's activation memory with the
      chunks; 0: one prompt per call. The server's scheduler also takes it as the prompt tokens
      prefilled between two decode calls.
    prefix_cache: whether a prompt may continue from the cache entries a slot kept of an earlier one
      (the server's prefix cache): the engine then also compiles prefill chunks that start past a
      cached prefix (chunks of up to `CONTINUED_CHUNK_MAX` tokens).
    decode_steps: tokens per decode call over up to 8 live slots (half as many over 9-16, a quarter
      beyond; `engine.decode_steps`; at most `MAX_DECODE_STEPS`, and a slot's tokens). A prompt that
      arrives waits for the call under way: fewer steps shorten that wait, more let the host's time
      between calls weigh less. Answers do not depend on it.

    `Runtime.plain()` is the reference path the fast paths are tested against.
    """

    moe: str = "auto"
    attention: str = "auto"
    kernels: bool = True
    max_batch: int = 8
    max_seq_len: int | None = None
    prefill_chunks: tuple[int, ...] = (128, 256, 512, 768, 1024, 1280, 1536, 2048, 3072, 4096)
    prefill_tokens: int = 8192
    prefix_cache: bool = False
    decode_steps: int = 16

    def __post_init__(self):
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1
        if not whole(self.max_batch):
            raise ConfigError(f"max_batch must be a whole number of at least 1 (got {self.max_batch!r}).")
        if not (whole(self.decode_steps) and self.decode_steps <= MAX_DECODE_STEPS):
            raise ConfigError(f"decode_steps must be a whole number from 1 to {MAX_DECODE_STEPS} (got "
                              f"{self.decode_steps!r}): a decode call runs all its steps before any token "
                              "streams or a new prompt starts.")
        if self.max_seq_len is not None and not (whole(self.max_seq_len) and self.max_seq_len >= 2):
            raise ConfigError(f"max_seq_len must be a whole number of at least 2 (got {self.max_seq_len!r}).")
        if not (isinstance(self.prefill_tokens, int) and not isinstance(self.prefill_tokens, bool)
                and self.prefill_tokens >= 0):
            raise ConfigError(f"prefill_tokens must be a whole number, 0 or more (got {self.prefill_tokens!r}).")
        chunks = tuple(self.prefill_chunks)
        if not chunks or not all(whole(c) for c in chunks):
            raise ConfigError(f"prefill_chunks must be whole numbers of at least 1 (got {self.prefill_chunks!r}).")
        object.__setattr__(self, "prefill_chunks", tuple(sorted(set(chunks))))
        if self.moe not in MOE_IMPLS:
            raise ConfigError(f"unknown MoE dispatch {self.moe!r}; use one of {', '.join(MOE_IMPLS)}.")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"unknown attention {self.attention!r}; use one of {', '.join(ATTENTION_IMPLS)}.")
        for name in ("kernels", "prefix_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Runtime.{name} must be True or False (got {getattr(self, name)!r}).")

    @classmethod
    def plain(cls) -> Runtime:
        """The reference's arithmetic: dense experts, plain attention, no kernels."""
        return cls(moe="dense", attention="plain", kernels=False)


def check_runtime_type(runtime) -> None:
    """Raises TypeError unless `runtime` is a `Runtime` (a dict of its fields is not one)."""
    if not isinstance(runtime, Runtime):
        raise TypeError(f"runtime must be a vl2_jax.Runtime, not {type(runtime).__name__}")


# Keys that Hugging Face's `PretrainedConfig` (4.x and 5.x) writes into any config.json. They carry no
# model structure (generation defaults, bookkeeping), so they are accepted and ignored.
_HF_GENERIC_KEYS = frozenset(
    """_attn_implementation _commit_hash _name_or_path add_cross_attention architectures auto_map
    bad_words_ids begin_suppress_tokens chunk_size_feed_forward cross_attention_hidden_size
    decoder_start_token_id diversity_penalty do_sample dtype early_stopping encoder_no_repeat_ngram_size
    exponential_decay_length_penalty finetuning_task forced_bos_token_id forced_eos_token_id id2label
    is_decoder is_encoder_decoder label2id length_penalty max_length min_length model_type
    no_repeat_ngram_size num_beam_groups num_beams num_return_sequences output_attentions
    output_hidden_states output_scores pad_token_id prefix problem_type pruned_heads
    remove_invalid_values repetition_penalty return_dict return_dict_in_generate sep_token_id
    suppress_tokens task_specific_params temperature tf_legacy_loss tie_encoder_decoder
    tokenizer_class top_k top_p torch_dtype torchscript transformers_version typical_p use_bfloat16
    use_cache""".split()
)


# Structural keys this port does not implement, per section: keys that the official code reads to build
# the model (deepseek-ai/DeepSeek-VL2 `deepseek_vl2/models/`: the config classes and `DeepseekVLV2ForCausalLM`
# in modeling_deepseek_vl_v2.py, modeling_deepseek.py with transformers 4.38's LlamaAttention for MHA, the
# `VisionTransformer` arguments of siglip_vit.py; processing_deepseek_vl_v2.py reads processor_config.json,
# not this file). Ignoring one could silently change the model, so `_take` refuses them. Every other key
# those files read is known or deliberately ignored by the `from_hf_dict`s below, hence the empty sets.
# A key they do not read (also `num_labels`: only a classification head that VL2 never builds reads it)
# is warned about and ignored, as the official code ignores it.
_STRUCTURAL = {
    "config.json": frozenset({
        "aligner",  # the tile-indicator embeddings' width (`aligner.params.n_embed`) of the 1D tile tag
        "quantization_config",  # quantized weights: transformers' loader, which the official classes use
    }),
    "vision_config": frozenset(),
    "projector_config": frozenset(),
    "language_config": frozenset(),
}


def _take(section: str, raw: dict, known: dict[str, Any], ignored: frozenset[str]) -> dict[str, Any]:
    """Returns `known` updated with `raw`. A key that is neither known, nor ignored, nor generic HF
    bookkeeping is refused (ConfigError) if the official code reads it (`_STRUCTURAL`), else ignored with
    one warning naming the section and the key(s)."""
    unknown = sorted(set(raw) - set(known) - ignored - _HF_GENERIC_KEYS)
    structural = [k for k in unknown if k in _STRUCTURAL[section]]
    if structural:
        raise ConfigError(
            f"{section}: key(s) {', '.join(structural)} change how the official DeepSeek-VL2 code builds the model, "
            "and this port does not implement them, so it refuses to guess."
        )
    if unknown:
        warnings.warn(
            f"{section}: unknown key(s) {', '.join(unknown)}; ignored (the official DeepSeek-VL2 code does not "
            "read them either).",
            stacklevel=3,
        )
    return {**known, **{k: v for k, v in raw.items() if k in known}}


def _require(condition: bool, key: str, value: Any, supported: str) -> None:
    if not condition:
        raise ConfigError(f"config value {key}={value!r} is not supported ({supported}).")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP ViT. Defaults are the reference's `VisionEncoderConfig` defaults."""

    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        """Patches per side: the conv drops the remainder (384 // 14 = 27)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @classmethod
    def from_hf_dict(cls, raw: dict) -> VisionConfig:
        ignored = frozenset(
            "model_name global_pool ignore_head class_token num_classes weight_init deterministic "
            "num_recomputing_layers use_checkpoint".split()
        )
        known = {f.name: f.default for f in dataclasses.fields(cls) if f.name != "layer_norm_eps"}
        values = _take("vision_config", raw, known, ignored)
        _require(raw.get("class_token", False) is False, "vision_config.class_token", raw.get("class_token"), "no class token")
        _require(raw.get("ignore_head", True) is True, "vision_config.ignore_head", raw.get("ignore_head"), "the pooling head is unused")
        cfg = cls(**values)
        _require(cfg.width % cfg.heads == 0, "vision_config.heads", cfg.heads, "must divide width")
        return cfg


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """`downsample_mlp_gelu` projector: 2x2 unfold, Linear, GELU(erf), Linear."""

    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2

    @property
    def hidden_dim(self) -> int:
        return self.n_embed * self.mlp_ratio

    @classmethod
    def from_hf_dict(cls, raw: dict) -> ProjectorConfig:
        known = {f.name: f.default for f in dataclasses.fields(cls)} | {"projector_type": "downsample_mlp_gelu", "token_pooling": False}
        values = _take("projector_config", raw, known, frozenset())
        _require(values.pop("projector_type") == "downsample_mlp_gelu", "projector_config.projector_type", raw.get("projector_type"), "only downsample_mlp_gelu")
        _require(not values.pop("token_pooling"), "projector_config.token_pooling", raw.get("token_pooling"), "only False")
        cfg = cls(**values)
        _require(cfg.depth == 2, "projector_config.depth", cfg.depth, "only 2, as in the released models")
        _require(cfg.downsample_ratio == 2, "projector_config.downsample_ratio", cfg.downsample_ratio, "only 2, as in the released models")
        return cfg


@dataclasses.dataclass(frozen=True)
class LanguageConfig:
    """DeepSeek-V2 language model. Defaults are the reference's `DeepseekV2Config` defaults."""

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "gready"  # sic: the reference's default; refused below for MoE models
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    use_mla: bool = True
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    # The sequence-level (seq_aux) or token-level expert balance loss that fine-tuning adds, times
    # aux_loss_alpha, to the objective (`training.loss.balance_loss`); never used at inference.
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True

    @property
    def head_dim(self) -> int:
        """MHA head dim (Llama attention: hidden // heads)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def q_head_dim(self) -> int:
        """MLA query/key head dim: nope + rope."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.n_routed_experts is not None
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )

    @classmethod
    def from_hf_dict(cls, raw: dict) -> LanguageConfig:
        ignored = frozenset(
            "ep_size initializer_range pretraining_tp attention_dropout "
            "lm_head rm_head".split()
        )
        extra = {"hidden_act": "silu", "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": False}
        known = {f.name: f.default for f in dataclasses.fields(cls)} | extra
        values = _take("language_config", raw, known, ignored)
        _require(values.pop("hidden_act") == "silu", "language_config.hidden_act", raw.get("hidden_act"), "only silu")
        _require(values.pop("rope_scaling") is None, "language_config.rope_scaling", raw.get("rope_scaling"), "only null: no RoPE scaling is implemented")
        _require(values.pop("attention_bias") is False, "language_config.attention_bias", raw.get("attention_bias"), "only false")
        _require(values.pop("tie_word_embeddings") is False, "language_config.tie_word_embeddings", raw.get("tie_word_embeddings"), "only false")
        if values["num_key_value_heads"] is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        values["rms_norm_eps"] = float(values["rms_norm_eps"])
        values["aux_loss_alpha"] = float(values["aux_loss_alpha"])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _require(self.aux_loss_alpha >= 0, "language_config.aux_loss_alpha", self.aux_loss_alpha, "at least 0")
        _require(isinstance(self.seq_aux, bool), "language_config.seq_aux", self.seq_aux, "true or false")
        if self.n_routed_experts is not None:
            _require(
                self.topk_method in ("greedy", "group_limited_greedy", "noaux_tc"),
                "language_config.topk_method", self.topk_method, "greedy, group_limited_greedy or noaux_tc",
            )
            _require(self.scoring_func in ("softmax", "sigmoid"), "language_config.scoring_func", self.scoring_func, "softmax or sigmoid")
            _require(self.num_experts_per_tok is not None, "language_config.num_experts_per_tok", None, "required with experts")
            if self.topk_method != "greedy":
                _require(
                    self.n_group is not None and self.n_routed_experts % self.n_group == 0,
                    "language_config.n_group", self.n_group, "must divide n_routed_experts",
                )
                _require(self.topk_group is not None and self.topk_group <= self.n_group, "language_config.topk_group", self.topk_group, "at most n_group")
        if self.use_mla:
            _require(self.kv_lora_rank is not None, "language_config.kv_lora_rank", None, "required with use_mla")
            _require(self.qk_rope_head_dim % 2 == 0, "language_config.qk_rope_head_dim", self.qk_rope_head_dim, "must be even")
        else:
            _require(self.hidden_size % self.num_attention_heads == 0, "language_config.num_attention_heads", self.num_attention_heads, "must divide hidden_size")
            _require(self.num_attention_heads % self.num_key_value_heads == 0, "language_config.num_key_value_heads", self.num_key_value_heads, "must divide num_attention_heads")


@dataclasses.dataclass(frozen=True)
class VL2Config:
    """The whole model: vision tower, projector, language model and the tile layout."""

    vision: VisionConfig
    projector: ProjectorConfig
    language: LanguageConfig
    candidate_resolutions: tuple[tuple[int, int], ...] = ((384, 384),)

    @property
    def tokens_per_tile_side(self) -> int:
        """h = w of the reference: ceil(grid / downsample) (14 at 384 px)."""
        return math.ceil(self.vision.grid / self.projector.downsample_ratio)

    @classmethod
    def from_hf_dict(cls, raw: dict) -> VL2Config:
        if raw.get("model_type") != "deepseek_vl_v2":
            raise ConfigError(
                f"config.json has model_type={raw.get('model_type')!r}; expected 'deepseek_vl_v2' "
                "(a DeepSeek-VL2 checkpoint such as deepseek-ai/deepseek-vl2-tiny)."
            )
        known = {
            "vision_config": {},
            "projector_config": {},
            "language_config": {},
            "candidate_resolutions": [[384, 384]],
            "tile_tag": "tile_tag",  # sic: the reference's default, refused below
            "global_view_pos": "head",
        }
        values = _take("config.json", raw, known, frozenset({"bos_token_id", "eos_token_id"}))
        _require(values["tile_tag"] == "2D", "tile_tag", values["tile_tag"], "only 2D")
        _require(values["global_view_pos"] == "head", "global_view_pos", values["global_view_pos"], "only head")
        cfg = cls(
            vision=VisionConfig.from_hf_dict(values["vision_config"]),
            projector=ProjectorConfig.from_hf_dict(values["projector_config"]),
            language=LanguageConfig.from_hf_dict(values["language_config"]),
        )
        resolutions = cfg.check_candidate_resolutions(values["candidate_resolutions"])
        cfg = dataclasses.replace(cfg, candidate_resolutions=resolutions)
        cfg.validate()
        return cfg

    def check_candidate_resolutions(self, resolutions, where: str = "candidate_resolutions") -> tuple[tuple[int, int], ...]:
        """Checks a processor's candidate canvases [[width, height], ...] against this model's vision tower;
        returns them as a tuple of (width, height) int pairs.

        The official processor takes its tile size from the first canvas's width, cuts the chosen canvas
        into `width // tile` x `height // tile` square tiles and sends each to the vision tower, whose
        patch embedding takes exactly `vision.image_size` pixels. So the list must be non-empty, every
        width and height a positive multiple of `vision.image_size`, and the first width that size itself.
        Raises ConfigError naming `where` (e.g. "processor_config.json candidate_resolutions"), the
        offending resolution and the vision tower's image size.
        """
        size = self.vision.image_size
        try:
            pairs = [tuple(r) for r in resolutions]
        except TypeError:
            raise ConfigError(f"{where} must be a list of [width, height] pairs, not {resolutions!r}.") from None
        if not pairs:
            raise ConfigError(f"{where} is empty; it needs at least [{size}, {size}], the vision tower's image size.")
        for pair in pairs:
            whole = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v).is_integer() for v in pair)
            if len(pair) != 2 or not whole:
                raise ConfigError(f"{where} must be [width, height] pairs of whole numbers, not {list(pair)!r}.")
            width, height = (int(v) for v in pair)
            if width < size or height < size or width % size or height % size:
                raise ConfigError(
                    f"{where}: {width}x{height} does not fit the vision tower's image size {size} (each width and "
                    f"height must be a positive multiple of {size})."
                )
        first = int(pairs[0][0])
        if first != size:
            raise ConfigError(
                f"{where}: the first resolution's width {first} sets the tile size, but the vision tower's image "
                f"size is {size}; put [{size}, {size}] first."
            )
        return tuple((int(w), int(h)) for w, h in pairs)

    def validate(self) -> None:
        _require(
            self.projector.input_dim == self.vision.width, "projector_config.input_dim", self.projector.input_dim,
            f"must equal the vision width {self.vision.width}",
        )
        _require(
            self.projector.n_embed == self.language.hidden_size, "projector_config.n_embed", self.projector.n_embed,
            f"must equal the language hidden_size {self.language.hidden_size}",
        )
        self.check_candidate_resolutions(self.candidate_resolutions)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VL2Config:
        file = Path(path) / "config.json"
        if not file.is_file():
            if (Path(path) / "train_state" / "settings.json").is_file():  # (python -m vl2_jax.finetune's --out)
                raise ConfigError(f"{path} holds a fine-tuning run that has not written its model yet; finish it "
                                  f"(python -m vl2_jax.finetune ... --out {path} --resume) and load it then.")
            raise ConfigError(f"{path} has no config.json; pass a DeepSeek-VL2 checkpoint folder.")
        try:
            raw = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file} is not valid JSON ({e}).") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file} must hold a JSON object, not {type(raw).__name__}.")
        try:
            return cls.from_hf_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None

    def to_hf_dict(self) -> dict:
        """The config in the Hugging Face layout (what `from_hf_dict` reads back)."""
        return {
            "model_type": "deepseek_vl_v2",
            "tile_tag": "2D",
            "global_view_pos": "head",
            "candidate_resolutions": [list(r) for r in self.candidate_resolutions],
            "vision_config": {k: v for k, v in dataclasses.asdict(self.vision).items() if k != "layer_norm_eps"},
            "projector_config": dataclasses.asdict(self.projector) | {"projector_type": "downsample_mlp_gelu"},
            "language_config": dataclasses.asdict(self.language),
        }


def _siglip_so400m() -> VisionConfig:
    return VisionConfig(image_size=384, patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362)


def _tiles(size: int, max_tiles: int = 9) -> tuple[tuple[int, int], ...]:
    return tuple(
        (size * m, size * n) for m in range(1, max_tiles + 1) for n in range(1, max_tiles + 1) if m * n <= max_tiles
    )


_MLA = dict(use_mla=True, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
_MOE = dict(n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=4096)

PRESETS: dict[str, VL2Config] = {
    "tiny": VL2Config(
        vision=_siglip_so400m(),
        projector=ProjectorConfig(input_dim=1152, n_embed=1280),
        language=LanguageConfig(
            vocab_size=129280, hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896,
            num_hidden_layers=12, num_attention_heads=10, num_key_value_heads=10, n_routed_experts=64,
            topk_method="greedy", use_mla=False, kv_lora_rank=None, q_lora_rank=None, qk_rope_head_dim=0, qk_nope_head_dim=0,
            v_head_dim=0, bos_token_id=0, eos_token_id=1, **_MOE,
        ),
        candidate_resolutions=_tiles(384),
    ),
    "small": VL2Config(
        vision=_siglip_so400m(),
        projector=ProjectorConfig(input_dim=1152, n_embed=2048),
        language=LanguageConfig(
            vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
            num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
            topk_method="greedy", **_MLA, **_MOE,
        ),
        candidate_resolutions=_tiles(384),
    ),
    "base": VL2Config(
        vision=_siglip_so400m(),
        projector=ProjectorConfig(input_dim=1152, n_embed=2560),
        language=LanguageConfig(
            vocab_size=129280, hidden_size=2560, intermediate_size=12288, moe_intermediate_size=1536,
            num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32, n_routed_experts=72,
            topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.0,
            bos_token_id=0, eos_token_id=1, **_MLA, **_MOE,
        ),
        candidate_resolutions=_tiles(384),
    ),
    # Small, distinct sizes so that a swapped axis fails loudly; MLA with query LoRA and grouped routing.
    "test": VL2Config(
        vision=VisionConfig(image_size=56, patch_size=14, width=40, layers=2, heads=4, mlp_ratio=3.7362),
        projector=ProjectorConfig(input_dim=40, n_embed=48),
        language=LanguageConfig(
            vocab_size=512, hidden_size=48, intermediate_size=88, moe_intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=6, n_routed_experts=12,
            n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1, topk_method="group_limited_greedy",
            n_group=4, topk_group=2, use_mla=True, kv_lora_rank=20, q_lora_rank=28, qk_rope_head_dim=8,
            qk_nope_head_dim=12, v_head_dim=10, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
        ),
        candidate_resolutions=_tiles(56),
    ),
}
