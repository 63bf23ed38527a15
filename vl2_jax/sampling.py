"""Next-token selection on the device: greedy, temperature, top-k, top-p and repetition penalty.

The settings are traced scalars, so changing them never recompiles; only greedy (temperature 0)
against sampling is static, so that greedy decoding carries no sampling code and no on-device branch
(one compilation each). Semantics follow Hugging Face's
logits processors, which the official code's `generate` uses:
- repetition penalty: for tokens already in the prompt or the answer, a positive logit is divided by
  the penalty and a negative one multiplied by it;
- temperature 0 means greedy (argmax, first index on ties); otherwise logits are divided by it;
- top-k keeps the k largest logits (0 = off); top-p keeps the smallest set of most likely tokens whose
  probability reaches p (at least one token; 1.0 = off).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vl2_jax.errors import InputError


def check_sampling(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, flags: bool = False) -> None:
    """Refuses settings outside their ranges with one `InputError`; `flags` names them as the command
    line's flags (`--top-p`) rather than as arguments (`top_p`)."""
    checks = [
        (0 <= temperature < math.inf, "temperature", temperature, ">= 0", ""),
        (0 < top_p <= 1, "top_p", top_p, "in (0, 1]", ""),
        (top_k >= 0, "top_k", top_k, ">= 0", ""),
        (0 < repetition_penalty < math.inf, "repetition_penalty", repetition_penalty, "> 0", "; 1 turns it off"),
    ]
    for ok, name, value, rule, hint in checks:  # `not ok` also refuses nan
        if not ok:
            label = "--" + name.replace("_", "-") if flags else name
            raise InputError(f"{label} must be {rule} (got {value}{hint}).")


@struct.dataclass
class SamplingParams:
    """Scalars (numpy or on the device): temperature [] f32, top_k [] i32, top_p [] f32,
    repetition_penalty [] f32; `greedy` is static (part of the jit cache key)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    greedy: bool = struct.field(pytree_node=False)

    @classmethod
    def make(cls, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0) -> SamplingParams:
        t = np.float32(temperature)  # greedy exactly when the device value is 0 (1e-46 rounds to it)
        # numpy scalars: they travel with the jitted call that reads them, with no transfer of their own
        return cls(t, np.int32(top_k), np.float32(top_p), np.float32(repetition_penalty), greedy=bool(t == 0))


def penalize(logits_BV: jax.Array, seen_BV: jax.Array, penalty: jax.Array) -> jax.Array:
    penalized = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalized, logits_BV)


def filter_top_k_top_p(logits_BV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits outside the top-k / top-p set become -inf."""
    v = logits_BV.shape[-1]
    desc = -jnp.sort(-logits_BV, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, desc.shape[:-1])[..., None], axis=-1)
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    desc = jnp.where(desc < kth, -jnp.inf, desc)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = before < top_p
    keep = keep.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV < threshold, -jnp.inf, logits_BV)


def sample(logits_BV: jax.Array, seen_BV: jax.Array, params: SamplingParams, key: jax.Array) -> jax.Array:
    """float32 logits [B, V] -> token ids [B] int32."""
    logits_BV = penalize(logits_BV, seen_BV, params.repetition_penalty)
    if params.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    scaled = logits_BV / params.temperature
    return jax.random.categorical(key, filter_top_k_top_p(scaled, params.top_k, params.top_p), axis=-1).astype(jnp.int32)
