"""Config translation: defaults, presets, refusal of what we do not support, and exact parameter counts."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vl2_jax.config import PRESETS, VL2Config
from vl2_jax.errors import ConfigError
from vl2_jax.modules.vl2 import VL2

ATTN_POOL_PARAMS = 15_238_352  # vision.attn_pool.*: present in the checkpoints, unused, not in our tree
RELEASED_PARAMS = {"tiny": 3_370_501_440, "small": 16_148_349_504, "base": 27_480_134_248}

_VISION = {"layers": 27, "mlp_ratio": 3.7362, "model_name": "siglip_so400m_patch14_384", "model_type": "vision",
           "patch_size": 14, "width": 1152}
_RES = [[384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384], [768, 768],
        [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768], [384, 2688], [2688, 384],
        [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456], [3456, 384], [1152, 1152]]


def hf_config(size: str) -> dict:
    """A config.json in the shape of the released ones: sparse keys, HF bookkeeping, reference defaults."""
    common = {"first_k_dense_replace": 1, "lm_head": True, "max_position_embeddings": 4096, "model_type": "deepseek_v2",
              "n_group": 1, "n_shared_experts": 2, "num_experts_per_tok": 6, "q_lora_rank": None, "rm_head": False,
              "topk_group": 1, "torch_dtype": "bfloat16", "architectures": ["DeepseekV2ForCausalLM"]}
    language = {
        "tiny": {"bos_token_id": 0, "eos_token_id": 1, "hidden_size": 1280, "intermediate_size": 6848,
                 "kv_lora_rank": None, "moe_intermediate_size": 896, "n_routed_experts": 64, "num_attention_heads": 10,
                 "num_hidden_layers": 12, "num_key_value_heads": 10, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0,
                 "topk_method": "greedy", "use_mla": False, "v_head_dim": 0, "vocab_size": 129280},
        # small omits bos/eos (defaults 100000/100001)
        "small": {"hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512, "moe_intermediate_size": 1408,
                  "n_routed_experts": 64, "num_attention_heads": 16, "num_hidden_layers": 27, "num_key_value_heads": 16,
                  "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "topk_method": "greedy", "use_mla": True,
                  "v_head_dim": 128, "vocab_size": 102400},
        # base omits the layer and head counts (defaults 30 and 32)
        "base": {"bos_token_id": 0, "eos_token_id": 1, "hidden_size": 2560, "intermediate_size": 12288,
                 "kv_lora_rank": 512, "moe_intermediate_size": 1536, "n_routed_experts": 72, "norm_topk_prob": True,
                 "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "routed_scaling_factor": 2.0,
                 "scoring_func": "sigmoid", "topk_method": "noaux_tc", "use_mla": True, "v_head_dim": 128,
                 "vocab_size": 129280},
    }[size]
    n_embed = language["hidden_size"]
    return {"candidate_resolutions": _RES, "global_view_pos": "head", "model_type": "deepseek_vl_v2",
            "language_config": {**common, **language},
            "projector_config": {"model_type": "mlp_projector", "n_embed": n_embed}, "tile_tag": "2D",
            "torch_dtype": "bfloat16", "transformers_version": "4.38.2", "vision_config": dict(_VISION)}


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_released_configs_give_the_presets(size):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of a released config is known or deliberately ignored
        cfg = VL2Config.from_hf_dict(hf_config(size))
    assert cfg.language == PRESETS[size].language
    assert cfg.vision == PRESETS[size].vision
    assert cfg.projector == PRESETS[size].projector


@pytest.mark.parametrize("name", list(PRESETS))
def test_to_hf_dict_round_trips(name):
    assert VL2Config.from_hf_dict(PRESETS[name].to_hf_dict()) == PRESETS[name]


def count_params(cfg: VL2Config) -> int:
    side = cfg.tokens_per_tile_side
    t = side * (side + 1) * 2 + 1
    s = cfg.vision.image_size
    args = (jnp.zeros((1, t), jnp.int32), jnp.zeros((2, 3, s, s)), jnp.zeros((1, t), jnp.int32),
            jnp.zeros((1, t), bool), jnp.zeros((1, t), jnp.int32), jnp.ones((1, t), bool))
    shapes = jax.eval_shape(VL2(cfg, jnp.bfloat16).init, jax.random.key(0), *args)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_parameter_counts_equal_released_checkpoints(size):
    assert count_params(PRESETS[size]) + ATTN_POOL_PARAMS == RELEASED_PARAMS[size]


def _refused(raw: dict, *words: str):
    with pytest.raises(ConfigError) as e:
        VL2Config.from_hf_dict(raw)
    for w in words:
        assert w in str(e.value)


def _edit(path: str, value):
    raw = copy.deepcopy(hf_config("tiny"))
    *parents, key = path.split(".")
    d = raw
    for p in parents:
        d = d[p]
    d[key] = value
    return raw


@pytest.mark.parametrize(
    "path,value,words",
    [
        ("tile_tag", "1D", ("tile_tag", "1D")),
        ("global_view_pos", "tail", ("global_view_pos",)),
        ("projector_config.projector_type", "mlp_gelu", ("projector_type", "mlp_gelu")),
        ("language_config.rope_scaling", {"type": "yarn", "factor": 40}, ("rope_scaling",)),
        ("language_config.topk_method", "gready", ("topk_method", "gready")),
        ("language_config.scoring_func", "relu", ("scoring_func",)),
        ("language_config.hidden_act", "gelu", ("hidden_act",)),
        ("language_config.tie_word_embeddings", True, ("tie_word_embeddings",)),
        ("aligner", {"params": {"n_embed": 1280}}, ("config.json: key(s) aligner change how the official",)),
        ("quantization_config", {"quant_method": "gptq", "bits": 4}, ("quantization_config", "refuses")),
        ("candidate_resolutions", [[384, 384], [576, 384]], ("576x384", "image size 384")),
        ("vision_config.class_token", True, ("class_token",)),
        ("model_type", "llava", ("model_type", "llava")),
        ("projector_config.n_embed", 1024, ("n_embed",)),
    ],
)
def test_unsupported_values_are_refused_by_name(path, value, words):
    _refused(_edit(path, value), *words)


@pytest.mark.parametrize("section", ["config.json", "vision_config", "projector_config", "language_config"])
def test_unknown_harmless_keys_warn_once_and_load(section):
    """Keys the official code does not read (a newer transformers' bookkeeping, a tool's note) are ignored
    with one warning naming the section and the keys; the config is the one without them."""
    raw = copy.deepcopy(hf_config("tiny"))
    target = raw if section == "config.json" else raw[section]
    target.update(mystery_knob=3, a_note="x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = VL2Config.from_hf_dict(raw)
    assert [str(w.message) for w in caught] == [
        f"{section}: unknown key(s) a_note, mystery_knob; ignored (the official DeepSeek-VL2 code does not read "
        "them either)."
    ]
    assert cfg == VL2Config.from_hf_dict(hf_config("tiny"))


def test_structural_keys_are_refused_before_warning(monkeypatch):
    """A key the official code reads but this port does not implement is refused with its section, even
    beside harmless unknown keys (and before warning about them)."""
    from vl2_jax import config

    raw = copy.deepcopy(hf_config("tiny"))
    raw.update(aligner={"params": {"n_embed": 1280}}, a_note="x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError, match=r"^config\.json: key\(s\) aligner change how the official "
                           r"DeepSeek-VL2 code builds the model, and this port does not implement them, so it "
                           r"refuses to guess\.$"):
            VL2Config.from_hf_dict(raw)
    # The rule covers every section: a structural key of the language model is refused the same way.
    monkeypatch.setitem(config._STRUCTURAL, "language_config", frozenset({"mystery_knob"}))
    _refused(_edit("language_config.mystery_knob", 3), "language_config: key(s) mystery_knob change how")


RES_384 = "processor_config.json candidate_resolutions"


@pytest.mark.parametrize("resolutions,message", [
    ([[70, 70], [70, 140]], r": 70x70 does not fit the vision tower's image size 384 \(each width and height must be a "
                             r"positive multiple of 384\)\.$"),
    ([[384, 384], [384, 500]], r": 384x500 does not fit the vision tower's image size 384"),
    ([[384, 384], [0, 384]], r": 0x384 does not fit the vision tower's image size 384"),
    ([[768, 768], [384, 384]], r": the first resolution's width 768 sets the tile size, but the vision tower's image "
                               r"size is 384; put \[384, 384\] first\.$"),
    ([], r" is empty; it needs at least \[384, 384\], the vision tower's image size\.$"),
    ([[384]], r" must be \[width, height\] pairs of whole numbers, not \[384\]\.$"),
    ([[384, "384"]], r" must be \[width, height\] pairs of whole numbers"),
    (384, r" must be a list of \[width, height\] pairs, not 384\.$"),
], ids=["70px", "not-a-multiple", "zero", "tile-not-first", "empty", "single", "string", "not-a-list"])
def test_candidate_resolutions_that_do_not_fit_the_vision_tower_are_refused(resolutions, message):
    with pytest.raises(ConfigError, match="^" + RES_384.replace(".", r"\.") + message):
        PRESETS["tiny"].check_candidate_resolutions(resolutions, RES_384)


def test_candidate_resolutions_that_fit_are_returned_as_int_pairs():
    assert PRESETS["tiny"].check_candidate_resolutions(_RES) == tuple(map(tuple, _RES))
    assert PRESETS["test"].check_candidate_resolutions([[56, 56], [112.0, 56]]) == ((56, 56), (112, 56))
    with pytest.raises(ConfigError, match=r"^candidate_resolutions: 384x384 does not fit the vision tower's image size 56"):
        PRESETS["test"].check_candidate_resolutions(_RES)


def test_moe_layer_rule():
    lc = dataclasses.replace(PRESETS["test"].language, first_k_dense_replace=1, moe_layer_freq=2, num_hidden_layers=5)
    assert [lc.is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        VL2Config.from_pretrained(tmp_path)


def test_loading_refuses_processor_resolutions_that_do_not_fit_the_vision_tower(tmp_path):
    """A processor_config.json whose canvases are not multiples of the vision tower's image size is refused
    at load, naming both sizes (not at generate time)."""
    import json
    import shutil

    import vl2_jax
    from tests.conftest import ckpt_dir

    src = ckpt_dir("mha")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "processor_config.json").read_text())
    cfg["candidate_resolutions"] = [[384, 384], [768, 384]]  # the fixture's tower takes 70 px tiles
    (dst / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"processor_config.json candidate_resolutions.*384.*image size 70"):
        vl2_jax.load_pretrained(dst)
