"""Weight-only quantization of the language model: int8 or fp8 (e4m3) values with float32 scales.

Format. A quantized weight is the parameter tree's dict `{"qvalue": values, "scale": scales}` in place
of the float array: `values` (int8 or float8_e4m3fn) keep the weight's shape and layout; `scales`
(float32) have the same rank, 1 on the contracted (input) dimensions and full size on the others, i.e.
one scale per output channel (for stacked experts [E, D, F]: per expert and output column). The weight
is `values * scales` (symmetric absmax: qwix maps a channel's largest magnitude to 127.5 for int8,
rounded into [-128, 127], and to 448 for fp8). The field names are those
of `qwix.QArray`, which the model wraps them in (`as_qarray`) and which computes them (`qwix.quantize`,
`qwix.dequantize`): qwix owns the quantization arithmetic and the format.

What is quantized (`quantized_axes`): the attention projections, the dense MLP, the routed and shared
experts of the language model; its LM head only where `quantize_params(..., lm_head=True)` is asked
for in Python (no command-line flag; off by default). The router gate and its correction bias, the
norms, the embedding and the vision tower and projector stay float (the vision tower has no option).

Where qwix is not used, and why: the products. qwix rewrites a model by intercepting its
`jnp.einsum`/`dot_general` calls (`qwix.quantize_model`) and its `dot_general`, for float activations
against a weight-only `QArray`, dequantizes the weight before the matmul. Our MoE dispatches run Pallas
kernels and gathers over an explicit parameter pytree, and the dense projections apply the scale after
the product where that is the same arithmetic ((x @ values) * scales, `qeinsum`), so that the product
reads the 1-byte values; these few lines are ours (`vl2_jax.modules.layers.qeinsum`, the dispatches in
`vl2_jax.modules.moe`, the kernels' `scales_EN` arguments in `vl2_jax.kernels`).

The choice is a value, `quant` in `QUANTS` ("none", "int8", "fp8"), passed to `load_model`, `convert`
and the entry points' `--quant`, never read from the environment; "none" leaves every parameter as it
is and the float path unchanged.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from vl2_jax.config import QUANTS
from vl2_jax.errors import ConfigError

try:  # float models run without qwix (e.g. on a machine that has no wheel of it); quantizing needs it
    import qwix
except ImportError:  # pragma: no cover - qwix is a dependency of the package
    qwix = None

QTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
VALUES, SCALES = "qvalue", "scale"

# (path regex, contracted axes by rank). Paths as `sharding` writes them, without "params/".
_LAYER = r"^language/layers_\d+/"
QUANTIZED_RULES: tuple[tuple[str, dict[int, tuple[int, ...]]], ...] = (
    (_LAYER + r"attn/(q_w|q_b_w)$", {3: (0,)}),  # [D|Q, H, K]
    (_LAYER + r"attn/kv_w$", {4: (0,)}),  # [D, W, G, K]
    (_LAYER + r"attn/(q_a_w|kv_a_w)$", {2: (0,)}),  # [D, Q|R+J]
    (_LAYER + r"attn/wk_b$", {3: (1,)}),  # [H, K, R]: scales per (head, latent channel)
    (_LAYER + r"attn/wv_b$", {3: (2,)}),  # [H, U, R]: scales per (head, value channel)
    (_LAYER + r"attn/o_w$", {3: (0, 1)}),  # [H, K|U, D]
    (_LAYER + r"mlp/(shared/)?gate_up_w$", {3: (0,), 4: (1,)}),  # [D, W, F], experts [E, D, W, F]
    (_LAYER + r"mlp/(shared/)?down_w$", {2: (0,), 3: (1,)}),  # [F, D], experts [E, F, D]
)
LM_HEAD_RULE = (r"^language/lm_head$", {2: (0,)})  # [D, V], only with `lm_head=True`


def check_quant(quant: str) -> str:
    """`quant` if it names a format ("none", "int8", "fp8"); else one ConfigError."""
    if quant not in QUANTS:
        raise ConfigError(f"unknown quantization {quant!r}; use one of {', '.join(QUANTS)}.")
    if quant != "none" and qwix is None:
        raise ConfigError(f"quantizing to {quant} needs Google's qwix (pip install qwix), which is not installed.")
    return quant


def quantized_axes(path: str, ndim: int, lm_head: bool = False) -> tuple[int, ...] | None:
    """The contracted axes of the parameter at `path` (e.g. "language/layers_1/mlp/down_w") if it is
    quantized, else None."""
    path = path.removeprefix("params/")
    for pattern, by_rank in (*QUANTIZED_RULES, *((LM_HEAD_RULE,) if lm_head else ())):
        if re.search(pattern, path):
            return by_rank.get(ndim)
    return None


def is_quantized(leaf) -> bool:
    """Whether a parameter-tree node is a quantized weight (`{"qvalue", "scale"}`) or a `qwix.QArray`."""
    if qwix is not None and isinstance(leaf, qwix.QArray):
        return True
    return isinstance(leaf, dict) and set(leaf) == {VALUES, SCALES}


def quantize(w: jax.Array, quant: str, contracted: tuple[int, ...]) -> dict[str, jax.Array]:
    """A float weight -> `{"qvalue", "scale"}` with one float32 scale per index of the axes not in
    `contracted` (computed in float32 by `qwix.quantize`, absmax)."""
    check_quant(quant)
    keep = tuple(a for a in range(w.ndim) if a not in contracted)
    q = qwix.quantize(w.astype(jnp.float32), QTYPES[quant], channelwise_axes=keep, scale_dtype=jnp.float32)
    return {VALUES: q.qvalue, SCALES: q.scale}


def as_qarray(leaf) -> qwix.QArray:
    """A quantized weight node as a `qwix.QArray` (a pytree; it reshapes and indexes like an array)."""
    check_quant("int8")  # any format: qwix must be there
    return leaf if isinstance(leaf, qwix.QArray) else qwix.QArray(qvalue=leaf[VALUES], scale=leaf[SCALES])


def dequantize(w, dtype=jnp.float32) -> jax.Array:
    """values * scales in float32, cast to `dtype` (a float array passes through)."""
    if not is_quantized(w):
        return w
    return qwix.dequantize(as_qarray(w)).astype(dtype)


def quantize_params(params: dict, quant: str, lm_head: bool = False) -> dict:
    """A float parameter tree (`{"params": ...}` or its contents) with every weight that `quantized_axes`
    names replaced by its quantized form; "none" returns it unchanged. Each leaf is quantized on its
    device(s) by one jitted call (its sharding kept for the values, the float leaf then free to go)."""
    if check_quant(quant) == "none":
        return params

    def one(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        axes = quantized_axes(name, leaf.ndim, lm_head)
        if axes is None:
            return leaf
        return _quantizer(quant, axes)(leaf)

    return jax.tree_util.tree_map_with_path(one, params)


_QUANTIZERS: dict = {}


def _quantizer(quant: str, axes: tuple[int, ...]):
    key = (quant, axes)
    if key not in _QUANTIZERS:
        _QUANTIZERS[key] = jax.jit(lambda w: quantize(w, quant, axes))
    return _QUANTIZERS[key]


def dequantize_params(params: dict, dtype=jnp.float32) -> dict:
    """The float tree a quantized one stands for: every quantized weight as `dequantize(w, dtype)`."""
    return jax.tree.map(lambda leaf: dequantize(leaf, dtype) if is_quantized(leaf) else leaf, params,
                        is_leaf=is_quantized)


def weight_bytes(params: dict) -> int:
    """Bytes of every array in the tree (values and scales included)."""
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(params))


def quantized_shapes(shapes: dict, quant: str, lm_head: bool = False) -> dict:
    """The tree of `jax.ShapeDtypeStruct`s that `quantize_params` makes of a float tree `shapes`."""
    if check_quant(quant) == "none":
        return shapes

    def one(path, leaf):
        axes = quantized_axes(jax.tree_util.keystr(path, simple=True, separator="/"), len(leaf.shape), lm_head)
        if axes is None:
            return leaf
        scale = tuple(1 if a in axes else n for a, n in enumerate(leaf.shape))
        return {VALUES: jax.ShapeDtypeStruct(leaf.shape, QTYPES[quant]), SCALES: jax.ShapeDtypeStruct(scale, jnp.float32)}

    return jax.tree_util.tree_map_with_path(one, shapes)
