"""The optax training step on the random test model: the loss falls on a small dataset, and frozen
parameters stay bit-identical."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from PIL import Image

import vl2_jax
from vl2_jax.errors import ConfigError
from vl2_jax.training import data
from vl2_jax.training.loss import LossInputs, training_module
from vl2_jax.training.train import init_state, split_params, train_step_fn

TRAINABLE = (r"language/layers_\d+/attn/", r"language/lm_head", r"projector/")


def dataset(processor):
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), np.uint8))
    records = [
        {"messages": [{"role": "user", "content": "<image>\nWhat is this?"},
                      {"role": "assistant", "content": "Noise."}], "images": [picture]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
        {"messages": [{"role": "system", "content": "Count."}, {"role": "user", "content": "1 2"},
                      {"role": "assistant", "content": "3 4 5"}]},
        {"messages": [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."},
                      {"role": "user", "content": "And grass?"}, {"role": "assistant", "content": "Green."}]},
    ]
    return [data.example(processor, r) for r in records]


def test_loss_falls_and_frozen_leaves_stay_bit_identical():
    model = vl2_jax.load_pretrained("random:test", dtype="float32")
    examples = dataset(model.processor)
    inputs = LossInputs.from_batch(data.collate(model.processor, examples, length=64), tiles=8)
    module = training_module(model.cfg)
    targets = sum(e.targets for e in examples)
    optimizer = optax.adamw(3e-3, weight_decay=0.01)
    state = init_state(model.params, optimizer, TRAINABLE)
    frozen = {k: np.array(v) for k, v in state.frozen.items()}
    trained = {k: np.array(v) for k, v in state.trainable.items()}
    assert frozen and trained and all(k.startswith(("language/", "projector/")) for k in trained)
    step = train_step_fn(module, optimizer)
    losses = []
    for _ in range(8):  # each step reports the loss before its update
        state, metrics = step(state, inputs)
        losses.append(float(metrics["loss"]))
    assert int(metrics["targets"]) == targets  # the padded rows' bos is no target
    assert losses[-1] < 0.8 * losses[0], losses
    assert int(state.step) == 8
    for k, v in frozen.items():
        got = np.asarray(state.frozen[k])
        assert got.tobytes() == v.tobytes(), k
    assert all(not np.array_equal(np.asarray(state.trainable[k]), v) for k, v in trained.items())
    assert jax.tree.structure(state.params) == jax.tree.structure(model.params)  # the tree the model takes


def test_no_trainable_parameter_is_refused():
    params = {"params": {"language": {"embed": np.zeros(2)}}}
    with pytest.raises(ConfigError, match="no parameter matches"):
        split_params(params, [r"vision/"])
