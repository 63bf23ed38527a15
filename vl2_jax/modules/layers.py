"""Small building blocks shared by the vision tower and the language model."""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from vl2_jax.kernels import dense_matvec, dense_matvec_usable, local_arrays
from vl2_jax.quant import as_qarray, is_quantized


def one_row_product(spec: str, x: jax.Array, w: jax.Array) -> tuple[int, int, tuple[int, ...]] | None:
    """(K, N, output shape) where `spec` multiplies one row of activations by a weight, "a c, c r -> a r"
    (`a` may be "..."; the letters c contracted, K and N the sizes of c and r, a's sizes all 1); a's
    letters (not an ellipsis) may also stand anywhere among r's in the output, r's in their order (tiny's
    "BTD,DWGK->WBTGK"): of size 1, they move no data. Else None (any other spec, or shapes that do not fit it: `jnp.einsum` then says what
    is wrong)."""
    if "->" not in spec:
        return None
    ins, out = spec.replace(" ", "").split("->")
    lhs, rhs = ins.split(",")
    c = "".join(ch for ch in lhs if ch in rhs and ch not in out)
    a, r = lhs[: len(lhs) - len(c)], rhs[len(c):]
    repeated = any(len(set(t)) != len(t) for t in (lhs.replace("...", ""), rhs))
    if not c or repeated or "." in rhs or lhs != a + c or rhs != c + r:
        return None
    if out != a + r and ("..." in a or sorted(out) != sorted(a + r) or "".join(ch for ch in out if ch in r) != r):
        return None
    lead = x.shape[: x.ndim - len(c)]
    fits = (x.ndim == len(lhs) or "..." in a) and w.ndim == len(rhs) and x.shape[x.ndim - len(c):] == w.shape[: len(c)]
    if not fits or math.prod(lead) != 1:
        return None
    size = {**dict(zip(a, lead)), **dict(zip(r, w.shape[len(c):]))}
    shape = (*lead, *w.shape[len(c):]) if out == a + r else tuple(size[ch] for ch in out)
    return math.prod(w.shape[: len(c)]), math.prod(w.shape[len(c):]), shape


def einsum(spec: str, *operands: jax.Array, preferred_element_type=None) -> jax.Array:
    """`jnp.einsum` at full float32 precision when the operands are float32.

    GPUs otherwise run float32 matmuls in TF32, which breaks float32 parity with the reference; bfloat16
    operands are unaffected.
    """
    full = all(op.dtype == jnp.float32 for op in operands)
    return jnp.einsum(spec, *operands, precision=jax.lax.Precision.HIGHEST if full else None,
                      preferred_element_type=preferred_element_type)


