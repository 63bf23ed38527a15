"""Whole-model float32 parity with what the official PyTorch code computed on the fixtures."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import vl2_jax
from tests.conftest import VARIANTS, all_cases, ckpt_dir, load_case, open_images
from vl2_jax import Runtime

TOL = 1e-4  # relative to the reference's largest magnitude (fixtures/README.md)


@functools.cache
def model(variant: str) -> vl2_jax.VL2Model:
    return vl2_jax.load_pretrained(ckpt_dir(variant), dtype="float32")


def batch_of(variant: str, *names: str):
    m = model(variant)
    outs = []
    for name in names:
        case = load_case(variant, name)
        outs.append(m.processor(case["conversation"], open_images(case)))
    return m.processor.batchify(outs)


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("variant,name", all_cases())
def test_embeds_and_logits_match_reference(variant, name):
    ref = load_case(variant, name)["arrays"]
    batch = batch_of(variant, name)
    m = model(variant)
    assert rel_err(m.prepare_inputs_embeds(batch), ref["inputs_embeds"]) < TOL
    logits = m.logits(batch)
    assert logits.dtype == np.float32
    assert rel_err(logits, ref["logits"]) < TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_rows_equal_single(variant):
    """Rows of a left-padded batch give each conversation's own logits (padding never leaks in)."""
    names = ("two_images", "text_only", "history")
    batch = batch_of(variant, *names)
    logits = np.asarray(model(variant).logits(batch))
    t = batch.input_ids.shape[1]
    for row, name in enumerate(names):
        ref = load_case(variant, name)["arrays"]["logits"][0]
        n = ref.shape[0]
        assert batch.attention_mask[row, : t - n].sum() == 0
        assert rel_err(logits[row, t - n :], ref) < TOL


def test_load_keeps_checkpoint_dtype_with_none():
    m = vl2_jax.load_pretrained(ckpt_dir("mha"), dtype=None)
    assert m.dtype == np.float32
    leaves = {str(x.dtype) for x in __import__("jax").tree.leaves(m.params)}
    assert leaves == {"float32"}


def test_bfloat16_load_runs_and_agrees_roughly():
    """bf16 weights and activations: same argmax on most positions as float32 (not a parity test)."""
    m16 = vl2_jax.load_pretrained(ckpt_dir("mla"), dtype="bfloat16")
    batch = batch_of("mla", "one_photo")
    got = np.asarray(m16.logits(batch))
    ref = load_case("mla", "one_photo")["arrays"]["logits"][0]
    assert got.dtype == np.float32
    cos = (got[0] * ref).sum(-1) / np.linalg.norm(got[0], axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.99


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_fast_paths_equal_dense_path(variant):
    """The decode-time gather and the grouped and ragged dispatches against the plain all-experts path."""
    import jax
    import jax.numpy as jnp

    from vl2_jax.modules.moe import MoE

    m = model(variant)
    params = {"params": m.params["params"]["language"]["layers_1"]["mlp"]}
    x = jax.random.normal(jax.random.key(0), (2, 1, m.cfg.language.hidden_size))  # 2 tokens * top-3 < 8
    dense = MoE(m.cfg.language, jnp.float32, Runtime(moe="dense")).apply(params, x)
    gather = MoE(m.cfg.language, jnp.float32, Runtime(moe="gather")).apply(params, x)
    assert rel_err(gather, np.asarray(dense)) < 1e-5
    x = jax.random.normal(jax.random.key(1), (2, 37, m.cfg.language.hidden_size))  # prefill-sized
    dense = MoE(m.cfg.language, jnp.float32, Runtime(moe="dense")).apply(params, x)
    for impl in ("grouped", "ragged", "blocked"):
        got = MoE(m.cfg.language, jnp.float32, Runtime(moe=impl)).apply(params, x)
        assert rel_err(got, np.asarray(dense)) < 1e-5, impl


@pytest.mark.parametrize("impl", ["dense", "grouped", "ragged"])
def test_forced_moe_dispatch_matches_reference_greedy(impl):
    m = vl2_jax.load_pretrained(ckpt_dir("mla_noaux"), dtype="float32", runtime=Runtime(moe=impl))
    case = load_case("mla_noaux", "one_photo")
    greedy = case["arrays"]["greedy"].tolist()
    batch = m.processor.batchify([m.processor(case["conversation"], open_images(case))])
    assert m.generate(batch, max_new_tokens=len(greedy)).token_ids[0] == greedy


def test_random_weights_carry_information_between_tokens():
    """`random:*` draws every weight (biases, named *_b or *bias, start at 0): MLA's absorbed wk_b and
    wv_b, whose names end in _b too, once came out all zero, so that attention carried nothing from one
    token to another and an answer could not depend on the image or the question."""
    m = vl2_jax.load_model("random:test", "float32")
    attn = m.params["params"]["language"]["layers_0"]["attn"]
    assert np.any(np.asarray(attn["wk_b"])) and np.any(np.asarray(attn["wv_b"]))
    p = m.processor
    a, b = (p.batchify([p([{"role": "user", "content": q}])]) for q in ("Is it red?", "Is it big?"))
    assert a.input_ids.shape == b.input_ids.shape
    last = lambda batch: np.asarray(m.logits(batch))[0, -1]  # noqa: E731 - the same last token, other questions
    assert np.abs(last(a) - last(b)).max() > 1e-3


def test_a_random_model_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """Its tokenizer and processor files are written to a temporary folder and read back: every load of a
    `random:*` model left one behind (hundreds in /tmp after a day of tests and servers)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    m = vl2_jax.load_model("random:test", "float32")
    assert m.processor.decode(m.processor.tokenizer.encode("hi")) == "hi"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["host", "device"])
def test_random_draws_follow_the_rules_on_host_and_device(where, monkeypatch):
    """`draw_like`: weights normal(0.02), norm scales 1, biases 0, in the leaf's dtype, the same for the
    same seed; small leaves come from numpy without compiling anything, large ones from jitted draws."""
    import jax
    import jax.numpy as jnp

    from vl2_jax import load

    if where == "device":
        monkeypatch.setattr(load, "HOST_DRAW_ELEMENTS", 0)
    shapes = {"params": {"proj": {"kernel": jax.ShapeDtypeStruct((301, 67), jnp.bfloat16),
                                  "bias": jax.ShapeDtypeStruct((67,), jnp.float32)},
                         "norm": {"scale": jax.ShapeDtypeStruct((67,), jnp.float32)},
                         "wk_b": jax.ShapeDtypeStruct((5, 67, 3), jnp.float32)}}
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        a = load.draw_like(shapes, seed=3)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    b, c = load.draw_like(shapes, seed=3), load.draw_like(shapes, seed=-4)  # (any int seeds, as jax.random's)
    p = a["params"]
    assert p["proj"]["kernel"].dtype == jnp.bfloat16 and p["proj"]["kernel"].shape == (301, 67)
    kernel = np.asarray(p["proj"]["kernel"], np.float32)
    assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
    assert not np.any(np.asarray(p["proj"]["bias"])) and np.all(np.asarray(p["norm"]["scale"]) == 1)
    assert np.asarray(p["wk_b"]).std() > 0.01  # MLA's absorbed projection is a weight, not a bias
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    assert not np.array_equal(np.asarray(p["proj"]["kernel"], np.float32), np.asarray(c["params"]["proj"]["kernel"], np.float32))
    if where == "host":
        assert compiles == []
    else:
        assert compiles  # (these shapes are drawn nowhere else, so they compile here)
