"""Training parity with the official PyTorch code (fixtures/<variant>/train.*): the processor's ids and
labels in training mode, the loss and the gradients of a dozen named tensors."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

import vl2_jax
from tests.conftest import FIXTURES, VARIANTS, ckpt_dir
from vl2_jax.checkpoint import SafetensorsFolder, to_hf
from vl2_jax.errors import ConfigError, InputError
from vl2_jax.processor import IGNORE_ID, Processor
from vl2_jax.training import data
from vl2_jax.training.loss import LossInputs, loss_and_grad_fn, mean_cross_entropy, training_module, training_runtime

CASES = ("sft_one_image", "sft_text", "sft_two_turns")
LOSS_TOL = 1e-4  # absolute, against the official loss (fixtures/README.md)
OWN_TOL = 1e-5  # relative, against the cross-entropy of our own inference logits
GRAD_TOL = 1e-4  # relative to the reference gradient's largest entry


@functools.cache
def train_fixture(variant: str):
    """(train.json as a dict, train.npz as {key: array})."""
    cases = json.loads((FIXTURES / variant / "train.json").read_text(encoding="utf-8"))
    with np.load(FIXTURES / variant / "train.npz") as npz:
        return cases, {k: npz[k] for k in npz.files}


def record(variant: str, name: str) -> data.Record:
    case = train_fixture(variant)[0][name]
    return data.Record(tuple(case["conversation"]), tuple(str(FIXTURES / "images" / f) for f in case["images"]))


@functools.cache
def processor(variant: str) -> Processor:
    return Processor.from_pretrained(ckpt_dir(variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_ids_and_labels_match_reference(variant):
    cases, arrays = train_fixture(variant)
    for name in CASES:
        ex = data.example(processor(variant), record(variant, name))
        batch = data.collate(processor(variant), [ex])
        for key, got in (("input_ids", batch.batch.input_ids), ("labels", batch.labels),
                         ("attention_mask", batch.batch.attention_mask),
                         ("images_seq_mask", batch.batch.images_seq_mask),
                         ("images_spatial_crop", batch.batch.images_spatial_crop)):
            want = arrays[f"{name}/{key}"]
            assert got.shape == want.shape, (name, key)
            np.testing.assert_array_equal(got, want, err_msg=f"{name}/{key}")
        assert ex.output.prompt == cases[name]["prompt"]
        assert ex.targets == cases[name]["target_tokens"]


def rel_err(got, want) -> float:
    scale = np.abs(want).max()
    if scale == 0:  # e.g. an expert no token reached, or the image parameters of a text-only case
        return 0.0 if np.abs(got).max() == 0 else float("inf")
    return float(np.abs(np.asarray(got, np.float64) - want).max() / scale)


@pytest.mark.parametrize("variant, moe", [(v, "blocked") for v in VARIANTS] + [("mla_noaux", "dense")])
def test_loss_and_gradients_match_reference(variant, moe):
    """All three cases at one padded shape (left padding, a zero tile bucket), so that one program
    serves them: a row's loss and gradients must not depend on its padding. Under fine-tuning's
    blocked MoE dispatch, and the dense reference path (the grouped one's gradients equal dense's:
    test_moe_dispatch)."""
    cases, arrays = train_fixture(variant)
    model = vl2_jax.load_pretrained(ckpt_dir(variant), dtype="float32")
    examples = {name: data.example(model.processor, record(variant, name)) for name in CASES}
    length = max(len(e.labels) for e in examples.values()) + 3
    tiles = max(len(e.output.pixels) for e in examples.values())
    step = loss_and_grad_fn(training_module(model.cfg, runtime=training_runtime(moe)))
    for name, ex in examples.items():
        batch = data.collate(model.processor, [ex], length)
        inputs = LossInputs.from_batch(batch, tiles=tiles)  # text only: zero tiles that no token reads
        loss, grads = step(model.params, inputs)
        loss = float(loss)
        want = float(arrays[f"{name}/loss"])
        assert abs(loss - want) < LOSS_TOL, (name, loss, want)
        own = float(mean_cross_entropy(model.logits(batch.batch), batch.labels, batch.batch.attention_mask))
        assert abs(loss - own) <= OWN_TOL * abs(own), (name, loss, own)
        names = cases[name]["grads"]
        ours = to_hf(model.cfg, grads, names)
        errors = {n: rel_err(ours[n], arrays[f"{name}/grad/{n}"]) for n in names}
        assert max(errors.values()) < GRAD_TOL, (name, errors)


def test_to_hf_inverts_the_conversion():
    model = vl2_jax.load_pretrained(ckpt_dir("mla_noaux"), dtype="float32")
    folder = SafetensorsFolder(ckpt_dir("mla_noaux"))
    back = to_hf(model.cfg, model.params)
    assert set(back) == {n for n in folder.names() if not n.startswith("vision.attn_pool.")}
    for name, array in back.items():
        np.testing.assert_array_equal(array, folder.get(name).astype(np.float32), err_msg=name)
    with pytest.raises(Exception, match="no rule"):
        to_hf(model.cfg, model.params, ["vision.attn_pool.latent"])


def test_jsonl_records_in_ms_swift_form(tmp_path):
    """ms-swift's roles and relative image paths give the same example as the official roles."""
    (tmp_path / "img").mkdir()
    src = FIXTURES / "images" / "visual_grounding_1.png"
    (tmp_path / "img" / "g.png").write_bytes(src.read_bytes())
    conv = train_fixture("mha")[0]["sft_one_image"]["conversation"]
    roles = {"<|User|>": "user", "<|Assistant|>": "assistant"}
    lines = [json.dumps({"messages": [{"role": roles[m["role"]], "content": m["content"]} for m in conv],
                         "images": ["img/g.png"]}),
             "",
             json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = data.read_jsonl(tmp_path / "train.jsonl")
    assert len(records) == 2
    p = processor("mha")
    got, want = data.example(p, records[0]), data.example(p, record("mha", "sft_one_image"))
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.output.input_ids, want.output.input_ids)
    np.testing.assert_array_equal(got.output.pixels, want.output.pixels)
    system = data.example(p, records[1])
    unmasked = data.example(p, records[1], mask_prompt=False)
    first_answer = int(np.flatnonzero(system.labels[1:] != IGNORE_ID)[0]) + 1
    assert system.labels[0] == p.bos_id and (system.labels[1:first_answer] == IGNORE_ID).all()
    np.testing.assert_array_equal(unmasked.labels, unmasked.output.input_ids)  # no image: every token a target
    assert system.labels[-1] == p.eos_id


