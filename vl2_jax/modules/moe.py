"""Feed-forward layers: the SwiGLU MLP, the DeepSeekMoE router and the mixture of experts.

Routing follows the reference's `MoEGate` exactly (float32 logits; softmax or sigmoid scores; `greedy`,
`group_limited_greedy` or `noaux_tc` selection, masked groups filled with 0.0; optional renormalisation;
`routed_scaling_factor`). Every dispatch computes each token's chosen experts' outputs [N, X, D], and
`combine` sums them weighted in float32, as the reference's `moe_infer`. The plain dense path (every
expert on every token) is the one the faster dispatches are tested against.

Parameter layout (W = 2 stacks the gate and up projections, so that one matmul reads both):
    mlp (dense):  gate_up_w [D, W, F], down_w [F, D]
    mlp (MoE):    router_w [D, E], router_bias [E] (noaux_tc only),
                  gate_up_w [E, D, W, F], down_w [E, F, D], shared/{gate_up_w, down_w}

Quantized weights (`vl2_jax.quant`) arrive as `qwix.QArray`s (values, per-output-channel scales [E, 1,
W, F] and [E, 1, D]). Every dispatch takes them: the XLA products multiply the values and scale the
float32 result (`layers.qeinsum`), the Pallas kernels take the values and scales and dequantize in
registers (prefill's: the blocked dispatch through `kernels.blocked_matmul`), and the ragged path scales
each sorted row by its expert's scales after the grouped matmul.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from vl2_jax.config import LanguageConfig, Runtime
from vl2_jax.kernels import (
    BLOCKED_ROWS,
    EXPERT_ROWS_MULTIPLE,
    ROW_MULTIPLE,
    blocked_matmul,
    blocked_matmul_usable,
    expert_matmul,
    expert_matmul_usable,
    gathered_matvec,
    gathered_matvec_usable,
    local_arrays,
    mosaic_ragged_usable,
    ragged_dot,
)
from vl2_jax.modules.layers import einsum, normal_init, project, qeinsum, weight
from vl2_jax.quant import is_quantized
from vl2_jax.sharding import Layout


def swiglu(h_CF: jax.Array) -> jax.Array:
    """silu(gate) * up from the stacked projections [..., W=2, F] -> [..., F]."""
    return jax.nn.silu(h_CF[..., 0, :]) * h_CF[..., 1, :]


def mlp_kernel_fits(usable, dtype, d: int, f: int, **kw) -> bool:
    """Whether a kernel runs both products of a SwiGLU MLP of width `f` on [., d] inputs: [d, 2f] and
    [f, d]. `usable` is one of `vl2_jax.kernels`' checks; `kw` goes to it (the expert matmul's rows)."""
    return usable(dtype, d, 2 * f, **kw) and usable(dtype, f, d, **kw)


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); x [..., D] -> [..., D]. With `use_kernel`, one row of
    activations runs the matrix-vector kernel (`layers.project`)."""

    dim: int
    hidden: int
    dtype: jnp.dtype = jnp.float32
    use_kernel: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, token_valid=None) -> jax.Array:
        """`token_valid` is accepted for the MoE's interface and ignored: a dense MLP routes nothing."""
        init = normal_init()
        gate_up_w = weight(self, "gate_up_w", init, (self.dim, 2, self.hidden), self.dtype)
        down_w = weight(self, "down_w", init, (self.hidden, self.dim), self.dtype)
        h = swiglu(project("...D,DWF->...WF", x, gate_up_w, self.use_kernel))
        return project("...F,FD->...D", h, down_w, self.use_kernel)


