"""Feed-forward layers: the SwiGLU MLP, the DeepSeekMoE router and the mixture of experts.

Routing follows the reference's `MoEGate` exactly (float32 logits; softmax or sigmoid scores; `greedy`,
`group_limited_greedy` or `noaux_tc` selection, masked groups filled with 0.0; optional renormalisation;
`routed_scaling_factor`). `MoE.__call__` combines the chosen experts with the plain dense path: every
expert runs on every token and the routing weights (zero for unchosen experts) are applied in float32. It
is the reference that faster dispatches are tested against.

Parameter layout:
    mlp (dense):  gate_w [D, F], up_w [D, F], down_w [F, D]
    mlp (MoE):    router_w [D, E], router_bias [E] (noaux_tc only),
                  gate_w [E, D, F], up_w [E, D, F], down_w [E, F, D], shared/{gate_w, up_w, down_w}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from vl2_jax.config import LanguageConfig
from vl2_jax.modules.layers import einsum, normal_init
from vl2_jax.sharding import Layout


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); x [..., D] -> [..., D]."""

    dim: int
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = normal_init()
        gate_w = self.param("gate_w", init, (self.dim, self.hidden), self.dtype)
        up_w = self.param("up_w", init, (self.dim, self.hidden), self.dtype)
        down_w = self.param("down_w", init, (self.hidden, self.dim), self.dtype)
        h = jax.nn.silu(einsum("...D,DF->...F", x, gate_w)) * einsum("...D,DF->...F", x, up_w)
        return einsum("...F,FD->...D", h, down_w)


