"""Next-token selection on the device: greedy, temperature, top-k, top-p and repetition penalty.

Every setting is a per-row array (`RowSampling`), so changing one never recompiles; only "every row
greedy" is static (`sample_rows(greedy_only=True)` carries no sort and no draws). Semantics follow
Hugging Face's logits processors, which the official code's `generate` uses:
- repetition penalty: for tokens already in the prompt or the answer, a positive logit is divided by
  the penalty and a negative one multiplied by it;
- temperature 0 means greedy (argmax, first index on ties); otherwise logits are divided by it;
- top-k keeps the k largest logits (0 = off); top-p keeps the smallest set of most likely tokens whose
  probability reaches p (at least one token; 1.0 = off).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vl2_jax.errors import InputError


def check_sampling(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0, flags: bool = False) -> None:
    """Refuses settings of the wrong kind or outside their ranges with one `InputError`; `flags` names
    them as the command line's flags (`--top-p`) rather than as arguments (`top_p`)."""
    bad = sampling_error(temperature, top_p, top_k, repetition_penalty, seed, flags)
    if bad is not None:
        raise InputError(bad[1])


def sampling_error(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0,
                   flags: bool = False) -> tuple[str, str] | None:
    """(the first setting of the wrong kind or outside its range, a sentence saying so), or None where
    all are fine. top_k and seed are whole numbers (any, for the seed: it is taken modulo 2**32), the
    others numbers; a bool is neither."""
    values = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty,
              "seed": seed}
    label = lambda name: "--" + name.replace("_", "-") if flags else name  # noqa: E731
    for name, value in values.items():
        whole = name in ("top_k", "seed")
        kind = _kind(value)
        if kind is None or (whole and kind != "whole"):
            return name, f"{label(name)} must be {'a whole number' if whole else 'a number'} (got {value!r})."
        values[name] = int(value) if kind == "whole" else float(value)
    temperature, top_p, top_k, repetition_penalty = (values[k] for k in list(values)[:4])
    checks = [
        (0 <= temperature < math.inf, "temperature", "finite and >= 0", ""),
        (0 < top_p <= 1, "top_p", "in (0, 1]", ""),
        (top_k >= -1, "top_k", "a whole number >= 1, or 0 or -1 (off)", ""),
        (0 < repetition_penalty < math.inf, "repetition_penalty", "finite and > 0", "; 1 turns it off"),
    ]
    for ok, name, rule, hint in checks:  # `not ok` also refuses nan
        if not ok:
            return name, f"{label(name)} must be {rule} (got {values[name]}{hint})."
    return None


def _kind(value) -> str | None:
    """"whole" for an integer, "number" for a float (Python's, numpy's, or a JAX or numpy scalar
    array's), None for anything else (a bool included)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return "whole"
    if isinstance(value, numbers.Real):
        return "number"
    dtype = getattr(value, "dtype", None)
    if dtype is None or np.ndim(value) != 0:
        return None
    return "whole" if jnp.issubdtype(dtype, jnp.integer) else "number" if jnp.issubdtype(dtype, jnp.floating) else None


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


@struct.dataclass
class RowSampling:
    """Per-row settings [B] as device arrays, so that no setting changes a compiled program: temperature
    f32 (0 = greedy for that row), top_k i32 (0 or -1 = off), top_p f32 (1 = off), repetition_penalty f32
    (1 = off), seed u32 (each row draws from its own key: the seed folded with the row's step)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    seed: jax.Array

    @classmethod
    def make(cls, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0) -> RowSampling:
        """One row's settings as numpy scalars (host side; the engine writes them into a slot). A top_k of
        -1 (off, as SGLang writes it) becomes 0; one past int32 keeps every token, as any top_k of the
        vocabulary's size or more does; a temperature or penalty past float32 becomes its largest finite
        value (not inf, which would make nan of -inf)."""
        big = float(np.finfo(np.float32).max)
        return cls(np.float32(min(temperature, big)), np.int32(min(max(int(top_k), 0), 2**31 - 1)), np.float32(top_p),
                   np.float32(min(repetition_penalty, big)), np.uint32(int(seed) % 2**32))


def sample_rows(logits_BV: jax.Array, seen_BV: jax.Array, params: RowSampling, steps_B: jax.Array,
                greedy_only: bool) -> jax.Array:
    """float32 logits [B, V] -> token ids [B] int32, each row by its own settings and its own key,
    `fold_in(key(seed), step)`: a seeded row draws the same tokens whatever row it sits in. Rows with
    temperature 0 take the argmax (first index on ties). `greedy_only` (static, every row greedy)
    skips the sort and the draws."""
    logits_BV = penalize(logits_BV, seen_BV, params.repetition_penalty[:, None])
    greedy = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if greedy_only:
        return greedy
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    filtered = filter_top_k_top_p(logits_BV / temperature, params.top_k, params.top_p[:, None])
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(params.seed, steps_B)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered).astype(jnp.int32)
    return jnp.where(params.temperature > 0, drawn, greedy)
