"""The supervised loss of a labelled batch and its gradient with respect to the parameters.

The loss is the official one (`DeepseekV2ForCausalLM.forward` with labels): the logits at position t
predict the label at t + 1; the mean of the cross-entropy (float32 log-softmax) over every label of
the batch that is not IGNORE_ID, so that each target token weighs the same whatever its row.

The forward is the model's own (`VL2.__call__`) under a differentiable runtime: no accelerator kernels
(they have no gradients) and an MoE dispatch of DIFFERENTIABLE_MOE: the plain "dense" one (every expert
on every token, each token keeping its chosen ones: experts / top-k times the work of the chosen
experts), "blocked" (the default of `training_runtime`: expert-sorted blocks, the chosen experts' work
plus under a block per expert, whatever the routing) or "grouped" (per-expert slots of a bounded
capacity, the dense path for a layer whose slots overflow), all through XLA, whose gradients equal the
dense one's. Routing is the inference routing, `noaux_tc` included. `loss` and
`loss_and_grad_fn` are the cross-entropy alone (the official gradient at aux_loss_alpha = 0); the
fine-tuning step (`loop.step_fn`) adds the expert balance loss, `balance_loss`, from
`forward_with_router`. Positions of left-padded rows are `cumsum(mask) - 1`, as in generation, so that a
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

from vl2_jax.config import LanguageConfig, Runtime, VL2Config
from vl2_jax.errors import ConfigError, InputError
from vl2_jax.modules.vision import normalize_pixels
from vl2_jax.modules.vl2 import VL2
from vl2_jax.processor import IGNORE_ID, canonical_pixel_norm, left_pad_positions
from vl2_jax.training.data import LabelledBatch
from vl2_jax.training.remat import RematVL2

DIFFERENTIABLE_MOE = ("blocked", "dense", "grouped")  # the MoE dispatches whose gradients are tested against the official code


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


def training_runtime(moe: str = "blocked") -> Runtime:
    """`Runtime.plain()` with the MoE dispatch `moe` (one of DIFFERENTIABLE_MOE)."""
    if moe not in DIFFERENTIABLE_MOE:
        raise ConfigError(f"training runs the MoE dispatch {', '.join(DIFFERENTIABLE_MOE)} (got {moe!r}).")
    return dataclasses.replace(Runtime.plain(), moe=moe)


def training_module(cfg: VL2Config, dtype=jnp.float32, runtime: Runtime | None = None, remat: bool = False) -> VL2:
    """The model for training: `runtime` defaults to `Runtime.plain()`; one that runs kernels or an MoE
    dispatch other than DIFFERENTIABLE_MOE is refused. `remat`: each decoder layer under
    `jax.checkpoint` (`training.remat`; same parameters, same values)."""
    runtime = Runtime.plain() if runtime is None else runtime
    if runtime.kernels or runtime.moe not in DIFFERENTIABLE_MOE:
        raise ConfigError(f"training needs Runtime(kernels=False, moe in {DIFFERENTIABLE_MOE}) (the kernels and "
                          f"the other dispatches have no tested gradients); got kernels={runtime.kernels}, "
                          f"moe={runtime.moe!r}. Use Runtime.plain() or training_runtime(moe).")
    return (RematVL2 if remat else VL2)(cfg, jnp.dtype(dtype).type, runtime)


def cross_entropy(logits_BTV: jax.Array, labels_BT: jax.Array,
                  valid_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy float32, number of targets int32) of logits [B, T, V] against the labels
    [B, T] shifted by one: position t predicts labels[t + 1]; IGNORE_ID labels are skipped, and so,
    given `valid_BT` (real tokens), are predictions from padding. (A left-padded row's first label, its
    bos, would otherwise be the target of a pad token: the official batchify pads labels so, and counts
    it.)"""
    targets_BT, keep_BT = labels_BT[:, 1:], target_mask(labels_BT, valid_BT)
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    picked_BT = jnp.take_along_axis(logp_BTV, jnp.where(keep_BT, targets_BT, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(keep_BT, picked_BT, 0.0)), jnp.sum(keep_BT, dtype=jnp.int32)


def target_mask(labels_BT: jax.Array, valid_BT: jax.Array | None = None) -> jax.Array:
    """[B, T - 1] bool: the positions whose next label is a target (`cross_entropy`); also [..., B, T]."""
    keep = labels_BT[..., 1:] != IGNORE_ID
    return keep if valid_BT is None else keep & valid_BT[..., :-1]


def mean_cross_entropy(logits_BTV: jax.Array, labels_BT: jax.Array, valid_BT: jax.Array | None = None) -> jax.Array:
    """The official loss: `cross_entropy`'s sum over its count (0 with no target)."""
    total, count = cross_entropy(logits_BTV, labels_BT, valid_BT)
    return total / jnp.maximum(count, 1)


def forward(module: VL2, params: dict, inputs: LossInputs) -> jax.Array:
    """Float32 logits [B, T, V] of a batch (the tiles normalised on the device)."""
    tiles = None if inputs.pixels is None else normalize_pixels(inputs.pixels, inputs.pixel_norm)
    return module.apply(params, inputs.ids, tiles, inputs.image_src, inputs.images_seq_mask,
                        inputs.positions, inputs.valid)


def forward_with_router(module: VL2, params: dict, inputs: LossInputs):
    """`forward` that also returns the MoE layers' router scores [L, B, T, E] float32 and expert ids
    [L, B, T, X] int32 (`VL2.with_router`; None without MoE layers)."""
    tiles = None if inputs.pixels is None else normalize_pixels(inputs.pixels, inputs.pixel_norm)
    return module.apply(params, inputs.ids, tiles, inputs.image_src, inputs.images_seq_mask,
                        inputs.positions, inputs.valid, method="with_router")


def balance_alpha(cfg: LanguageConfig) -> float:
    """The weight of the balance loss in the objective: `aux_loss_alpha`, or 0 without routed experts
    and for `noaux_tc` routing (its correction bias balances the experts; the official MoEGate refuses
    to train it, so we train it without the loss)."""
    if cfg.n_routed_experts is None or cfg.topk_method == "noaux_tc":
        return 0.0
    return float(cfg.aux_loss_alpha)


def balance_loss(scores_LBTE: jax.Array, idx_LBTX: jax.Array, valid_BT: jax.Array,
                 cfg: LanguageConfig) -> tuple[jax.Array, jax.Array]:
    """The official MoEGate's balance loss without alpha, summed over the L MoE layers: (its sum over the
    batch's rows float32, the number of rows int32), so that a step's loss is the sum over all its
    microbatches over all their rows.

    seq_aux: per row and layer, sum over experts e of f_e * P_e, where f_e is the number of the row's
    top-k choices that picked e, times E / (T * X), and P_e the mean score of e over the row's T tokens.
    Otherwise (token-level): the same over all the batch's tokens at once, counted once per row.

    Where we differ from the official code: only real tokens (`valid_BT`) count, T being the row's real
    tokens, where the official counts every position of its padded batch; a row of padding counts for
    nothing (neither its loss nor its row). On unpadded rows the two agree. The token-level variant is
    over each microbatch, so with gradient accumulation it is a mean over microbatches (seq_aux, the
    released models' setting, is exact under accumulation).
    """
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    valid_1BT = valid_BT[None].astype(jnp.float32)
    chosen_LBTE = jnp.sum(idx_LBTX[..., None] == jnp.arange(e), axis=-2).astype(jnp.float32) * valid_1BT[..., None]
    scored_LBTE = scores_LBTE.astype(jnp.float32) * valid_1BT[..., None]
    tokens_B = jnp.sum(valid_BT, axis=-1).astype(jnp.float32)
    rows_B = tokens_B > 0
    if cfg.seq_aux:
        n_1B1 = jnp.maximum(tokens_B, 1.0)[None, :, None]
        f_LBE = jnp.sum(chosen_LBTE, axis=2) * e / (n_1B1 * k)
        p_LBE = jnp.sum(scored_LBTE, axis=2) / n_1B1
        per_row_B = jnp.sum(f_LBE * p_LBE, axis=(0, 2))
        return jnp.sum(jnp.where(rows_B, per_row_B, 0.0)), jnp.sum(rows_B, dtype=jnp.int32)
    n = jnp.maximum(jnp.sum(tokens_B), 1.0)
    f_LE = jnp.sum(chosen_LBTE, axis=(1, 2)) * e / (n * k)
    p_LE = jnp.sum(scored_LBTE, axis=(1, 2)) / n
    rows = jnp.sum(rows_B, dtype=jnp.int32)
    return jnp.sum(f_LE * p_LE) * rows.astype(jnp.float32), rows


def loss(module: VL2, params: dict, inputs: LossInputs) -> jax.Array:
    """The batch's mean cross-entropy over its target tokens: a float32 scalar."""
    return mean_cross_entropy(forward(module, params, inputs), inputs.labels, inputs.valid)


def loss_and_grad_fn(module: VL2) -> Callable[[dict, LossInputs], tuple[jax.Array, dict]]:
    """A jitted (params, inputs) -> (loss, gradient: a tree like params)."""
    return jax.jit(jax.value_and_grad(lambda params, inputs: loss(module, params, inputs)))
