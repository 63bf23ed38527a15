"""One optimizer step of supervised fine-tuning: optax over a chosen subset of the parameters.

The parameters are split by path (`"language/layers_3/attn/q_w"`: `params/` left out) into trainable
and frozen leaves. Only the trainable ones get gradients, optimizer state and updates; the frozen ones
pass through the step untouched (bit-identical, never even added to). `train_step_fn` compiles the
step once per input shape; its state is donated. Its loss is the cross-entropy alone (no expert
balance loss: `loop.step_fn`, the fine-tuning loop's step, adds that).

    state = init_state(model.params, optax.adamw(1e-4), trainable=[r"language/.*attn/"])
    step = train_step_fn(training_module(model.cfg), optax.adamw(1e-4))
    state, metrics = step(state, LossInputs.from_batch(batch, tiles=...))
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from vl2_jax.errors import ConfigError
from vl2_jax.modules.vl2 import VL2
from vl2_jax.training.loss import LossInputs, cross_entropy, forward


@dataclasses.dataclass(frozen=True)
class TrainState:
    """step: int32 scalar, optimizer steps taken. trainable, frozen: {path: array}, the parameters by
    path (`"vision/block_0/qkv_w"`). opt_state: the optimizer's state over `trainable`."""

    step: jax.Array
    trainable: dict[str, jax.Array]
    frozen: dict[str, jax.Array]
    opt_state: Any

    @property
    def params(self) -> dict:
        """The whole parameter tree `{"params": ...}`, as the model takes it."""
        return {"params": traverse_util.unflatten_dict({**self.trainable, **self.frozen}, sep="/")}


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "trainable", "frozen", "opt_state"], meta_fields=[])


def split_params(params: dict, trainable: Sequence[str] | Callable[[str], bool]) -> tuple[dict, dict]:
    """`{"params": tree}` -> ({path: leaf} trainable, {path: leaf} frozen). `trainable`: regular
    expressions, one of which must match the start of a path (`re.match`), or a predicate on paths."""
    flat = traverse_util.flatten_dict(params.get("params", params), sep="/")
    if callable(trainable):
        chosen = trainable
    else:
        patterns = [re.compile(p) for p in trainable]
        chosen = lambda path: any(p.match(path) for p in patterns)  # noqa: E731
    train = {k: v for k, v in flat.items() if chosen(k)}
    if not train:
        raise ConfigError(f"no parameter matches the trainable patterns {trainable!r}; paths look like "
                          f"{next(iter(flat))!r}.")
    return train, {k: v for k, v in flat.items() if k not in train}


def init_state(params: dict, optimizer: optax.GradientTransformation,
               trainable: Sequence[str] | Callable[[str], bool] = (".",)) -> TrainState:
    """A TrainState holding `params`' arrays (a step donates them: keep no other use of them) and the
    optimizer's fresh state over the trainable ones (default: all)."""
    train, frozen = split_params(params, trainable)
    return TrainState(jnp.zeros((), jnp.int32), train, frozen, optimizer.init(train))


def train_step_fn(module: VL2, optimizer: optax.GradientTransformation):
    """A jitted (state, inputs) -> (new state, {"loss": mean cross-entropy, "targets": count}) that
    donates `state`. `module`: from `training_module`; `optimizer`: the one `init_state` was given."""

    def loss_of(train, frozen, inputs: LossInputs):
        params = {"params": traverse_util.unflatten_dict({**train, **frozen}, sep="/")}
        total, count = cross_entropy(forward(module, params, inputs), inputs.labels, inputs.valid)
        return total / jnp.maximum(count, 1), count

    def step(state: TrainState, inputs: LossInputs):
        (loss, count), grads = jax.value_and_grad(loss_of, has_aux=True)(state.trainable, state.frozen, inputs)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new = TrainState(state.step + 1, trainable, state.frozen, opt_state)
        return new, {"loss": loss, "targets": count}

    return jax.jit(step, donate_argnums=0)