def _mask_groups(choice_NE: jax.Array, group_scores_NG: jax.Array, topk_group: int) -> jax.Array:
    """Keeps the experts of the `topk_group` best groups; the others become 0.0 (not -inf), as upstream."""
    n, e = choice_NE.shape
    g = group_scores_NG.shape[-1]
    _, group_idx = jax.lax.top_k(group_scores_NG, topk_group)
    keep_NG = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], group_idx].set(True)
    keep_NE = jnp.repeat(keep_NG, e // g, axis=-1)
    return jnp.where(keep_NE, choice_NE, 0.0)


def router_scores(logits_NE: jax.Array, cfg: LanguageConfig) -> jax.Array:
    """Router logits [N, E] (float32) -> the scores [N, E] float32 that choose and weigh the experts."""
    return jax.nn.softmax(logits_NE, axis=-1) if cfg.scoring_func == "softmax" else jax.nn.sigmoid(logits_NE)


def route(logits_NE: jax.Array, cfg: LanguageConfig, bias_E: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Router logits [N, E] (float32) -> (weights [N, X] float32, expert ids [N, X] int32)."""
    k = cfg.num_experts_per_tok
    scores = router_scores(logits_NE, cfg)
    n, e = scores.shape
    if cfg.topk_method == "greedy":
        weights, idx = jax.lax.top_k(scores, k)
    elif cfg.topk_method == "group_limited_greedy":
        group_scores = scores.reshape(n, cfg.n_group, e // cfg.n_group).max(axis=-1)
        weights, idx = jax.lax.top_k(_mask_groups(scores, group_scores, cfg.topk_group), k)
    elif cfg.topk_method == "noaux_tc":
        # Choose by score + bias, with groups ranked by the sum of their two best; weight by the raw score.
        choice = scores + bias_E.astype(jnp.float32)[None, :]
        group_scores = jax.lax.top_k(choice.reshape(n, cfg.n_group, e // cfg.n_group), 2)[0].sum(-1)
        _, idx = jax.lax.top_k(_mask_groups(choice, group_scores, cfg.topk_group), k)
        weights = jnp.take_along_axis(scores, idx, axis=-1)
    else:
        raise ValueError(f"unknown topk_method {cfg.topk_method!r}")
    if k > 1 and cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx.astype(jnp.int32)


def combine(y_NXD: jax.Array, weights_NX: jax.Array, dtype) -> jax.Array:
    """Per-choice expert outputs [N, X, D] -> their routing-weighted sum [N, D] in `dtype`, computed in
    float32 over the choices, as the reference does."""
    return jnp.einsum("NXD,NX->ND", y_NXD.astype(jnp.float32), weights_NX.astype(jnp.float32)).astype(dtype)


def _in_range(idx_NX: jax.Array, num_experts: int) -> jax.Array:
    return (idx_NX >= 0) & (idx_NX < num_experts)


def _values_scales(w, n: int):
    """A weight [E, ..., N] as (the kernel's operand, its scales [E, N] or None): float weights pass
    through, quantized ones give their values and per-output-channel scales."""
    if not is_quantized(w):
        return w, None
    return w.qvalue, w.scale.reshape(w.shape[0], n)


def _scales_kw(scales) -> dict:
    """The kernels' `scales_EN` argument: only for quantized weights (a float call stays as it was)."""
    return {} if scales is None else {"scales_EN": scales}


def _weight_dtype_kw(w) -> dict:
    """The kernels' `*_usable` argument for quantized weights (their values' dtype); none for float."""
    return {"weight_dtype": w.qvalue.dtype} if is_quantized(w) else {}


def weight_dtype(w, x_dtype):
    """The dtype the products run in: the weight's, or for a quantized weight the activations'."""
    return x_dtype if is_quantized(w) else w.dtype


def outputs_dense(x_ND, gate_up_w, down_w, idx_NX) -> jax.Array:
    """Plain path: every expert on every token ([N, E, D]), then each token's chosen ones: [N, X, D]."""
    e = gate_up_w.shape[0]
    y_NED = qeinsum("NEF,EFD->NED", swiglu(qeinsum("ND,EDWF->NEWF", x_ND, gate_up_w)), down_w)
    y_NXD = jnp.take_along_axis(y_NED, jnp.clip(idx_NX, 0, e - 1)[..., None], axis=1)
    return jnp.where(_in_range(idx_NX, e)[..., None], y_NXD, 0)


def outputs_gather(x_ND, gate_up_w, down_w, idx_NX, ids_in_range: bool = False, use_kernel: bool = True) -> jax.Array:
    """Decode path: runs only the chosen experts' weights, per token: [N, X, D] float32.

    Reads N*X expert matrices instead of all E, so it wins while N*X < E (small decode batches).
    With `use_kernel`, on NVIDIA GPUs in bf16, `kernels.gathered_matvec` reads them in place; else XLA gathers them
    ([N, X, D, W, F]) and runs a batched dot. The outputs are float32, straight from the down
    projection's accumulator: XLA folds the combine's cast into that matmul when nothing stands between
    them, and writing it out makes every caller (one device, expert parallel) round the same way.
    `ids_in_range` (one device: the router's ids always are) skips the zeroing of out-of-range ids, a
    select after the down projection that cost small's decode ~2 ms per token on an H200.
    """
    e, d, _, f = gate_up_w.shape
    n, x = idx_NX.shape
    safe = idx_NX if ids_in_range else jnp.clip(idx_NX, 0, e - 1)
    dtype = weight_dtype(gate_up_w, x_ND.dtype)
    if use_kernel and x_ND.dtype == dtype and local_arrays() and mlp_kernel_fits(
            gathered_matvec_usable, dtype, d, f, **_weight_dtype_kw(gate_up_w)):
        ids = safe.reshape(-1)  # [N*X]: row a runs expert ids[a] on token a // X
        gu, gu_scales = _values_scales(gate_up_w.reshape(e, d, 2 * f), 2 * f)
        dw, dw_scales = _values_scales(down_w, d)
        h = gathered_matvec(x_ND, gu, ids, rows_per_input=x, **_scales_kw(gu_scales), out_dtype=dtype)
        y_NXD = gathered_matvec(swiglu(h.reshape(-1, 2, f)), dw, ids, **_scales_kw(dw_scales)).reshape(n, x, d)
    else:
        h = swiglu(qeinsum("ND,NXDWF->NXWF", x_ND, gate_up_w[safe]))
        y_NXD = qeinsum("NXF,NXFD->NXD", h, down_w[safe], preferred_element_type=jnp.float32)
    return y_NXD if ids_in_range else jnp.where(_in_range(idx_NX, e)[..., None], y_NXD, 0)


def _group_by_expert(idx_NX: jax.Array, num_experts: int):
    """Assignments (token, choice) sorted by expert.

    Returns (order [A]: assignment indices in expert order, A = N*X; rank [A]: each sorted assignment's
    position within its expert's group; sizes [E] int32: tokens per expert). Ids outside [0, E) sort to
    the ends and are not counted.
    """
    flat = idx_NX.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sorted_ids = flat[order]
    sizes = jnp.sum(sorted_ids[:, None] == jnp.arange(num_experts), axis=0, dtype=jnp.int32)
    # compare_all: the default binary search is a while loop, which costs a host round trip per step on GPUs.
    starts = jnp.searchsorted(sorted_ids, jnp.arange(num_experts, dtype=sorted_ids.dtype), method="compare_all")
    rank = jnp.arange(flat.shape[0]) - starts[jnp.clip(sorted_ids, 0, num_experts - 1)]
    return order, rank, sizes


def outputs_ragged(x_ND, gate_up_w, down_w, idx_NX, use_kernel: bool = True) -> jax.Array:
    """Ragged path: token copies sorted by expert, one grouped matmul (`kernels.ragged_dot`) per projection.

    Computes exactly the N*X chosen (token, expert) pairs, with no capacity and nothing dropped, so its
    cost does not depend on how evenly the tokens route. With `use_kernel`, on Hopper GPUs in bf16, it
    runs JAX's Pallas Mosaic GPU kernel; else `lax.ragged_dot` (fast on TPU, slow on NVIDIA GPUs).
    Quantized experts: the grouped matmul (JAX's kernel, which takes one dtype) reads the values cast to
    the activations' dtype, and each sorted row is then scaled by its expert's output-channel scales.
    """
    n, x = idx_NX.shape
    e, d, _, f = gate_up_w.shape
    a = n * x
    # Out-of-range ids go last, past the groups that `sizes` covers: their rows are masked below.
    order, _, sizes = _group_by_expert(jnp.where(idx_NX < 0, e, idx_NX), e)
    rows = -(-a // ROW_MULTIPLE) * ROW_MULTIPLE  # padding rows belong to no group
    tokens = jnp.take(x_ND, order // x, axis=0)  # [A, D], grouped by expert
    tokens = jnp.pad(tokens, ((0, rows - a), (0, 0)))
    # each sorted row's expert (rows past the groups: any; they are masked below)
    row_expert = jnp.pad(jnp.clip(idx_NX.reshape(-1)[order], 0, e - 1), (0, rows - a))

    def grouped_matmul(lhs, w, n_out):
        values, scales = _values_scales(w, n_out)
        if scales is None:
            return ragged_dot(lhs, w, sizes, use_kernel)
        y = ragged_dot(lhs, values.astype(lhs.dtype), sizes, use_kernel).astype(jnp.float32)
        return (y * scales[row_expert]).astype(lhs.dtype)

    h = swiglu(grouped_matmul(tokens, gate_up_w.reshape(e, d, 2 * f), 2 * f).reshape(rows, 2, f))
    y_sorted = grouped_matmul(h, down_w, d)  # [rows, D]
    position = jnp.zeros_like(order).at[order].set(jnp.arange(a, dtype=order.dtype))  # sorted row of each
    y_NXD = jnp.take(y_sorted, position, axis=0).reshape(n, x, d)
    return jnp.where(_in_range(idx_NX, e)[..., None], y_NXD, 0)


BLOCK_ROWS_MAX = 128


def block_rows(num_assignments: int, num_experts: int) -> int:
    """Rows per block of the blocked dispatch: the power of two from 8 to BLOCK_ROWS_MAX nearest below
    the balanced load (assignments / experts), so that the padding (under a block per expert) stays
    small beside the assignments."""
    rows = 8
    while rows * 2 <= min(BLOCK_ROWS_MAX, num_assignments / num_experts):
        rows *= 2
    return rows


@jax.custom_vjp
def _move_rows(values, take, give):
    """Rows `values[take]` ([len(take), ...]; zeros where `take` is out of range), for an index pair
    that moves each row to at most one place: `give` [len(values)] is the inverse (where each row of
    `values` went, out of range: nowhere). The gradient is then a gather by `give`, not the
    scatter-add that `jnp.take`'s would be."""
    return jnp.take(values, take, axis=0, mode="fill", fill_value=0)


def _move_rows_fwd(values, take, give):
    return _move_rows(values, take, give), give


def _move_rows_bwd(give, grad):
    return jnp.take(grad, give, axis=0, mode="fill", fill_value=0), None, None


_move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def _per_block(w, block_expert_Z: jax.Array, num_experts: int):
    """Each block's expert's weights [Z, ...]: a product with the one-hot [Z, E] (exact; its gradient,
    the blocks' gradients summed per expert, is a matmul too, not a scatter-add), or a gather for
    quantized weights (inference only)."""
    if is_quantized(w):
        return w[block_expert_Z]
    onehot_ZE = jax.nn.one_hot(block_expert_Z, num_experts, dtype=w.dtype)
    # float32 at full precision (a TF32 product would round the weights); 16-bit products are exact
    precision = jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None
    return jnp.tensordot(onehot_ZE, w, axes=1, precision=precision)


def outputs_blocked(x_ND, gate_up_w, down_w, idx_NX, rows: int | None = None, use_kernel: bool = False) -> jax.Array:
    """Blocked path (training's): token copies sorted by expert into blocks of `rows` rows, each block
    holding one expert's tokens; one batched matmul per projection over the blocks, each with its
    expert's weights ([Z, D, W, F]). [N, D] -> [N, X, D].

    Drops nothing and needs no capacity: Z = ceil(N*X / rows) + E blocks always suffice (each expert
    pads its group by under one block), so the work is that of N*X + E*rows rows however the tokens
    route, where the grouped path falls back to every expert on every token once one expert overflows
    (random weights route most tokens to a few experts). Plain XLA (gathers and batched dots, no
    scatter in the forward or the backward), so it is differentiable. `rows` defaults to
    `block_rows`. Ids outside [0, E) give zeros.

    Quantized experts with `use_kernel` (inference: prefill's dispatch for them where the kernel runs)
    take `kernels.blocked_matmul`, which reads each block's expert's values in place, at least
    `BLOCKED_ROWS[0]` rows per block; otherwise the blocks' weights are gathered as 16-bit copies.
    """
    n, x = idx_NX.shape
    e, d, _, f = gate_up_w.shape
    a = n * x
    kernel = use_kernel and is_quantized(gate_up_w) and local_arrays() and mlp_kernel_fits(
        blocked_matmul_usable, x_ND.dtype, d, f, **_weight_dtype_kw(gate_up_w))
    m = rows or block_rows(a, e)
    if kernel:  # (an explicit `rows` the kernel does not take runs the XLA products)
        m = max(m, BLOCKED_ROWS[0])
        kernel = m <= BLOCKED_ROWS[1] and m & (m - 1) == 0
    z = -(-a // m) + e  # blocks: a static bound
    order, rank, sizes = _group_by_expert(idx_NX, e)
    ids = idx_NX.reshape(-1)[order]
    blocks_per = (sizes + m - 1) // m  # [E]
    block_end = jnp.cumsum(blocks_per)
    first_row = (block_end - blocks_per) * m
    dest_sorted = jnp.where((ids >= 0) & (ids < e), first_row[jnp.clip(ids, 0, e - 1)] + rank, z * m)
    dest = jnp.zeros_like(dest_sorted).at[order].set(dest_sorted)  # [A]: each assignment's row (z*m: none)
    src = jnp.full((z * m,), a, dest.dtype).at[dest].set(jnp.arange(a, dtype=dest.dtype), mode="drop")  # row's assignment
    xs = _move_rows(jnp.repeat(x_ND, x, axis=0), src, dest).reshape(z, m, d)
    # each block's expert (blocks past the last group: the last expert, on rows of zeros)
    block_expert = jnp.minimum(jnp.searchsorted(block_end, jnp.arange(z), side="right", method="compare_all"), e - 1)
    if kernel:  # blocks past the last group hold no routed row: the kernel skips them
        used = jnp.arange(z) < block_end[-1]
        gu, gu_scales = _values_scales(gate_up_w.reshape(e, d, 2 * f), 2 * f)
        dw, dw_scales = _values_scales(down_w, d)
        h = swiglu(blocked_matmul(xs, gu, gu_scales, block_expert, used).reshape(z, m, 2, f))
        y = blocked_matmul(h, dw, dw_scales, block_expert, used)
    else:
        h = swiglu(qeinsum("ZMD,ZDWF->ZMWF", xs, _per_block(gate_up_w, block_expert, e)))
        y = qeinsum("ZMF,ZFD->ZMD", h, _per_block(down_w, block_expert, e))
    return _move_rows(y.reshape(z * m, d), dest, src).reshape(n, x, d)


def grouped_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float = 2.0) -> int:
    """Rows per expert of the grouped dispatch: `factor` x the balanced load, rounded up to a multiple of
    8, at most `num_tokens` (a token chooses an expert at most once, so that bound never overflows).

    Up to 64 tokens (decode batches) it is `num_tokens`: the overflow check is a `lax.cond`, which costs
    a device-to-host round trip per layer on GPUs, more than the extra rows (tiny, batch 32 on an H200:
    5386 tok/s with the check, against 6413 for the dense path).
    """
    if num_tokens <= 64:
        return num_tokens
    balanced = num_tokens * top_k / num_experts
    return min(num_tokens, 8 * math.ceil(factor * balanced / 8))


def outputs_grouped(x_ND, gate_up_w, down_w, idx_NX, capacity: int | None = None,
                    total_experts: int | None = None, use_kernel: bool = True) -> jax.Array:
    """Grouped path: tokens scattered into per-expert slots [E, M, D], one batched matmul per projection.

    Reads every expert's weights once and computes E*M rows instead of the dense path's E*N. `capacity`
    M defaults to `grouped_capacity`; if any expert gets more than M tokens the layer runs the dense path
    instead (a `lax.cond` on the device), so nothing is ever dropped. With M = N (decode batches) there is
    no check, and where `kernels.expert_matmul` runs (`use_kernel`; no more choices than experts: batches of up to
    10 tokens for 6 of 64) the experts no token chose are skipped rather than read. `total_experts`:
    the experts of all devices, where these are one device's share (default: these E).
    """
    n, x = idx_NX.shape
    e, d, _, f = gate_up_w.shape
    cap = capacity or grouped_capacity(n, x, e)
    dtype = weight_dtype(gate_up_w, x_ND.dtype)
    padded = -(-cap // EXPERT_ROWS_MULTIPLE) * EXPERT_ROWS_MULTIPLE
    # The kernel pays by skipping experts: with no more choices than experts some always go unread
    # (small, 8 tokens x 6 choices: 2.5x XLA's batch); at the 64-token bucket of a 38-token text prompt
    # nearly every expert is chosen and XLA's batched matmul was faster (small's prefill: 13.6 -> 15.5 ms).
    kernel = (use_kernel and cap >= n and n * x <= (total_experts or e) and x_ND.dtype == dtype and local_arrays()
              and mlp_kernel_fits(expert_matmul_usable, dtype, d, f, rows=padded, **_weight_dtype_kw(gate_up_w)))
    rows = padded if kernel else cap  # slots per expert
    order, rank, sizes = _group_by_expert(idx_NX, e)
    ids = idx_NX.reshape(-1)[order]
    slot_sorted = jnp.where((ids >= 0) & (ids < e) & (rank < cap), ids * rows + rank, e * rows)
    slot = jnp.zeros_like(slot_sorted).at[order].set(slot_sorted)  # [A], e*rows = not here

    def grouped():
        tokens = jnp.repeat(x_ND, x, axis=0)  # [A, D], assignment order
        xs = jnp.zeros((e * rows, d), x_ND.dtype).at[slot].set(tokens, mode="drop").reshape(e, rows, d)
        if kernel:
            gu, gu_scales = _values_scales(gate_up_w.reshape(e, d, 2 * f), 2 * f)
            dw, dw_scales = _values_scales(down_w, d)
            h = expert_matmul(xs, gu, sizes, **_scales_kw(gu_scales)).astype(dtype)
            y = expert_matmul(swiglu(h.reshape(e, rows, 2, f)), dw, sizes, **_scales_kw(dw_scales))
        else:
            h = swiglu(qeinsum("EMD,EDWF->EMWF", xs, gate_up_w))
            y = qeinsum("EMF,EFD->EMD", h, down_w)
        return jnp.take(y.reshape(e * rows, d), slot, axis=0, mode="fill", fill_value=0).reshape(n, x, d)

    if cap >= n:
        return grouped()
    return jax.lax.cond(jnp.max(sizes) > cap, lambda: outputs_dense(x_ND, gate_up_w, down_w, idx_NX), grouped)


_OUTPUTS = {"dense": outputs_dense, "gather": outputs_gather, "grouped": outputs_grouped, "ragged": outputs_ragged,
            "blocked": outputs_blocked}


def expert_outputs(impl: str, x_ND, gate_up_w, down_w, idx_NX, ids_in_range: bool = False,
                   use_kernel: bool = True) -> jax.Array:
    """Each token's chosen experts by one dispatch ("dense", "gather", "grouped", "ragged" or "blocked"):
    [N, D] -> [N, X, D] in the activation dtype (float32 for "gather", see `outputs_gather`, and for
    "grouped" through its kernel).

    Every dispatch gives the same values up to the rounding of its output dtype; ids outside [0, E) give
    zeros (expert parallelism passes the experts held by other devices that way) unless the caller
    promises `ids_in_range`. `use_kernel`: the dispatch may run its accelerator kernel where it applies.
    """
    if impl == "gather":
        return outputs_gather(x_ND, gate_up_w, down_w, idx_NX, ids_in_range, use_kernel)
    if impl == "dense":
        return outputs_dense(x_ND, gate_up_w, down_w, idx_NX)
    return _OUTPUTS[impl](x_ND, gate_up_w, down_w, idx_NX, use_kernel=use_kernel)


def run_experts(impl: str, x_ND, gate_up_w, down_w, weights_NX, idx_NX, ids_in_range: bool = False,
                use_kernel: bool = True) -> jax.Array:
    """Routed experts, weighted and summed: [N, D] -> [N, D] (see `expert_outputs`)."""
    y_NXD = expert_outputs(impl, x_ND, gate_up_w, down_w, idx_NX, ids_in_range, use_kernel)
    return combine(y_NXD, weights_NX, x_ND.dtype)


def _expert_axes(gate_up_shape) -> tuple[str | None, str | None]:
    """The mesh axes that split the routed experts and their width under the current mesh (None where
    unsplit). The parameter rules give `gate_up_w` [E, D, W, F] and `down_w` [E, F, D] the same two."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None
    spec = Layout(mesh).spec(("experts", None, None, "mlp"), gate_up_shape)
    return spec[0], spec[3]


def choose_dispatch(impl: str, num_tokens: int, top_k: int, gate_up_w: jax.Array, use_kernel: bool = True,
                    dtype=None) -> str:
    """Resolves "auto" (static: shapes, dtype and platform only): "gather" while tokens * top-k <=
    experts / 4 (batch-1 and -2 decode); beyond 64 tokens (prefill), for quantized experts "blocked"
    where `kernels.blocked_matmul` runs (it reads their 1-byte values), else "ragged" where the Mosaic
    GPU grouped matmul runs (`use_kernel`, Hopper, bf16, the per-device width a multiple of its tiles);
    "grouped" otherwise. `dtype`: the activations' (default the weights'; quantized weights run in it).
    """
    if impl != "auto":
        return impl
    e, d, _, f = gate_up_w.shape
    if 4 * num_tokens * top_k <= e:
        return "gather"
    expert_axis, width_axis = _expert_axes(gate_up_w.shape)
    f_local = f // (jax.sharding.get_abstract_mesh().shape[width_axis] if width_axis else 1)
    dtype = weight_dtype(gate_up_w, dtype or gate_up_w.dtype)
    # The kernel runs on whole per-device arrays: one device, or `experts_sharded`'s shard_map (a mesh
    # that splits the experts or their width); a data-only mesh partitions the dispatch automatically.
    per_device = local_arrays() or expert_axis or width_axis
    if use_kernel and num_tokens > 64 and per_device and is_quantized(gate_up_w) and mlp_kernel_fits(
            blocked_matmul_usable, dtype, d, f_local, **_weight_dtype_kw(gate_up_w)):
        return "blocked"
    if use_kernel and num_tokens > 64 and per_device and mlp_kernel_fits(mosaic_ragged_usable, dtype, d, f_local):
        return "ragged"
    return "grouped"


def experts_sharded(impl: str, x_ND, gate_up_w, down_w, weights_NX, idx_NX, use_kernel: bool = True) -> jax.Array:
    """Expert (and tensor) parallel routed experts under the current mesh, via `shard_map`.

    Each device runs its own experts (and its slice of their width) on the tokens routed to them, with
    `impl` as the local dispatch; ids of experts held elsewhere fall outside the local range and give
    zeros. One all-reduce of the per-choice outputs [N, X, D] over the axes that split the experts
    then assembles them, and the weighted sum runs as on one device. With experts split alone, each
    (token, choice) has one nonzero contribution, so the all-reduce is exact and the layer computes
    the same values as one device, in the same order. (A split of the width leaves partial sums, which
    are all-reduced in float32.) XLA's automatic partitioning of the gather
    instead moves the gathered expert weights between devices.
    """
    expert_axis, width_axis = _expert_axes(gate_up_w.shape)
    split = tuple(a for a in (expert_axis, width_axis) if a)
    if not split:  # e.g. a data-only mesh: every device holds every expert, the router's ids are all local
        return run_experts(impl, x_ND, gate_up_w, down_w, weights_NX, idx_NX, ids_in_range=True, use_kernel=use_kernel)
    P = jax.sharding.PartitionSpec
    up_spec, down_spec = P(expert_axis, None, None, width_axis), P(expert_axis, width_axis, None)
    if is_quantized(down_w):  # scales [E, 1, D]: the contracted width is not split in them
        up_spec = dataclasses.replace(gate_up_w, qvalue=up_spec, scale=up_spec)
        down_spec = dataclasses.replace(down_w, qvalue=down_spec, scale=P(expert_axis, None, None))
    n, x = idx_NX.shape
    e = gate_up_w.shape[0]
    capacity = grouped_capacity(n, x, e)  # the one-device value: same rows per expert

    def local(x_ND, gu, d, idx):
        offset = jax.lax.axis_index(expert_axis) * gu.shape[0] if expert_axis else 0
        if impl == "grouped":
            y = outputs_grouped(x_ND, gu, d, idx - offset, capacity, total_experts=e, use_kernel=use_kernel)
        else:
            y = expert_outputs(impl, x_ND, gu, d, idx - offset, use_kernel=use_kernel)
        if width_axis:  # partial sums over slices of the width: add them in float32
            y = y.astype(jnp.float32)
        return jax.lax.psum(y, split)

    y_NXD = jax.shard_map(
        local, mesh=jax.sharding.get_abstract_mesh(), in_specs=(P(), up_spec, down_spec, P()), out_specs=P(), check_vma=False
    )(x_ND, gate_up_w, down_w, idx_NX)
    return combine(y_NXD, weights_NX, x_ND.dtype)


class MoE(nn.Module):
    """Routed experts plus shared experts: x [B, T, D] -> [B, T, D].

    `runtime.moe` (one of `vl2_jax.config.MOE_IMPLS`): "dense" (the plain reference path: every expert on
    every token), "gather" (chosen experts' weights only), "grouped" (tokens in per-expert slots of a
    bounded capacity, dense on overflow), "ragged" (a grouped matmul over expert-sorted tokens: the
    Mosaic GPU kernel on Hopper, `lax.ragged_dot` elsewhere), "blocked" (expert-sorted blocks with
    gathered weights, plain XLA: training's dispatch; quantized experts' prefill through a kernel that
    reads them in place), or "auto" (`choose_dispatch`).
    `benchmarks/moe_dispatch.py` measured them on an H200 (BENCHMARKS.md): gather wins at one token,
    grouped at decode batches, the Mosaic kernel at prefill. Under a mesh that splits the experts
    or their width, the dispatch runs per device (`experts_sharded`).
    """

    cfg: LanguageConfig
    dtype: jnp.dtype = jnp.float32
    runtime: Runtime = Runtime.plain()

    def setup(self):
        c, init = self.cfg, normal_init()
        d, f, e = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts
        self.router_w = self.param("router_w", init, (d, e), self.dtype)
        if c.topk_method == "noaux_tc":
            self.router_bias = self.param("router_bias", nn.initializers.zeros, (e,), self.dtype)
        self.gate_up_w = weight(self, "gate_up_w", init, (e, d, 2, f), self.dtype)
        self.down_w = weight(self, "down_w", init, (e, f, d), self.dtype)
        if c.n_shared_experts:
            self.shared = MLP(d, f * c.n_shared_experts, self.dtype, self.runtime.kernels)

    def router_logits(self, x_BTD: jax.Array) -> jax.Array:
        """The router's float32 logits [N, E] for x [B, T, D], N = B * T."""
        return einsum("ND,DE->NE", x_BTD.reshape(-1, x_BTD.shape[-1]).astype(jnp.float32),
                      self.router_w.astype(jnp.float32))

    def choices(self, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The router's choices for x [B, T, D]: (weights [N, X] float32, expert ids [N, X] int32), N = B * T."""
        return self._route(self.router_logits(x_BTD))

    def _route(self, logits_NE: jax.Array) -> tuple[jax.Array, jax.Array]:
        return route(logits_NE, self.cfg, self.router_bias if self.cfg.topk_method == "noaux_tc" else None)

    def __call__(self, x_BTD: jax.Array, token_valid_BT: jax.Array | None = None) -> jax.Array:
        """`token_valid` [B, T]: tokens routed to no expert when False (their routed output is zero), so
        that padding rows make no expert's weights be read; None routes every token."""
        weights, idx = self.choices(x_BTD)
        return self.experts(x_BTD, weights, idx, token_valid_BT)

    def with_router(self, x_BTD: jax.Array, token_valid_BT: jax.Array | None = None):
        """`__call__` for training: (y [B, T, D], (scores [B, T, E] float32, expert ids [B, T, X] int32)),
        the router's scores and choices of every token, padding included (`training.loss.balance_loss`
        reads them). Inference calls `__call__`, which computes neither."""
        b, t, _ = x_BTD.shape
        logits = self.router_logits(x_BTD)
        weights, idx = self._route(logits)
        y = self.experts(x_BTD, weights, idx, token_valid_BT)
        return y, (router_scores(logits, self.cfg).reshape(b, t, -1), idx.reshape(b, t, -1))

    def experts(self, x_BTD: jax.Array, weights_NX: jax.Array, idx_NX: jax.Array,
                token_valid_BT: jax.Array | None) -> jax.Array:
        """The routed experts' weighted outputs plus the shared experts': [B, T, D] (see `__call__`)."""
        c, kernels = self.cfg, self.runtime.kernels
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        weights, idx = weights_NX, idx_NX
        impl = choose_dispatch(self.runtime.moe, b * t, c.num_experts_per_tok, self.gate_up_w, kernels, x_BTD.dtype)
        # An id past the experts counts for nothing in every dispatch. Not for "gather" (1-2 tokens):
        # it reads the chosen experts of each token anyway, and out-of-range ids would cost it a select
        # after the down projection (see `outputs_gather`).
        masked = token_valid_BT is not None and impl != "gather"
        if masked:
            idx = jnp.where(token_valid_BT.reshape(-1, 1), idx, c.n_routed_experts)
        if jax.sharding.get_abstract_mesh().empty:
            y = run_experts(impl, x_ND, self.gate_up_w, self.down_w, weights, idx,
                            ids_in_range=not masked, use_kernel=kernels)
        else:
            y = experts_sharded(impl, x_ND, self.gate_up_w, self.down_w, weights, idx, kernels)
        y = y.reshape(b, t, d)
        if c.n_shared_experts:
            y = y + self.shared(x_BTD)
        return y