def test_collate_pads_left_with_ignored_labels():
    p = processor("mha")
    a, b = (data.example(p, record("mha", n)) for n in ("sft_text", "sft_one_image"))
    batch = data.collate(p, [a, b], length=len(b.labels) + 2)
    t = batch.labels.shape[1]
    assert batch.batch.input_ids.shape == (2, t) and t == len(b.labels) + 2
    np.testing.assert_array_equal(batch.labels[0, t - len(a.labels):], a.labels)
    assert (batch.labels[0, : t - len(a.labels)] == IGNORE_ID).all()
    assert batch.batch.attention_mask.sum(1).tolist() == [len(a.labels), len(b.labels)]
    with pytest.raises(InputError, match="more than the batch length"):
        data.collate(p, [b], length=10)


def test_refusals():
    p = processor("mha")
    with pytest.raises(InputError, match="must end with an assistant answer"):
        p.supervised([{"role": "user", "content": "Hi"}])
    with pytest.raises(InputError, match="messages"):
        data.record({"images": []})
    cfg = vl2_jax.load_pretrained(ckpt_dir("mha"), dtype="float32").cfg
    with pytest.raises(ConfigError, match="Runtime.plain"):
        training_module(cfg, runtime=vl2_jax.Runtime())
    with pytest.raises(ConfigError, match="blocked, dense, grouped"):
        training_runtime("ragged")


def test_batch_loss_and_gradient_weigh_every_target_token_equally():
    """The three cases in one left-padded batch: the loss is the official losses' mean weighted by their
    target counts, and so is each gradient (the official batch loss is one mean over all targets)."""
    variant = "mla_noaux"
    cases, arrays = train_fixture(variant)
    model = vl2_jax.load_pretrained(ckpt_dir(variant), dtype="float32")
    examples = [data.example(model.processor, record(variant, name)) for name in CASES]
    batch = data.collate(model.processor, examples)
    loss, grads = loss_and_grad_fn(training_module(model.cfg))(model.params, LossInputs.from_batch(batch))
    weights = np.array([cases[name]["target_tokens"] for name in CASES], np.float64)
    weights /= weights.sum()
    want = sum(w * float(arrays[f"{name}/loss"]) for w, name in zip(weights, CASES))
    assert abs(float(loss) - want) < LOSS_TOL
    names = cases[CASES[0]]["grads"]
    ours = to_hf(model.cfg, grads, names)
    for n in names:
        expected = sum(w * arrays[f"{name}/grad/{n}"].astype(np.float64) for w, name in zip(weights, CASES))
        assert rel_err(ours[n], expected) < GRAD_TOL, n
