"""Fine-tuning on the random test model: LoRA learns a small dataset, gradient accumulation equals the
big batch, a resumed run continues bit for bit, the CLI writes a folder that loads and matches the
unmerged adapters, and bad input is refused or skipped as documented."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from PIL import Image

import vl2_jax
from tests.conftest import sigterm_when
from vl2_jax.config import Runtime
from vl2_jax.errors import ConfigError, InputError
from vl2_jax.finetune import main
from vl2_jax.model import VL2Model
from vl2_jax.training import batches, data, export, loop, lora, loss, run
from vl2_jax.training.loss import cross_entropy, forward, training_module

PICTURE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), np.uint8))
RECORDS = [
    {"messages": [{"role": "user", "content": "<image>\nWhat is this?"},
                  {"role": "assistant", "content": "Noise."}], "images": [PICTURE]},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
    {"messages": [{"role": "system", "content": "Count."}, {"role": "user", "content": "1 2"},
                  {"role": "assistant", "content": "3 4 5"}]},
    {"messages": [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."}]},
]


def setup(records=RECORDS):
    model = vl2_jax.load_pretrained("random:test")
    return model, [data.example(model.processor, r) for r in records]


def host(tree):
    return jax.tree.map(np.array, tree)


def test_lora_learns_four_examples_and_answers_the_training_prompts():
    model, examples = setup()
    # 100 steps: with the balance loss (alpha 0.001) in the objective, 80 left "Noise." one token short
    s = loop.Settings(steps=100, batch=4, lr=1e-2, warmup=3, max_seq_len=128, lora_rank=16, lora_alpha=32.0)
    result = loop.fit(training_module(model.cfg), model.processor, model.params, examples, s, bar=False)
    assert result.losses[-1] <= 0.1 * result.losses[0], result.losses
    params = loop.params_of(result.state.trainable, result.state.frozen, s.lora_scale)
    tuned = VL2Model(model.cfg, params, model.processor, jnp.float32, Runtime.plain())
    for r in RECORDS:  # the first through its image
        prompt = model.processor(r["messages"][:-1], r.get("images", []))
        assert tuned.generate(prompt, max_new_tokens=8).text[0] == r["messages"][-1]["content"]


def test_with_vision_in_train_two_images_under_one_question_get_their_own_answers():
    """Same question, a red and a blue image, answers "Red." / "Blue.": LoRA on the vision tower, the
    projector and the language model learns both, and the vision tower's adapters moved. (Vision and
    projector alone cannot: the frozen random language model's attention, reading RMS-normalised
    inputs through fixed projections, bounds how far image tokens move an answer's logits; the loss
    stays near 6.04 from 6.17 whatever the rate or the number of steps.)"""
    red, blue = Image.new("RGB", (56, 56), (255, 0, 0)), Image.new("RGB", (56, 56), (0, 0, 255))
    records = [{"messages": [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": a}],
                "images": [im]} for im, a in ((red, "Red."), (blue, "Blue."))]
    model, examples = setup(records)
    s = loop.Settings(steps=60, batch=2, lr=1e-2, warmup=3, max_seq_len=128, lora_rank=16, lora_alpha=32.0,
                      parts=("language", "projector", "vision"))
    result = loop.fit(training_module(model.cfg), model.processor, model.params, examples, s, bar=False)
    assert result.losses[-1] <= 0.05 * result.losses[0], result.losses
    vision_b = [v for k, v in result.state.trainable.items() if k.startswith("vision/") and k.endswith(lora.B)]
    assert vision_b and all(np.abs(np.asarray(v)).max() > 0 for v in vision_b)
    params = loop.params_of(result.state.trainable, result.state.frozen, s.lora_scale)
    tuned = VL2Model(model.cfg, params, model.processor, jnp.float32, Runtime.plain())
    for r in records:
        prompt = model.processor(r["messages"][:-1], r["images"])
        assert tuned.generate(prompt, max_new_tokens=8).text[0] == r["messages"][-1]["content"]


# An "optimizer" that keeps the gradient as its state and updates nothing: the step's gradient, exactly.
KEEP_GRADIENT = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                             lambda g, state, params=None: (jax.tree.map(jnp.zeros_like, g), g))


def gradient_of_one_step(model, examples, s, cfg=None, metrics_too=False, specs=None):
    """(loss, gradient {path: array}) of step 0 under `s` (and the step's metrics if `metrics_too`);
    `cfg`: the model's config with other training values (aux_loss_alpha); `specs`: a dict to fill with
    the PartitionSpec of each leaf of the new state's optimizer state (the gradient) by path."""
    state = loop.init_state(jax.tree.map(jnp.copy, model.params), s, KEEP_GRADIENT)
    order = batches.Order(len(examples), s.batch, s.grad_accum, s.seed)
    inputs = batches.stack(model.processor, [[examples[j] for j in mb] for mb in order.step(0)], s.max_seq_len)
    state, metrics = loop.step_fn(training_module(cfg or model.cfg), KEEP_GRADIENT, s.lora_scale)(state, inputs)
    if specs is not None:
        specs.update({k: v.sharding.spec for k, v in state.opt_state.items()})
    out = (float(metrics["loss"]), host(state.opt_state))
    return (*out, host(metrics)) if metrics_too else out


def test_batch_8_equals_batch_2_with_4_accumulated():
    model, examples = setup()  # the test model trains with aux_loss_alpha 0.001 (the default), seq_aux
    examples = examples + examples[::-1]  # 8 conversations of different lengths, one with an image
    common = dict(steps=10, warmup=1, max_seq_len=128, lora_rank=0, parts=("language", "projector"))
    big_loss, big, big_m = gradient_of_one_step(model, examples, loop.Settings(batch=8, **common), metrics_too=True)
    acc_loss, acc, acc_m = gradient_of_one_step(model, examples, loop.Settings(batch=2, grad_accum=4, **common),
                                                metrics_too=True)
    assert abs(acc_loss - big_loss) <= 1e-6 * big_loss
    assert big_m["aux_loss"] > 0 and abs(acc_m["aux_loss"] - big_m["aux_loss"]) <= 1e-6 * big_m["aux_loss"]
    assert big.keys() == acc.keys() and len(big) > 20
    for k in big:  # float32 sums in another order: relative to the gradient's largest entry
        assert np.abs(acc[k] - big[k]).max() <= 1e-5 * np.abs(big[k]).max(), k


def test_resume_gives_the_same_next_step_loss_bit_for_bit(tmp_path):
    model, examples = setup()
    s = loop.Settings(steps=5, batch=2, lr=1e-2, warmup=1, max_seq_len=128, lora_rank=4, lora_alpha=8.0, save_every=3)
    params = host(model.params)
    whole = loop.fit(training_module(model.cfg), model.processor, model.params, examples, s, state_dir=tmp_path)
    shutil.rmtree(tmp_path / "5")  # as if the run had stopped after the save at step 3
    resumed = loop.fit(training_module(model.cfg), model.processor, jax.tree.map(jnp.asarray, params), examples, s,
                       state_dir=tmp_path, resume=True)
    assert len(resumed.losses) == 2
    assert resumed.losses == whole.losses[3:]  # exact float equality
    with pytest.raises(ConfigError, match="other settings"):
        loop.fit(training_module(model.cfg), model.processor, jax.tree.map(jnp.asarray, params), examples,
                 loop.Settings(**{**s.__dict__, "lr": 2e-2}), state_dir=tmp_path, resume=True)


def write_dataset(folder, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(folder / "train.jsonl")


def jsonl_records(folder):
    PICTURE.save(folder / "a.png")
    first = {**RECORDS[0], "images": ["a.png"]}
    return [first, *RECORDS[1:]]


def test_cli_writes_a_model_that_loads_and_matches_the_unmerged_adapters(tmp_path, capsys):
    path = write_dataset(tmp_path, jsonl_records(tmp_path))
    out, hf = tmp_path / "out", tmp_path / "hf"
    rc = main(["--model", "random:test", "--data", path, "--eval", path, "--out", str(out), "--steps", "10",
               "--warmup", "2", "--lr", "1e-2", "--batch", "2", "--lora-rank", "4", "--export-hf", str(hf)])
    captured = capsys.readouterr()
    assert rc == 0 and "trained 10 steps" in captured.out, captured.err
    # a step of a new shape (the first, at least) shows its compile time, not a speed
    steps = [line for line in captured.err.splitlines() if line.startswith("step ") and "aux_loss" in line]
    assert len(steps) == 10 and "compiled in" in steps[0] and "tokens/s" in steps[-1], steps
    assert all(("compiled in" in line) != ("tokens/s" in line) for line in steps), steps
    umask = os.umask(0)
    os.umask(umask)
    for written in (hf / "model.safetensors", out / "adapters" / "adapters.safetensors", out / "adapters" / "adapter_config.json"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written  # (safetensors wrote 0600)
    base = vl2_jax.load_pretrained("random:test")
    tuned = vl2_jax.load_model(str(out), "float32")
    adapters, config = export.load_adapters(out / "adapters")
    assert config["rank"] == 4 and len(adapters) > 0
    flat_base = traverse_util.flatten_dict(base.params["params"], sep="/")
    flat_tuned = traverse_util.flatten_dict(tuned.params["params"], sep="/")
    for k, v in flat_base.items():  # the frozen weights (router, norms, embedding, vision) are unchanged
        if k + lora.A not in adapters:
            assert np.asarray(flat_tuned[k]).tobytes() == np.asarray(v).tobytes(), k
        else:
            assert not np.array_equal(flat_tuned[k], v), k
    assert "language/layers_1/mlp/router_w" in flat_base and "language/layers_1/mlp/router_w" + lora.A not in adapters
    unmerged = loop.params_of({k: jnp.asarray(v) for k, v in adapters.items()}, flat_base, config["alpha"] / config["rank"])
    ex = [data.example(base.processor, r) for r in data.read_jsonl(path)]
    inputs = jax.tree.map(lambda x: x[0], batches.stack(base.processor, [ex], 128))
    want = forward(training_module(base.cfg), unmerged, inputs)
    batch = data.collate(base.processor, ex, inputs.ids.shape[1]).batch
    np.testing.assert_allclose(np.asarray(tuned.logits(batch)), np.asarray(want), rtol=0, atol=1e-5)
    back = vl2_jax.load_model(str(hf), "float32")  # the Hugging Face export converts back to the same weights
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(tuned.params)):
        np.testing.assert_array_equal(a, b)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["losses"]) == 10 and list(metrics["evals"]) == ["10"]
    assert json.loads((out / "vl2_jax_checkpoint.json").read_text())["source"] is None  # (random weights: none)


def test_bad_lines_are_refused_with_their_line_and_short_or_unanswered_ones_skipped(tmp_path, capsys):
    processor = vl2_jax.load_pretrained("random:test").processor
    good = jsonl_records(tmp_path)
    path = write_dataset(tmp_path, [good[1], "", "{not json"])
    with pytest.raises(InputError, match=r"train.jsonl:3 is not valid JSON"):
        batches.read_examples(processor, path, 128)
    path = write_dataset(tmp_path, [good[1], {**good[0], "images": ["gone.png"]}])
    with pytest.raises(InputError, match=r"train.jsonl:2: image .*gone.png does not exist"):
        batches.read_examples(processor, path, 128)
    (tmp_path / "pictures").mkdir()
    path = write_dataset(tmp_path, [good[1], {**good[0], "images": ["pictures"]}])
    with pytest.raises(InputError, match=r"train.jsonl:2: image .*pictures is a folder, not an image file\.$"):
        batches.read_examples(processor, path, 128)
    for last, words in [({"role": "Assistant", "content": "Hello"}, "message 1 has unknown role 'Assistant'"),
                        ({"role": ["assistant"], "content": "Hello"}, r"message 1 has unknown role \['assistant'\]"),
                        ({"role": "user", "content": "<image> and?"}, r"the conversation has 1 <image> placeholder\(s\) but 0 image")]:
        mistyped = {"messages": [{"role": "user", "content": "Hi"}, last]}  # (each was read as no answer: skipped)
        path = write_dataset(tmp_path, [good[1], mistyped])
        with pytest.raises(InputError, match=r"train.jsonl:2: " + words):
            batches.read_examples(processor, path, 128)
    unanswered = {"messages": [{"role": "user", "content": "Hi"}]}
    unanswered_image = {"messages": [{"role": "user", "content": "<image> Hi"}], "images": ["gone.png"]}
    path = write_dataset(tmp_path, [good[1], unanswered_image])  # skipped, but checked
    with pytest.raises(InputError, match=r"train.jsonl:2: image .*gone.png does not exist"):
        batches.read_examples(processor, path, 128)
    long = {"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}]}
    path = write_dataset(tmp_path, [good[1], unanswered, long, good[2]])
    examples, skipped = batches.read_examples(processor, path, 128)
    assert len(examples) == 2 and (skipped.no_answer, skipped.too_long) == ([2], [3])
    assert str(skipped) == "1 without an assistant answer at the end (line 2), 1 longer than --max-seq-len (line 3)"
    with open(path, "rb") as f:
        text = f.read()
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + text)  # a byte order mark, as some editors write
    again = batches.read_examples(processor, path, 128)[0]
    assert [e.labels.tolist() for e in again] == [e.labels.tolist() for e in examples]
    raw = {"messages": [{"role": "user", "content": "one\u2028two\x85three"}, {"role": "assistant", "content": "ok"}]}
    path = write_dataset(tmp_path, [json.dumps(raw, ensure_ascii=False), unanswered])  # (JSON keeps those raw)
    examples, skipped = batches.read_examples(processor, path, 128)
    assert len(examples) == 1 and skipped.no_answer == [2]
    path = write_dataset(tmp_path, [unanswered, long])
    with pytest.raises(InputError, match="no usable conversation"):
        batches.read_examples(processor, path, 128)
    assert main(["--model", "random:test", "--data", path, "--out", str(tmp_path / "o"), "--max-seq-len", "128"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "no usable conversation" in err[-1]
    assert not any("initialising" in line for line in err)  # refused before the weights were drawn or read
    with pytest.raises(SystemExit) as exit_:  # (a usage error, found before JAX is imported)
        main(["--model", "random:test", "--data", path, "--out", str(tmp_path / "o"), "--train", "language,lm"])
    assert exit_.value.code == 2
    assert "--train takes a comma-separated subset of language,projector,vision (got 'language,lm')" in capsys.readouterr().err
    assert main(["--model", "random:test", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert "error: --data" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exit_:  # a flag that contradicts another: a usage error, as argparse's own
        main(["--model", "random:test", "--data", path, "--out", str(tmp_path / "o"), "--steps", "4", "--warmup", "4"])
    assert exit_.value.code == 2 and "--warmup (4) must be below --steps (4)" in capsys.readouterr().err


def test_lora_adapters_cover_the_projections_and_not_the_router():
    model = vl2_jax.load_pretrained("random:test")
    flat = traverse_util.flatten_dict(model.params["params"], sep="/")
    adapters = lora.init_adapters(flat, ["language"], 3)
    assert adapters["language/layers_1/mlp/gate_up_w" + lora.A].shape == (12, 48, 3)  # one per routed expert
    assert adapters["language/layers_1/mlp/gate_up_w" + lora.B].shape == (12, 3, 48)
    assert adapters["language/layers_1/attn/o_w" + lora.A].shape == (60, 3)  # [H*U, r]
    assert adapters["language/layers_1/attn/wk_b" + lora.A].shape == (72, 3)  # inputs (R) last: A is [H*K, r]
    assert not adapters["language/layers_1/attn/wk_b" + lora.A].any()  # the output side starts at zero
    assert adapters["language/layers_1/attn/wk_b" + lora.B].shape == (3, 20)
    assert not any("router" in k or "norm" in k or k.startswith("vision/") for k in adapters)
    effective = lora.effective_params(flat, adapters, 2.0)  # B starts at zero: the model is unchanged
    assert all(np.array_equal(effective[k], flat[k]) for k in flat)


def test_remat_model_has_the_same_parameters():
    model = vl2_jax.load_pretrained("random:test")
    s, t = model.cfg.vision.image_size, 5
    args = (jnp.zeros((1, t), jnp.int32), jnp.zeros((1, 3, s, s)), jnp.zeros((1, t), jnp.int32), jnp.zeros((1, t), bool),
            jnp.zeros((1, t), jnp.int32), jnp.ones((1, t), bool))
    shapes = jax.eval_shape(training_module(model.cfg, remat=True).init, jax.random.key(0), *args)
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, model.params)


@pytest.mark.slow
def test_remat_model_has_the_same_loss_and_gradient():
    model, examples = setup()
    inputs = jax.tree.map(lambda x: x[0], batches.stack(model.processor, [examples], 128))

    def loss_and_grad(module):
        def f(params):
            total, count = cross_entropy(forward(module, params, inputs), inputs.labels, inputs.valid)
            return total / count
        return jax.jit(jax.value_and_grad(f))(model.params)

    (want, want_g), (got, got_g) = loss_and_grad(training_module(model.cfg)), loss_and_grad(
        training_module(model.cfg, remat=True))
    assert abs(float(got) - float(want)) <= 1e-6 * float(want)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * max(np.abs(np.asarray(b)).max(), 1e-30)


def test_the_step_compiles_once_with_weights_committed_as_a_checkpoints_are():
    """Weights read from a checkpoint are committed to their devices, new adapters and the step count
    are not; the step's outputs are: the second step must not compile again."""
    model, examples = setup()
    params = jax.device_put(model.params, jax.devices()[0])
    lines = []
    s = loop.Settings(steps=3, batch=4, warmup=0, max_seq_len=128)  # (every record each step: one shape)
    loop.fit(training_module(model.cfg), model.processor, params, examples, s, bar=False, log=lines.append)
    assert [("compiled in" in line) for line in lines] == [True, False, False], lines


@pytest.mark.slow  # two compilations of the whole step: about 30 s on two cores
def test_sharded_step_on_eight_devices_equals_the_unsharded_one():
    """Full fine-tuning of the language model and projector on data=2, expert=2, tensor=2 (the
    inference partition rules, the batch split over data, and the trainable weights and optimizer
    state also split over data): the loss and gradient of one step, and the state's layout after it."""
    s = loop.Settings(steps=10, batch=4, warmup=1, max_seq_len=128, lora_rank=0, parts=("language", "projector"))
    got, specs = [], {}
    for mesh in (None, "data=2,expert=2,tensor=2"):
        model = vl2_jax.load_pretrained("random:test", mesh=mesh)
        with model.mesh_context():
            got.append(gradient_of_one_step(model, [data.example(model.processor, r) for r in RECORDS], s,
                                            specs=specs if mesh else None))
    (loss, grads), (sharded_loss, sharded) = got
    assert abs(sharded_loss - loss) <= 1e-6 * loss
    for k in grads:  # float32 sums split over devices: relative to the gradient's largest entry
        assert np.abs(sharded[k] - grads[k]).max() <= 1e-5 * np.abs(grads[k]).max(), k
    # the optimizer state (here: the gradient) keeps the inference split and adds data on a free dimension
    assert split(specs["language/lm_head"]) == ("data", "tensor")  # [D 48, V 512]
    assert split(specs["language/layers_1/mlp/gate_up_w"]) == ("expert", "data", None, "tensor")  # [E, D, 2, F]
    assert split(specs["projector/w0"]) == ("data",)  # [160, 48]: the vision side has no inference split


def split(spec) -> tuple:
    """A PartitionSpec as a tuple without trailing Nones (JAX writes P("data") or P("data", None))."""
    axes = tuple(spec)
    while axes and axes[-1] is None:
        axes = axes[:-1]
    return axes


def test_fsdp_state_is_split_over_data_on_eight_devices():
    """Adam's moments and LoRA adapters under data=4, tensor=2: split over data where a dimension
    divides, the step count replicated; the frozen weights keep the inference layout."""
    model = vl2_jax.load_pretrained("random:test", mesh="data=4,tensor=2")
    s = loop.Settings(steps=10, warmup=1, lora_rank=4, parts=("language", "projector", "vision"))
    with model.mesh_context():
        state = loop.init_state(model.params, s, loop.optimizer(s))
    adam = state.opt_state[1][0]
    assert split(adam.mu["language/lm_head" + lora.A].sharding.spec) == ("data",)  # [D 48, r 4]
    assert split(adam.nu["vision/block_0/fc1_w" + lora.B].sharding.spec) == ("data",)  # [r 4, 149]: 149 is odd
    assert split(state.trainable["language/lm_head" + lora.B].sharding.spec) == (None, "data")  # [r 4, V 512]
    assert split(adam.count.sharding.spec) == ()
    assert split(state.frozen["language/lm_head"].sharding.spec) == (None, "tensor")


def with_alpha(cfg, alpha, seq_aux=True):
    return dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, aux_loss_alpha=alpha, seq_aux=seq_aux))


def official_balance(scores_LTE, idx_LTX, n_experts, seq_aux):
    """The official MoEGate's balance loss (without alpha), summed over layers, of one unpadded sequence
    (batch of one: the token-level and sequence-level variants then agree), in numpy float64."""
    total = 0.0
    for scores_TE, idx_TX in zip(np.asarray(scores_LTE, np.float64), np.asarray(idx_LTX)):
        t, k = idx_TX.shape
        counts = np.zeros(n_experts)
        np.add.at(counts, idx_TX.reshape(-1), 1.0)
        if seq_aux:
            total += np.sum(counts / (t * k / n_experts) * scores_TE.mean(0))
        else:
            total += np.sum(scores_TE.mean(0) * counts / (t * k) * n_experts)
    return total


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_is_the_official_balance_loss_of_each_unpadded_row(seq_aux):
    """A left-padded batch of three conversations: the step's aux_loss is alpha times the official
    formula over the real tokens (seq_aux: its mean over the rows, each row alone and unpadded); the
    reported loss stays the cross-entropy; a row of nothing but padding changes nothing."""
    model, examples = setup()
    cfg, alpha = with_alpha(model.cfg, 0.05, seq_aux), 0.05
    rows = examples[:3]
    s = loop.Settings(steps=10, warmup=1, batch=len(rows), max_seq_len=128, lora_rank=0, parts=("language",))
    module = training_module(cfg)
    want = []
    for ex in rows:  # each row alone: no padding, every position counts, as in the official code
        inputs = loss.LossInputs.from_batch(data.collate(model.processor, [ex]))
        assert inputs.valid.all()
        _, (scores, idx) = loss.forward_with_router(module, model.params, inputs)
        want.append(official_balance(scores[:, 0], idx[:, 0], cfg.language.n_routed_experts, seq_aux))
    if seq_aux:
        expected = alpha * np.mean(want)
    else:  # token-level over the batch's real tokens: not a mean over rows, computed below from the batch
        expected = None
    got_loss, _, metrics = gradient_of_one_step(model, rows, s, cfg, metrics_too=True)
    plain_loss, _ = gradient_of_one_step(model, rows, s, with_alpha(model.cfg, 0.0))
    assert got_loss == plain_loss  # the reported loss is the cross-entropy alone
    batch = jax.tree.map(lambda x: x[0], batches.stack(model.processor, [rows], 128))
    assert not batch.valid.all()  # the rows were padded
    _, (scores, idx) = loss.forward_with_router(module, model.params, batch)
    if not seq_aux:
        keep = np.asarray(batch.valid).reshape(-1)
        n_layers, e = scores.shape[0], cfg.language.n_routed_experts
        flat_s = np.asarray(scores).reshape(n_layers, -1, e)[:, keep]
        flat_i = np.asarray(idx).reshape(n_layers, -1, idx.shape[-1])[:, keep]
        expected = alpha * official_balance(flat_s, flat_i, e, seq_aux=False)
    np.testing.assert_allclose(metrics["aux_loss"], expected, rtol=2e-5)
    # a row of padding changes neither the balance sum nor the row count
    pad = jax.tree.map(lambda x: np.concatenate([x, np.zeros_like(x[:1])]), (scores.transpose(1, 0, 2, 3),
                                                                                 idx.transpose(1, 0, 2, 3)))
    valid = np.concatenate([np.asarray(batch.valid), np.zeros_like(batch.valid[:1])])
    a, r = loss.balance_loss(scores, idx, batch.valid, cfg.language)
    a_pad, r_pad = loss.balance_loss(pad[0].transpose(1, 0, 2, 3), pad[1].transpose(1, 0, 2, 3), valid, cfg.language)
    assert int(r) == int(r_pad) == len(rows) and float(a_pad) == pytest.approx(float(a), rel=1e-6)


def test_router_choices_for_the_balance_loss_are_the_inference_routing():
    model, examples = setup()
    inputs = jax.tree.map(lambda x: x[0], batches.stack(model.processor, [examples], 128))
    _, (scores, idx) = loss.forward_with_router(training_module(model.cfg), model.params, inputs)
    e = model.cfg.language.n_routed_experts
    counts = np.sum(np.asarray(idx)[..., None] == np.arange(e), axis=(1, 2, 3))
    module = training_module(model.cfg)
    x = module.apply(model.params, inputs.ids, loss.normalize_pixels(inputs.pixels, inputs.pixel_norm),
                     inputs.image_src, inputs.images_seq_mask, method="embed")
    load = module.apply(model.params, x, inputs.positions, inputs.valid,
                        method=lambda m, *a: m.language.expert_load(*a))
    np.testing.assert_array_equal(counts, np.asarray(load))
    np.testing.assert_allclose(np.asarray(scores).sum(-1), 1.0, rtol=1e-5)  # softmax scores


def test_alpha_0_is_the_cross_entropy_alone_and_alpha_above_0_moves_the_router():
    model, examples = setup()
    s = loop.Settings(steps=10, warmup=1, batch=4, max_seq_len=128, lora_rank=0, parts=("language",))
    zero_loss, zero, zero_m = gradient_of_one_step(model, examples, s, with_alpha(model.cfg, 0.0), metrics_too=True)
    assert zero_m["aux_loss"] == 0.0
    inputs = jax.tree.map(lambda x: x[0], batches.stack(model.processor, [examples], 128))
    want_loss, want = loss.loss_and_grad_fn(training_module(model.cfg))(model.params, inputs)
    want = traverse_util.flatten_dict(host(want)["params"], sep="/")
    assert abs(zero_loss - float(want_loss)) <= 1e-6 * zero_loss
    for k in zero:
        assert np.abs(zero[k] - want[k]).max() <= 1e-5 * max(np.abs(want[k]).max(), 1e-30), k
    some_loss, some, some_m = gradient_of_one_step(model, examples, s, with_alpha(model.cfg, 0.1), metrics_too=True)
    assert some_m["aux_loss"] > 0 and some_loss == zero_loss
    router = "language/layers_1/mlp/router_w"
    assert np.abs(some[router] - zero[router]).max() > 1e-3 * np.abs(zero[router]).max()


def test_a_second_run_into_the_same_out_needs_resume_or_force(tmp_path, capsys):
    """An --out that holds an earlier run is not overwritten by accident: refused without --resume or
    --force; --force starts over there (the old train state goes). A run of 2 steps needs no --warmup
    (the default warmup is below half the steps)."""
    path = write_dataset(tmp_path, jsonl_records(tmp_path))
    out = tmp_path / "out"
    args = ["--model", "random:test", "--data", path, "--out", str(out), "--lora-rank", "4", "--max-seq-len", "128"]
    assert main([*args, "--steps", "3", "--save-every", "1"]) == 0, capsys.readouterr().err
    steps = lambda: sorted(p.name for p in (out / "train_state").iterdir() if p.name.isdigit())  # noqa: E731
    assert steps()[-1] == "3"
    before = (out / "metrics.json").read_text()
    assert main([*args, "--steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "already holds files" in err and "--force" in err and (out / "metrics.json").read_text() == before
    (out / "notes.txt").write_text("mine")  # --force starts over only in a folder that holds a run alone
    assert main([*args, "--steps", "2", "--force"]) == 1
    assert "holds files that no run writes (notes.txt)" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    assert main([*args, "--steps", "2", "--force"]) == 0, capsys.readouterr().err
    assert "trained 2 steps" in capsys.readouterr().out
    assert steps() == ["2"]
    assert len(json.loads((out / "metrics.json").read_text())["losses"]) == 2


def test_a_two_step_run_shows_its_first_update_in_the_losses(tmp_path, capsys):
    """The default warmup leaves a 2-step smoke test none (the first warmup step runs at rate 0, and each
    loss is its step's before its update): one record, so the two steps' batches are the same."""
    path = write_dataset(tmp_path, [RECORDS[1]])
    assert main(["--model", "random:test", "--data", path, "--out", str(tmp_path / "out"), "--steps", "2",
                 "--batch", "1", "--lr", "1e-2", "--lora-rank", "4", "--max-seq-len", "128"]) == 0, capsys.readouterr().err
    first, second = json.loads((tmp_path / "out" / "metrics.json").read_text())["losses"]
    assert second < first - 1e-3, (first, second)


def test_outputs_that_are_not_a_runs_or_cannot_be_written_are_refused_before_loading(tmp_path, capsys):
    """--force never starts over in a folder that holds no run (its files stay); an --out or --export-hf
    that cannot be created, and an --export-hf that holds a converted checkpoint, are refused before
    anything loads; so are a --lora-alpha that is 0 or goes with --full, and --eval-every without --eval."""
    path = write_dataset(tmp_path, [RECORDS[1]])
    base = ["--model", "random:test", "--data", path, "--steps", "1", "--max-seq-len", "128"]
    args = [*base, "--lora-rank", "4"]
    mine = tmp_path / "mine"
    (mine / "params").mkdir(parents=True)
    (mine / "params" / "notes.txt").write_text("mine")
    (mine / "config.json").write_text('{"my": 1}')
    assert main([*args, "--out", str(mine), "--force"]) == 1
    assert "holds no earlier run (no train_state/), so --force will not start over there" in capsys.readouterr().err
    assert (mine / "params" / "notes.txt").read_text() == "mine" and (mine / "config.json").read_text() == '{"my": 1}'
    blocked = [(str(tmp_path / "train.jsonl" / "sub"), "train.jsonl is a file, not a folder")]
    if os.path.isdir("/proc"):
        blocked.append(("/proc/vl2-out", "/proc does not allow creating folders in it"))
    for where, why in blocked:
        assert main([*args, "--out", where]) == 1
        assert why in capsys.readouterr().err
        assert main([*args, "--out", str(tmp_path / "out"), "--export-hf", where]) == 1
        assert why in capsys.readouterr().err
    converted = tmp_path / "converted"
    (converted / "params").mkdir(parents=True)
    (converted / "vl2_jax_checkpoint.json").write_text("{}")
    assert main([*args, "--out", str(tmp_path / "out"), "--export-hf", str(converted)]) == 1
    assert "holds a converted checkpoint or a fine-tuning run" in capsys.readouterr().err
    for extra, words in ((["--lora-alpha", "0"], "--lora-alpha: must be a finite number above 0 (got 0)"),
                         (["--lora-alpha", "inf"], "--lora-alpha: must be a finite number above 0 (got inf)"),
                         (["--lr", "0"], "--lr: must be a finite number above 0 (got 0)"),
                         (["--lr", "inf"], "--lr: must be a finite number above 0 (got inf)"),
                         (["--full", "--lora-alpha", "4"], "--full trains the weights themselves and takes none"),
                         (["--eval-every", "1"], "--eval-every goes with --eval FILE")):
        with pytest.raises(SystemExit) as exit_:
            main([*base, "--out", str(tmp_path / "out"), *extra])
        assert exit_.value.code == 2 and words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "mine", "train.jsonl"]  # (no probe left)
    with pytest.raises(ConfigError, match="--lora-alpha must be a finite number above 0"):
        loop.Settings(lora_rank=4, lora_alpha=0.0)
    with pytest.raises(ConfigError, match=r"--lr must be a finite number above 0 \(got 0.0\)"):
        loop.Settings(lr=0.0)
    with pytest.raises(ConfigError, match=r"--clip must be a number, 0 or more \(0: no clipping; got -1.0\)"):
        loop.Settings(clip=-1.0)


def test_clip_0_is_no_clipping():
    """--clip 0 leaves the gradient as it is (as transformers' max_grad_norm 0), not scaled to nothing."""
    grads = {"w": jnp.full((4,), 100.0)}
    for clip, norm in ((0.0, 200.0), (1.0, 1.0)):
        tx = loop.clipping(loop.Settings(clip=clip))
        out, _ = tx.update(grads, tx.init(grads))
        assert float(optax.tree.norm(out)) == pytest.approx(norm)


def test_a_runs_folder_may_hold_its_export_hf(tmp_path):
    """--force takes a folder with a train_state/ and what runs write, an --export-hf inside it (and its
    staging folder) included; anything else makes it not a run's."""
    out = tmp_path / "out"
    for name in ("train_state", "params", "hf", "hf.partial-7"):
        (out / name).mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    assert run._not_a_run(out, out.absolute() / "hf") is None
    assert run._not_a_run(out, None) == "holds files that no run writes (hf, hf.partial-7)"
    (out / "train_state").rmdir()
    assert run._not_a_run(out, out.absolute() / "hf") == "holds no earlier run (no train_state/)"


def test_loading_a_run_that_has_not_written_its_model_says_to_resume_it(tmp_path):
    (tmp_path / "train_state").mkdir()
    (tmp_path / "train_state" / "settings.json").write_text("{}")  # (a run stopped before its model was written)
    with pytest.raises(vl2_jax.ConfigError, match=r"has not written its model yet; finish it \(python -m "
                       r"vl2_jax.finetune \.\.\. --out .* --resume\)"):
        vl2_jax.load_model(str(tmp_path))


def test_a_quantized_checkpoint_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """A `convert --quant int8` output cannot learn (int8 weights have no gradient): one error saying to
    convert again without --quant, before the data or the weights are read; a checkpoint whose format is
    known only once loaded (a hub id's) is refused right after loading, before training."""
    from conftest import ckpt_dir

    from vl2_jax import orbax_io

    q8 = tmp_path / "q8"
    orbax_io.convert_checkpoint(ckpt_dir("mha"), q8, "float32", quant="int8")
    path = write_dataset(tmp_path, RECORDS[1:])
    args = ["--model", str(q8), "--data", path, "--out", str(tmp_path / "out"), "--max-seq-len", "128", "--steps", "2"]
    for kind in ([], ["--full"]):
        assert main([*args, *kind]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --model") and "holds int8 weights" in err[0], err
        assert "fine-tuning needs float" in err[0] and "again without --quant" in err[0]
        assert not (tmp_path / "out").exists()
    monkeypatch.setattr(run, "_saved_quant", lambda spec: "none")
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "holds int8 weights" in err[-1] and any("model ready" in line for line in err)
    assert not any(line.startswith("training:") for line in err)


def test_resume_refuses_another_model_dtype_or_moe_and_keeps_the_metrics_history(tmp_path, capsys):
    """settings.json records the model, dtype, MoE dispatch and the data's digest: a resume with others is refused in one
    line before anything loads; a resumed run's metrics.json keeps the earlier run's steps and evals."""
    path = write_dataset(tmp_path, jsonl_records(tmp_path))
    out = tmp_path / "out"
    args = ["--model", "random:test", "--data", path, "--eval", path, "--out", str(out), "--steps", "4",
            "--save-every", "2", "--eval-every", "2", "--lora-rank", "4", "--max-seq-len", "128"]
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    whole = json.loads((out / "metrics.json").read_text())
    assert whole["first_step"] == 1 and len(whole["losses"]) == 4 and list(whole["evals"]) == ["2", "4"]
    recorded = json.loads((out / "train_state" / "settings.json").read_text())
    assert (recorded["model"], recorded["dtype"], recorded["moe"]) == ("random:test", "float32", "blocked")
    shutil.rmtree(out / "train_state" / "4")  # as if the run had stopped after the save at step 2
    for other, want in ((["--model", "random:tiny"], "model 'random:test' -> 'random:tiny'"),
                        (["--dtype", "bfloat16"], "dtype 'float32' -> 'bfloat16'"),
                        (["--moe", "dense"], "moe 'blocked' -> 'dense'")):
        assert main([*args, "--resume", *other]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "used other settings" in err[0] and want in err[0], err
    edited = tmp_path / "edited.jsonl"  # (another file of other conversations: the run's order would not hold)
    edited.write_text((tmp_path / "train.jsonl").read_text() + json.dumps(RECORDS[1]) + "\n")
    assert main([*args[:3], str(edited), *args[4:], "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data file is not the one the saved run" in err[0], err
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    assert "trained 2 steps" in capsys.readouterr().out
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["first_step"] == 1 and len(resumed["losses"]) == len(resumed["aux_losses"]) == 4
    assert resumed["losses"][:2] == whole["losses"][:2] and resumed["evals"]["2"] == whole["evals"]["2"]
    assert list(resumed["evals"]) == ["2", "4"]
    assert main([*args, "--resume"]) == 0  # (finished: nothing trained or saved again)
    captured = capsys.readouterr()
    assert "nothing to train" in captured.out and "its model is there" in captured.out, captured
    assert "saved" not in captured.err, captured
    assert main([*args, "--steps", "6", "--resume"]) == 1  # (a run's schedule ends at its --steps)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "steps 4 -> 6" in err[0] and "(--steps 4: the learning rate decays to zero there)" in err[0]
    assert f"train its model further in a new run (--model {out} --out ANOTHER)" in err[0], err
    for written_last in (out / "train_state" / run.FINISHED, out / "vl2_jax_checkpoint.json"):
        written_last.unlink()  # as if the run had stopped while writing its model: resuming writes it
    assert main([*args, "--resume"]) == 0
    captured = capsys.readouterr()
    assert "nothing to train: " in captured.out and "wrote what it had not written yet" in captured.out
    assert (out / "vl2_jax_checkpoint.json").is_file() and f"saved the trained model to {out}" in captured.err
    fresh = {"first_step": 3, "losses": [1.0], "aux_losses": [0.0], "evals": {"3": 2.0}}
    assert run.merged_metrics(None, 3, [1.0], [0.0], {3: 2.0}) == fresh
    earlier = {"first_step": 1, "losses": [5.0], "aux_losses": [0.1], "evals": {"1": 4.0, "3": 9.0}}
    assert run.merged_metrics(earlier, 3, [1.0], [0.0], {3: 2.0}) == {  # step 2 was never recorded
        "first_step": 1, "losses": [5.0, None, 1.0], "aux_losses": [0.1, None, 0.0], "evals": {"1": 4.0, "3": 2.0}}


def test_export_hf_into_a_folder_with_weights_needs_force(tmp_path, capsys):
    """--export-hf DIR that holds weights (shards and their index) is refused before anything loads;
    with --force those files alone are replaced. One step, one conversation: said in the singular."""
    path = write_dataset(tmp_path, [RECORDS[1]])
    hf, out = tmp_path / "hf", tmp_path / "out"
    hf.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", export.HF_INDEX, "notes.txt"):
        (hf / name).write_text("old")
    args = ["--model", "random:test", "--data", path, "--out", str(out), "--steps", "1", "--lora-rank", "4",
            "--max-seq-len", "128", "--export-hf", str(hf)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds weights (model-00001-of-00002.safetensors" in err[0] and "--force" in err[0]
    assert not out.exists()
    assert main([*args, "--force"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "trained 1 step:" in captured.out
    assert "train.jsonl: 1 conversation\n" in captured.err and "1 step of 1 conversation\n" in captured.err
    assert sorted(p.name for p in export.weight_files(hf)) == ["model.safetensors"]
    assert (hf / "notes.txt").read_text() == "old"
    back, tuned = vl2_jax.load_model(str(hf), "float32"), vl2_jax.load_model(str(out), "float32")
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(tuned.params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="already holds weights"):
        export.write_hf(tuned.cfg, tuned.params, hf, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out", "train.jsonl"]  # (no staging folder left)
    model, out2 = tmp_path / "model", tmp_path / "out2"
    shutil.copytree(out, model)
    for same, what in ((out2, "the --out folder"), (model, "the --model folder")):  # the export goes elsewhere
        again = ["--model", str(model), "--data", path, "--out", str(out2), "--steps", "1", "--export-hf", str(same),
                 "--force"]
        assert main(again) == 1 and what in capsys.readouterr().err
    from vl2_jax import orbax_io

    assert orbax_io.is_converted(model) and not out2.exists()


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path):
    """`python -m vl2_jax.finetune` stopped by SIGTERM mid-training (as a job scheduler stops it): the step
    under way ends and the train state is saved (whole, no Orbax temporary folder), then one "interrupted"
    line, exit status 130, no stack dump."""
    path = write_dataset(tmp_path, jsonl_records(tmp_path))
    code, seen, rest = sigterm_when(["-m", "vl2_jax.finetune", "--model", "random:test", "--data", path, "--out",
                                     str(tmp_path / "out"), "--steps", "200", "--warmup", "1"],
                                    ready="step 10/200:")  # (a progress line: steps are under way)
    assert code == 130, seen + rest
    assert rest.strip().splitlines()[-1] == "interrupted" and "Traceback" not in rest and "SIGTERM" not in rest, rest
    saved = sorted(p.name for p in (tmp_path / "out" / "train_state").iterdir())
    assert re.search(r"stopped at step (\d+)/200; its train state is saved", rest), rest
    step = re.search(r"stopped at step (\d+)/", rest).group(1)
    assert saved == [step, "settings.json"], saved



def test_two_ctrl_cs_while_the_first_step_compiles_end_with_interrupted_not_a_crash(tmp_path):
    """The second Ctrl-C raises at once, while XLA still compiles the step on its threads: the command
    leaves the process there (Python's teardown beside the compile crashed it with SIGSEGV in about
    half of such stops)."""
    path = write_dataset(tmp_path, jsonl_records(tmp_path))
    code, seen, rest = sigterm_when(["-m", "vl2_jax.finetune", "--model", "random:test", "--data", path, "--out",
                                     str(tmp_path / "out"), "--steps", "20", "--warmup", "1"],
                                    ready="training:", signals=("SIGINT", "SIGINT"))
    assert code == 130, seen + rest
    assert rest.strip().splitlines()[-1] == "interrupted" and "SIGSEGV" not in rest, rest


def test_a_second_interrupt_while_the_state_is_written_waits_for_the_write(tmp_path, monkeypatch):
    """The first Ctrl-C comes during a step, the impatient second one while the train state is written:
    the write and the run's own files finish (no half-written step), then the run stops."""
    import signal

    model, examples = setup()
    compiled_step, save_state = loop.compiled_step, loop.save_state

    def step_then_ctrl_c(*args, **kwargs):
        step = compiled_step(*args, **kwargs)

        def run(state, inputs):
            out = step(state, inputs)
            os.kill(os.getpid(), signal.SIGINT)  # (the handler runs at once: the first Ctrl-C, mid-step)
            return out

        return run

    written = []

    def save_after_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the second, while the state is being written
        save_state(*args, **kwargs)
        written.append("state")

    monkeypatch.setattr(loop, "compiled_step", step_then_ctrl_c)
    monkeypatch.setattr(loop, "save_state", save_after_ctrl_c)
    s = loop.Settings(steps=5, batch=4, warmup=1, max_seq_len=128)
    with pytest.raises(KeyboardInterrupt):
        loop.fit(training_module(model.cfg), model.processor, model.params, examples, s, state_dir=tmp_path,
                 bar=False, on_save=lambda result: written.append("on_save"))
    assert written == ["state", "on_save"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "settings.json"]