def weight(module: nn.Module, name: str, init, shape, dtype):
    """`module.param(name, ...)`, or, where the parameter tree holds a quantized weight under `name`
    (`vl2_jax.quant`: `{"qvalue", "scale"}`), that weight as a `qwix.QArray` (checked against `shape`)."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if is_quantized(value):
            q = as_qarray(value)
            if tuple(q.shape) != tuple(shape):
                raise ValueError(f"quantized parameter {name} has shape {q.shape}, expected {tuple(shape)}")
            return q
    return module.param(name, init, shape, dtype)


def _scale_after(spec: str, w) -> tuple[str, str] | None:
    """(the output's named letters, the scale's letters in output order) where `spec` keeps every
    dimension on which the quantized weight `w`'s scales vary, so that (x @ values) * scales equals
    x @ (values * scales); else None."""
    ins, out = spec.replace(" ", "").split("->")
    rhs = ins.split(",")[1]
    if "." in rhs or not out.replace("...", "").isalpha() or "..." in out.replace("...", "", 1):
        return None
    varying = [letter for letter, n in zip(rhs, w.scale.shape) if n != 1]
    if not all(letter in out for letter in varying):
        return None
    named = out.replace("...", "")
    return named, "".join(letter for letter in named if letter in rhs)


def qeinsum(spec: str, x: jax.Array, w, preferred_element_type=None) -> jax.Array:
    """`einsum(spec, x, w)` where `w` may be a quantized weight (`qwix.QArray`, per-output-channel
    scales): the values, cast to x's dtype, go into the product and the scales multiply its float32
    result when `spec` keeps the scaled dimensions ((x @ values) * scales); otherwise (a product that
    contracts a scaled dimension, e.g. MLA's `wk_b` expanded for fused attention) the weight is
    dequantized to x's dtype first. The result has the dtype `einsum` would give with a float weight."""
    if not is_quantized(w):
        return einsum(spec, x, w, preferred_element_type=preferred_element_type)
    w, dtype = as_qarray(w), x.dtype
    letters = _scale_after(spec, w)
    if letters is None:
        w_float = (w.qvalue.astype(jnp.float32) * w.scale).astype(x.dtype)
        return einsum(spec, x, w_float, preferred_element_type=preferred_element_type)
    named, kept = letters
    values = w.qvalue.astype(x.dtype)
    if x.dtype != jnp.float32 and jax.default_backend() == "cpu":  # (XLA's CPU runtime has no batched
        x, values = x.astype(jnp.float32), values.astype(jnp.float32)  # 16-bit x 16-bit -> float32 product)
    y = einsum(spec, x, values, preferred_element_type=jnp.float32)
    rhs = spec.replace(" ", "").split("->")[0].split(",")[1]
    scale = jnp.squeeze(w.scale, tuple(i for i, letter in enumerate(rhs) if letter not in kept))
    scale = jnp.transpose(scale, [[letter for letter in rhs if letter in kept].index(c) for c in kept])
    scale = scale.reshape([scale.shape[kept.index(c)] if c in kept else 1 for c in named])
    return (y * scale).astype(preferred_element_type or dtype)


def project(spec: str, x: jax.Array, w, use_kernel: bool = True) -> jax.Array:
    """Activations times a weight by `spec` (an einsum whose weight operand is second): `qeinsum`, or,
    with `use_kernel` where one row of 16-bit activations meets a weight (batch-1 decode),
    `kernels.dense_matvec`, which writes the activations' dtype itself. XLA's GPU compiler runs such a product
    as an elementwise multiply and a reduction with the weight-sized product written out in between;
    the kernel reads the weight once. A quantized weight (`qwix.QArray`) goes into the kernel as its
    values and per-output-channel scales, where its scales vary over the output only.
    """
    quantized = is_quantized(w)
    if use_kernel and local_arrays() and (quantized or x.dtype == w.dtype):
        product = one_row_product(spec, x, w)
        usable = product is not None and (dense_matvec_usable(x.dtype, *product[:2]) if not quantized else
                                          dense_matvec_usable(x.dtype, *product[:2], weight_dtype=w.qvalue.dtype))
        if usable:
            k, n, shape = product
            if not quantized:
                return dense_matvec(x.reshape(1, k), w.reshape(k, n), out_dtype=x.dtype).reshape(shape)
            if _scale_after(spec, w) is not None and w.scale.size == n:
                return dense_matvec(x.reshape(1, k), w.qvalue.reshape(k, n), scales_N=w.scale.reshape(n),
                                    out_dtype=x.dtype).reshape(shape)
    return qeinsum(spec, x, w)


def dot_product_attention(q, k, v, implementation: str, **kwargs) -> jax.Array:
    """`jax.nn.dot_product_attention` ("cudnn" or "xla"), at full precision for float32 operands (GPUs
    would otherwise run the "xla" form's matmuls in TF32)."""
    full = q.dtype == jnp.float32
    with jax.default_matmul_precision("highest") if full else contextlib.nullcontext():
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kwargs)


def normal_init(stddev: float = 0.02):
    return nn.initializers.normal(stddev)


class RMSNorm(nn.Module):
    """DeepSeek-V2 RMSNorm: normalise in float32, cast back, then scale (the reference's order)."""

    dim: int
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (self.dim,), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * x32.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias, statistics in float32."""

    dim: int
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (self.dim,), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.dim,), self.dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rope_cos_sin(positions_BT: jax.Array, dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, dim] of the rotate-half convention (frequencies repeated twice).

    Computed in float32 and cast to the activation dtype, as the reference's cached tables are.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_BTHK: jax.Array, cos_BTK: jax.Array, sin_BTK: jax.Array) -> jax.Array:
    """Rotate-half (Llama) RoPE over the whole last axis; used by MHA (deepseek-vl2-tiny)."""
    cos, sin = cos_BTK[:, :, None, :], sin_BTK[:, :, None, :]
    return x_BTHK * cos + rotate_half(x_BTHK) * sin


def apply_rope_interleaved(x_BTHJ: jax.Array, cos_BTJ: jax.Array, sin_BTJ: jax.Array) -> jax.Array:
    """Interleaved-pair RoPE used by MLA (deepseek-vl2-small and base).

    As the reference, the pairs (x0, x1), (x2, x3), ... are first gathered into halves
    (x0, x2, ..., x1, x3, ...) and then rotated half-wise. The result stays in that permuted order; queries
    and keys share it, so their dot products are those of the rotated pairs.
    """
    x = jnp.concatenate([x_BTHJ[..., 0::2], x_BTHJ[..., 1::2]], axis=-1)
    return apply_rope(x, cos_BTJ, sin_BTJ)
