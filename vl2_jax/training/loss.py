"""The supervised loss of a labelled batch and its gradient with respect to the parameters.

The loss is the official one (`DeepseekV2ForCausalLM.forward` with labels): the logits at position t
predict the label at t + 1; the mean of the cross-entropy (float32 log-softmax) over every label of
the batch that is not IGNORE_ID, so that each target token weighs the same whatever its row.

The forward is the model's own (`VL2.__call__`) under a differentiable runtime: the plain MoE dispatch
("dense": every expert on every token, each token keeping its chosen ones) and no accelerator kernels
(they have no gradients). Routing is the inference routing, `noaux_tc` included; there is no auxiliary
load-balancing loss. Positions of left-padded rows are `cumsum(mask) - 1`, as in generation, so that a
row's loss does not depend on its padding, and a pad token's prediction is no target. (The official
forward with labels uses `arange` positions, which shifts a padded row's positions, and counts the
prediction of a padded row's bos; on unpadded rows the two agree.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vl2_jax.config import Runtime, VL2Config
from vl2_jax.errors import ConfigError, InputError
from vl2_jax.modules.vision import normalize_pixels
from vl2_jax.modules.vl2 import VL2
from vl2_jax.processor import IGNORE_ID, canonical_pixel_norm, left_pad_positions
from vl2_jax.training.data import LabelledBatch
from vl2_jax.training.remat import RematVL2

DIFFERENTIABLE_MOE = ("dense",)  # the MoE dispatches whose gradients are tested against the official code


@dataclasses.dataclass(frozen=True)
class LossInputs:
    """A labelled batch as the loss reads it (a pytree; `pixel_norm` is static).

    ids, labels, positions: [B, T] int32. valid (real tokens), images_seq_mask: [B, T] bool.
    image_src: [B, T] int32 (`processor.image_token_sources`). pixels: [I, S, S, 3] uint8, the used
    tiles in feature order (zero tiles may follow: no position reads them), or None without images.
    """

    ids: jax.Array
    labels: jax.Array
    positions: jax.Array
    valid: jax.Array
    images_seq_mask: jax.Array
    image_src: jax.Array
    pixels: jax.Array | None
    pixel_norm: tuple | None = None

    @classmethod
    def from_batch(cls, labelled: LabelledBatch, tiles: int | None = None) -> LossInputs:
        """Host arrays of a LabelledBatch. `tiles`: pad the used tiles with zero tiles to this many, also
        for a batch without images (a fixed shape for a compiled step); None keeps the used ones."""
        batch = labelled.batch
        pixels = batch.used_tiles()
        if tiles is not None:
            used = 0 if pixels is None else len(pixels)
            if used > tiles:
                raise InputError(f"the batch uses {used} image tiles, more than the {tiles} allowed.")
            zeros = np.zeros((tiles - used, *np.shape(batch.pixels)[2:]), np.uint8)
            pixels = zeros if pixels is None else np.concatenate([pixels, zeros])
        mask = np.asarray(batch.attention_mask, bool)
        return cls(np.asarray(batch.input_ids, np.int32), np.asarray(labelled.labels, np.int32),
                   left_pad_positions(mask), mask, np.asarray(batch.images_seq_mask, bool),
                   np.asarray(batch.image_src, np.int32), pixels, canonical_pixel_norm(batch.pixel_norm))


jax.tree_util.register_dataclass(
    LossInputs,
    data_fields=["ids", "labels", "positions", "valid", "images_seq_mask", "image_src", "pixels"],
    meta_fields=["pixel_norm"],
)


def training_module(cfg: VL2Config, dtype=jnp.float32, runtime: Runtime | None = None, remat: bool = False) -> VL2:
    """The model for training: `runtime` defaults to `Runtime.plain()`; one that runs kernels or an MoE
    dispatch other than DIFFERENTIABLE_MOE is refused. `remat`: each decoder layer under
    `jax.checkpoint` (`training.remat`; same parameters, same values)."""
    runtime = Runtime.plain() if runtime is None else runtime
    if runtime.kernels or runtime.moe not in DIFFERENTIABLE_MOE:
        raise ConfigError(f"training needs Runtime(kernels=False, moe in {DIFFERENTIABLE_MOE}) (the kernels and "
                          f"the other dispatches have no tested gradients); got kernels={runtime.kernels}, "
                          f"moe={runtime.moe!r}. Use Runtime.plain().")
    return (RematVL2 if remat else VL2)(cfg, jnp.dtype(dtype).type, runtime)


def cross_entropy(logits_BTV: jax.Array, labels_BT: jax.Array,
                  valid_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy float32, number of targets int32) of logits [B, T, V] against the labels
    [B, T] shifted by one: position t predicts labels[t + 1]; IGNORE_ID labels are skipped, and so,
    given `valid_BT` (real tokens), are predictions from padding. (A left-padded row's first label, its
    bos, would otherwise be the target of a pad token: the official batchify pads labels so, and counts
    it.)"""
    targets_BT = labels_BT[:, 1:]
    keep_BT = targets_BT != IGNORE_ID
    if valid_BT is not None:
        keep_BT &= valid_BT[:, :-1]
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    picked_BT = jnp.take_along_axis(logp_BTV, jnp.where(keep_BT, targets_BT, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(keep_BT, picked_BT, 0.0)), jnp.sum(keep_BT, dtype=jnp.int32)


def mean_cross_entropy(logits_BTV: jax.Array, labels_BT: jax.Array, valid_BT: jax.Array | None = None) -> jax.Array:
    """The official loss: `cross_entropy`'s sum over its count (0 with no target)."""
    total, count = cross_entropy(logits_BTV, labels_BT, valid_BT)
    return total / jnp.maximum(count, 1)


def forward(module: VL2, params: dict, inputs: LossInputs) -> jax.Array:
    """Float32 logits [B, T, V] of a batch (the tiles normalised on the device)."""
    tiles = None if inputs.pixels is None else normalize_pixels(inputs.pixels, inputs.pixel_norm)
    return module.apply(params, inputs.ids, tiles, inputs.image_src, inputs.images_seq_mask,
                        inputs.positions, inputs.valid)


def loss(module: VL2, params: dict, inputs: LossInputs) -> jax.Array:
    """The batch's mean cross-entropy over its target tokens: a float32 scalar."""
    return mean_cross_entropy(forward(module, params, inputs), inputs.labels, inputs.valid)


def loss_and_grad_fn(module: VL2) -> Callable[[dict, LossInputs], tuple[jax.Array, dict]]:
    """A jitted (params, inputs) -> (loss, gradient: a tree like params)."""
    return jax.jit(jax.value_and_grad(lambda params, inputs: loss(module, params, inputs)))
