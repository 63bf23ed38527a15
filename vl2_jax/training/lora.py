"""Low-rank adapters (LoRA) over the parameter pytree, outside the modules.

An adapted weight W [L.., I.., O..] (L: leading axes that each hold a weight of their own, the routed
experts' E; I: the axes its einsum contracts with the activations; O: the output axes) gets two factors
A [L.., prod(I), r] and B [L.., r, prod(O)], and the forward uses

    W' = W + (alpha / r) * (A @ B).reshape(W.shape)

computed in float32 and cast to W's dtype. The output side starts at zero (W' = W at step 0) and the
input side uniform in +-1/sqrt(prod(I)), as PEFT does. The absorbed MLA projections `wk_b` [H, K, R]
and `wv_b` [H, U, R] (the reference's `kv_b_proj`, which maps the latent R to each head) hold their
input axis last: their A [H*K, r] is the output side (zeros) and B [r, R] the input side, so that
A @ B still reshapes to W. Stacked projections share one input factor: `gate_up_w` [D, W=2, F] has
A [D, r] and B [r, 2F] (PEFT's separate gate and up adapters would be two rank-r adapters), and
`wk_b`/`wv_b` have one each where PEFT's `kv_b_proj` has one for both. The LM head is a target too (PEFT can target it): with the final norm and the head frozen, a
checkpoint whose head cannot reach a confident token (the random test model's) cannot learn at all.

Why explicit, not qwix: qwix's LoRA wraps the einsums and dot_generals that a module calls at trace
time. Our modules call one `layers.einsum` (and kernel paths beside it) for weight products and for
activation-activation products alike, and the routed experts' weights [E, D, W, F] need an adapter
per expert: wrapping them would tie the adapters to the modules' call sites, which the quantization
work is changing. Here the adapters are a plain {path: array} dict beside the parameters: the modules
are untouched, `effective_params` runs inside the differentiated loss (only A and B get gradients; the
base weights are read, never written, so they stay bit for bit), and `merge` folds them in for export.

Adapter keys are `"<param path>:lora_a"` and `"<param path>:lora_b"` (paths as `train.split_params`:
`language/layers_3/attn/q_w`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vl2_jax.errors import ConfigError

A, B = ":lora_a", ":lora_b"

# (path pattern, input axes, output axes, input axes last) per part; leading (expert) axes are the
# rest, in front. The router's gate and its correction bias match none: they stay frozen.
TARGETS: dict[str, tuple[tuple[str, int, int], ...]] = {
    "language": (
        (r"language/layers_\d+/attn/(q_w|q_a_w|q_b_w|kv_a_w|kv_w)$", 1, None, False),
        (r"language/layers_\d+/attn/(wk_b|wv_b)$", 1, 2, True),
        (r"language/layers_\d+/attn/o_w$", 2, 1, False),
        (r"language/layers_\d+/mlp/(shared/)?gate_up_w$", 1, 2, False),
        (r"language/layers_\d+/mlp/(shared/)?down_w$", 1, 1, False),
        (r"language/lm_head$", 1, 1, False),
    ),
    "vision": (
        (r"vision/block_\d+/(qkv_w|fc1_w|fc2_w)$", 1, None, False),
        (r"vision/block_\d+/out_w$", 2, 1, False),
    ),
    "projector": ((r"projector/w\d+$", 1, None, False),),
}


def adapted(path: str, shape: Sequence[int], parts: Sequence[str]) -> tuple[int, int, int, bool] | None:
    """(leading axes, input axes, output axes, inputs last) of the weight at `path` if one of `parts`'
    targets matches it, else None. An output count of None means "all axes after the inputs"."""
    for part in parts:
        for pattern, n_in, n_out, in_last in TARGETS[part]:
            if re.match(pattern, path):
                n_out = len(shape) - n_in if n_out is None else n_out
                lead = len(shape) - n_in - n_out
                if lead < 0:
                    raise ConfigError(f"{path} {tuple(shape)} has fewer axes than its LoRA rule ({n_in} in, {n_out} out).")
                return lead, n_in, n_out, in_last
    return None


def init_adapters(weights: dict[str, jax.Array], parts: Sequence[str], rank: int, seed: int = 0) -> dict[str, jax.Array]:
    """{path: weight} -> {path:lora_a: A, path:lora_b: B} (float32) for every target weight of `parts`
    ("language", "vision", "projector"): A [L.., I, r] random and B [L.., r, O] zeros, or for weights
    with their inputs last A [L.., O, r] zeros and B [L.., r, I] random."""
    unknown = set(parts) - set(TARGETS)
    if unknown:
        raise ConfigError(f"unknown LoRA part(s) {sorted(unknown)}; use {', '.join(TARGETS)}.")
    if rank < 1:
        raise ConfigError(f"the LoRA rank must be at least 1 (got {rank}).")
    out = {}
    rng = np.random.default_rng(seed)
    for path in sorted(weights):
        shape = tuple(weights[path].shape)
        axes = adapted(path, shape, parts)
        if axes is None:
            continue
        lead, n_in, n_out, in_last = axes
        first = math.prod(shape[lead:len(shape) - (n_in if in_last else n_out)])
        fan_in = math.prod(shape[len(shape) - n_in:] if in_last else shape[lead:lead + n_in])
        last = math.prod(shape[lead:]) // first
        bound = 1.0 / math.sqrt(fan_in)
        lead_shape = shape[:lead]
        if in_last:
            a = np.zeros((*lead_shape, first, rank), np.float32)
            b = rng.uniform(-bound, bound, (*lead_shape, rank, last)).astype(np.float32)
        else:
            a = rng.uniform(-bound, bound, (*lead_shape, first, rank)).astype(np.float32)
            b = np.zeros((*lead_shape, rank, last), np.float32)
        out[path + A], out[path + B] = jnp.asarray(a), jnp.asarray(b)
    if not out:
        raise ConfigError(f"no weight of {', '.join(parts)} is a LoRA target.")
    return out


def is_adapter(key: str) -> bool:
    return key.endswith((A, B))


def delta(a: jax.Array, b: jax.Array, shape: Sequence[int], scale: float) -> jax.Array:
    """scale * A @ B, per leading index, reshaped to the weight's `shape`: float32."""
    ab = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
    return (scale * ab).reshape(shape)


def effective_params(weights: dict[str, jax.Array], adapters: dict[str, jax.Array], scale: float) -> dict[str, jax.Array]:
    """{path: W} with each adapted W replaced by W + scale * A @ B (float32 sum, cast to W's dtype);
    the others are the same arrays. Differentiable in the adapters."""
    out = dict(weights)
    for key, a in adapters.items():
        if key.endswith(A):
            path = key[: -len(A)]
            w = weights[path]
            out[path] = (w.astype(jnp.float32) + delta(a, adapters[path + B], w.shape, scale)).astype(w.dtype)
    return out


def merge(weights: dict[str, jax.Array], adapters: dict[str, jax.Array], scale: float) -> dict[str, jax.Array]:
    """The adapters folded into the weights for export: `effective_params` (float32 arithmetic, the
    weights' dtype), jitted so that the tree is merged in one program."""
    return jax.jit(lambda w, ad: effective_params(w, ad, scale))(weights, adapters)