def _mask_groups(choice_NE: jax.Array, group_scores_NG: jax.Array, topk_group: int) -> jax.Array:
    """Keeps the experts of the `topk_group` best groups; the others become 0.0 (not -inf), as upstream."""
    n, e = choice_NE.shape
    g = group_scores_NG.shape[-1]
    _, group_idx = jax.lax.top_k(group_scores_NG, topk_group)
    keep_NG = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], group_idx].set(True)
    keep_NE = jnp.repeat(keep_NG, e // g, axis=-1)
    return jnp.where(keep_NE, choice_NE, 0.0)


def route(logits_NE: jax.Array, cfg: LanguageConfig, bias_E: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Router logits [N, E] (float32) -> (weights [N, X] float32, expert ids [N, X] int32)."""
    k = cfg.num_experts_per_tok
    if cfg.scoring_func == "softmax":
        scores = jax.nn.softmax(logits_NE, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits_NE)
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


def dense_combine_weights(weights_NX: jax.Array, idx_NX: jax.Array, num_experts: int) -> jax.Array:
    """Routing weights scattered to all experts: [N, E] float32, zero for experts not chosen."""
    onehot = jax.nn.one_hot(idx_NX, num_experts, dtype=jnp.float32)  # [N, X, E]
    return jnp.einsum("NX,NXE->NE", weights_NX, onehot)


def experts_gather(x_ND, gate_w, up_w, down_w, weights_NX, idx_NX, out_dtype=None) -> jax.Array:
    """Decode path: gathers only the chosen experts' weights ([N, X, D, F]) and runs them per token.

    Reads N*X expert matrices instead of all E, so it wins while N*X < E (small decode batches).
    """
    h = jax.nn.silu(einsum("ND,NXDF->NXF", x_ND, gate_w[idx_NX])) * einsum("ND,NXDF->NXF", x_ND, up_w[idx_NX])
    y_NXD = einsum("NXF,NXFD->NXD", h, down_w[idx_NX])
    return jnp.einsum("NXD,NX->ND", y_NXD.astype(jnp.float32), weights_NX).astype(out_dtype or x_ND.dtype)


def experts_ragged(x_ND, gate_w, up_w, down_w, weights_NX, idx_NX, out_dtype=None) -> jax.Array:
    """Grouped path: token copies sorted by expert, one `lax.ragged_dot` per projection.

    Computes exactly the N*X chosen (token, expert) pairs, with no capacity and nothing dropped. Fast
    where `ragged_dot` has a good kernel (TPU); on NVIDIA GPUs it was measured slow (PERF.md), so it is
    opt-in there.
    """
    n, x = idx_NX.shape
    e = gate_w.shape[0]
    flat = idx_NX.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    tokens = x_ND[order // x]  # [N*X, D], grouped by expert
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    precision = jax.lax.Precision.HIGHEST if x_ND.dtype == jnp.float32 else None
    dot = lambda a, w: jax.lax.ragged_dot(a, w, sizes, precision=precision)
    h = jax.nn.silu(dot(tokens, gate_w)) * dot(tokens, up_w)
    y_sorted = dot(h, down_w)  # [N*X, D]
    y_NXD = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(n, x, -1)
    return jnp.einsum("NXD,NX->ND", y_NXD.astype(jnp.float32), weights_NX).astype(out_dtype or x_ND.dtype)


def experts_dense(x_ND, gate_w, up_w, down_w, combine_NE, out_dtype=None) -> jax.Array:
    """Plain path: every expert on every token, outputs weighted in float32. [N, D] -> [N, D] (x dtype)."""
    h = jax.nn.silu(einsum("ND,EDF->NEF", x_ND, gate_w)) * einsum("ND,EDF->NEF", x_ND, up_w)
    y_NED = einsum("NEF,EFD->NED", h, down_w)
    return jnp.einsum("NED,NE->ND", y_NED.astype(jnp.float32), combine_NE).astype(out_dtype or x_ND.dtype)


def run_experts(impl: str, x_ND, gate_w, up_w, down_w, weights_NX, idx_NX, out_dtype=None) -> jax.Array:
    """Routed experts by one dispatch ("dense", "gather" or "ragged"): [N, D] -> [N, D]."""
    if impl == "gather":
        return experts_gather(x_ND, gate_w, up_w, down_w, weights_NX, idx_NX, out_dtype)
    if impl == "ragged":
        return experts_ragged(x_ND, gate_w, up_w, down_w, weights_NX, idx_NX, out_dtype)
    combine = dense_combine_weights(weights_NX, idx_NX, gate_w.shape[0])
    return experts_dense(x_ND, gate_w, up_w, down_w, combine, out_dtype)


def experts_sharded(impl: str, x_ND, gate_w, up_w, down_w, weights_NX, idx_NX) -> jax.Array:
    """Expert (and tensor) parallel routed experts under the current mesh, via `shard_map`.

    Each device runs its own experts (and its slice of their width) on the tokens routed to them, with
    `impl` as the local dispatch; weights of experts held elsewhere are zeroed; one all-reduce of the
    [N, D] float32 partial outputs over the axes that split the experts then sums them. XLA's automatic
    partitioning of the gather instead moves the gathered expert weights between devices.
    """
    mesh = jax.sharding.get_abstract_mesh()
    layout = Layout(mesh)
    up_spec = layout.spec(("experts", None, "mlp"), gate_w.shape)
    down_spec = layout.spec(("experts", "mlp", None), down_w.shape)
    expert_axis, split = up_spec[0], tuple(a for a in (up_spec[0], up_spec[2]) if a)
    if not split:
        return run_experts(impl, x_ND, gate_w, up_w, down_w, weights_NX, idx_NX)
    P = jax.sharding.PartitionSpec

    def local(x, g, u, d, w, idx):
        e_local = g.shape[0]
        offset = jax.lax.axis_index(expert_axis) * e_local if expert_axis else 0
        lid = idx - offset
        w = jnp.where((lid >= 0) & (lid < e_local), w, 0.0)
        y = run_experts(impl, x, g, u, d, w, jnp.clip(lid, 0, e_local - 1), jnp.float32)
        return jax.lax.psum(y, split)

    y = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), up_spec, up_spec, down_spec, P(), P()), out_specs=P(), check_vma=False
    )(x_ND, gate_w, up_w, down_w, weights_NX, idx_NX)
    return y.astype(x_ND.dtype)


MOE_IMPLS = ("auto", "dense", "gather", "ragged")


class MoE(nn.Module):
    """Routed experts plus shared experts: x [B, T, D] -> [B, T, D].

    `impl`: "dense" (the plain reference path), "gather" (chosen experts' weights only), "ragged"
    (grouped `lax.ragged_dot` over expert-sorted tokens; opt-in), or "auto":
    gather while tokens * top-k <= experts / 4 (batch-1 and -2 decode), dense otherwise. Gathering
    copies each chosen expert's weights, so it only pays while few experts are chosen; measured on an
    H200 with tiny: gather at batch 8 ran at half the speed of reading all experts. The choice is static.
    Under a mesh that splits the experts or their width, the dispatch runs per device (`experts_sharded`).
    """

    cfg: LanguageConfig
    dtype: jnp.dtype = jnp.float32
    impl: str = "dense"

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        c, init = self.cfg, normal_init()
        d, f, e = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts
        router_w = self.param("router_w", init, (d, e), self.dtype)
        bias = None
        if c.topk_method == "noaux_tc":
            bias = self.param("router_bias", nn.initializers.zeros, (e,), self.dtype)
        gate_w = self.param("gate_w", init, (e, d, f), self.dtype)
        up_w = self.param("up_w", init, (e, d, f), self.dtype)
        down_w = self.param("down_w", init, (e, f, d), self.dtype)

        b, t, _ = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        logits = einsum("ND,DE->NE", x_ND.astype(jnp.float32), router_w.astype(jnp.float32))
        weights, idx = route(logits, c, bias)
        impl = self.impl
        if impl == "auto":
            impl = "gather" if 4 * b * t * c.num_experts_per_tok <= e else "dense"
        if jax.sharding.get_abstract_mesh().empty:
            y = run_experts(impl, x_ND, gate_w, up_w, down_w, weights, idx)
        else:
            y = experts_sharded(impl, x_ND, gate_w, up_w, down_w, weights, idx)
        y = y.reshape(b, t, d)
        if c.n_shared_experts:
            y = y + MLP(d, f * c.n_shared_experts, self.dtype, name="shared")(x_BTD)
        return y
