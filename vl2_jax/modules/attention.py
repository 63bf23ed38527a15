"""Self-attention of the language model: MHA (deepseek-vl2-tiny) and multi-head latent attention (MLA).

Both modules map `x [B, T, D]` at `positions [B, T]` to `[B, T, D]`. Keys come from `kv`, a dict of
per-token key entries `[B, S, ...]` that the caller assembles (the current tokens alone, or a cache that
already holds them); `new_kv(x, positions)` computes the entries of the current tokens. `mask [B, T, S]`
is True where a query may attend to a key. `key_valid [B, S]`, where given, says the mask is causal
over keys that are the queries themselves (S == T) with the invalid ones (left padding) masked:
`mask == tril & key_valid[:, None, :]`; fused attention then runs causal without a mask tensor.
`key_lengths [B]`, where given (decoding, T == 1, through `decode_attention`; `ragged_decode` says when),
replaces the mask: `kv` holds whole cache rows [>= B, S, ...], of which row b's first key_lengths[b] count.

MHA entries: k [B, S, G, K] (rotated), v [B, S, G, K].
MLA entries: latent [B, S, R] (RMS-normed), k_rope [B, S, J] (rotated): 576 numbers per token at the
real sizes. Attention uses the absorbed form, exactly as the reference's eager path: `kv_b_proj` is folded
into the query (`wk_b`) and into the output (`wv_b`).

Parameter layout (`language/layers_{i}/attn`):
    MHA: q_w [D, H, K], kv_w [D, W, G, K] (W = 2: key | value), o_w [H, K, D]
    MLA: q_w [D, H, K+J] (or q_a_w [D, Q], q_a_norm/scale [Q], q_b_w [Q, H, K+J]),
         kv_a_w [D, R+J] (latent | rope key), kv_a_norm/scale [R], wk_b [H, K, R], wv_b [H, U, R], o_w [H, U, D]
Projections that read the same input share one weight (one matmul at decode, where each costs a kernel).

`runtime.attention` (one of `vl2_jax.config.ATTENTION_IMPLS`) picks how queries meet keys: "plain" is the einsums
and float32 softmax above (MLA absorbed), the reference's arithmetic; "cudnn" and "xla" run
`jax.nn.dot_product_attention` (MLA first expands the latent into per-head keys and values,
`attend_fused`); "auto" (the default) runs cuDNN flash attention for prompts (more than one query)
where it applies (`fused_impl`, with `runtime.kernels`) and "plain" otherwise: decoding one token with
MLA reads the latent cache (576 numbers per token) directly, where expanding it would not pay. The
projections go through `layers.project`, which runs batch 1's through the matrix-vector kernel where
`runtime.kernels` allows. Decoding under "auto" with kernels attends through `kernels.decode_attention`
where it runs (`ragged_decode`): each row's keys up to its own length, read in place from the cache.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from flax import linen as nn

from vl2_jax.config import LanguageConfig, Runtime
from vl2_jax.errors import ConfigError
from vl2_jax.kernels import cudnn_attention_usable, decode_attention, decode_attention_usable, local_arrays
from vl2_jax.modules.layers import (
    RMSNorm,
    apply_rope,
    apply_rope_interleaved,
    dot_product_attention,
    einsum,
    normal_init,
    project,
    qeinsum,
    rope_cos_sin,
    weight,
)
from vl2_jax.quant import is_quantized

# Fused causal attention marks invalid keys on extra head dims (a multiple of 8, cuDNN's unit): each
# query has 1 on the first, each invalid key this score, which the softmax turns into a zero weight
# (exp(-32768 * scale) underflows for any head dim up to 256, scale 1/16). Exact in bfloat16 and
# float16 and finite in float16 (max 65504): an infinite score would make a row of padding queries,
# whose keys are all invalid, NaN.
FLAG_DIMS, INVALID_KEY_SCORE = 8, -32768.0

# The reference builds q_a_layernorm / kv_a_layernorm without passing eps: they use 1e-6 whatever
# config.rms_norm_eps says (only the decoder layers' norms take the config's value).
LATENT_NORM_EPS = 1e-6


def masked_softmax(scores: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """Softmax over the last axis in float32 (as the reference), cast to `dtype`.

    Masked entries get the float32 minimum, as the reference's additive mask; a row with no valid key
    (a padding query) then averages instead of producing NaN.
    """
    scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def check_attention(runtime: Runtime, dtype) -> None:
    """Refuses `attention="cudnn"` where cuDNN flash attention cannot run (an NVIDIA GPU and bf16/f16
    weights), before anything runs: JAX would fail at the first call."""
    if runtime.attention == "cudnn" and not cudnn_attention_usable(dtype, 128):
        raise ConfigError(
            f"attention 'cudnn' runs on NVIDIA GPUs in bfloat16 or float16, not here ({jax.default_backend()}, "
            f"{jnp.dtype(dtype).name}); use 'auto' (cuDNN where it runs), 'xla' or 'plain'.")


def fused_impl(runtime: Runtime, dtype, queries: int, head_dim: int) -> str | None:
    """The `jax.nn.dot_product_attention` implementation an attention call runs, or None for the plain
    path. "auto" takes cuDNN, where kernels may run, for more than one query where it applies (the head
    dim with the causal form's flags), on whole per-device arrays (under automatic partitioning the plain
    path runs; its sharding is tested on the CPU)."""
    impl = runtime.attention
    if impl == "auto":
        usable = (runtime.kernels and queries > 1 and cudnn_attention_usable(dtype, head_dim + FLAG_DIMS)
                  and local_arrays())
        return "cudnn" if usable else None
    return None if impl == "plain" else impl


def ragged_decode(cfg: LanguageConfig, dtype, runtime: Runtime, keys: int) -> bool:
    """Whether decoding attends through `kernels.decode_attention` (`key_lengths`: each row's keys read
    in place up to its own length) over cache rows of `keys` entries, rather than through the masked
    softmax over a key bucket: under "auto" with kernels, on whole per-device arrays, where the kernel
    runs. Asked inside the mesh the programs are traced under (`local_arrays`)."""
    if runtime.attention != "auto" or not runtime.kernels or not local_arrays():
        return False
    if cfg.use_mla:
        return decode_attention_usable(dtype, cfg.num_attention_heads, (cfg.kv_lora_rank, cfg.qk_rope_head_dim),
                                       None, keys)
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    return decode_attention_usable(dtype, per_group, (cfg.head_dim,), cfg.head_dim, keys)


def flag_invalid_keys(q_BTHK, k_BSGK, key_valid_BS) -> tuple[jax.Array, jax.Array]:
    """q [B, T, H, K + FLAG_DIMS], k [B, S, G, K + FLAG_DIMS]: q . k is unchanged for valid keys and
    lowered by INVALID_KEY_SCORE for the others."""
    flag_q = jnp.zeros((*q_BTHK.shape[:-1], FLAG_DIMS), q_BTHK.dtype).at[..., 0].set(1)
    score = jnp.where(key_valid_BS, 0.0, INVALID_KEY_SCORE).astype(k_BSGK.dtype)[:, :, None]
    flag_k = jnp.zeros((*k_BSGK.shape[:-1], FLAG_DIMS), k_BSGK.dtype).at[..., 0].set(score)
    return jnp.concatenate([q_BTHK, flag_q], -1), jnp.concatenate([k_BSGK, flag_k], -1)


def attend_fused(q_BTHK, k_BSGK, v_BSGU, mask_BTS, scale: float, implementation: str, key_valid_BS=None,
                 fallible: bool = False) -> jax.Array | None:
    """softmax(q k^T * scale, masked) v by `jax.nn.dot_product_attention`: [B, T, H, U].

    G key heads serve H // G query heads each. With `key_valid` (see the module docstring; T == S) it
    runs causal, the invalid keys flagged on `FLAG_DIMS` extra head dims, and skips the keys past each
    query (cuDNN computes half the scores, and reads no [B, T, S] mask); otherwise `mask` becomes a
    bias. Values may be narrower than keys (MLA: U = 128 against K = 192); they are zero-padded to the
    keys' width for the call and the output cut back to U. Rows of padding queries are unspecified
    (the plain path averages over all slots; the causal form weights the keys up to the query).
    `fallible` (the "auto" choice): None, with a warning, where the implementation refuses the call
    at trace time (a cuDNN or GPU that cannot run it), so that the caller runs the plain path.
    """
    u = v_BSGU.shape[-1]
    mask, causal = mask_BTS[:, None], False
    if key_valid_BS is not None:
        if q_BTHK.shape[1] != k_BSGK.shape[1]:
            raise ValueError(f"key_valid needs the queries to be the keys (T == S), got T = {q_BTHK.shape[1]} "
                             f"and S = {k_BSGK.shape[1]}")
        mask, causal = None, True
        q_BTHK, k_BSGK = flag_invalid_keys(q_BTHK, k_BSGK, key_valid_BS)
    v_BSGU = jnp.pad(v_BSGU, [(0, 0)] * 3 + [(0, q_BTHK.shape[-1] - u)])
    try:
        out = dot_product_attention(q_BTHK, k_BSGK, v_BSGU, implementation, mask=mask, is_causal=causal,
                                    scale=scale)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        if not fallible:
            raise
        warnings.warn(f"vl2_jax: {implementation} attention refused a call ({type(e).__name__}: {str(e)[:200]}); "
                      "the plain attention runs instead.", stacklevel=2)
        return None
    return out[..., :u]


class MHAttention(nn.Module):
    cfg: LanguageConfig
    dtype: jnp.dtype = jnp.float32
    runtime: Runtime = Runtime.plain()

    def setup(self):
        c, init = self.cfg, normal_init()
        h, g, k, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
        self.q_w = weight(self, "q_w", init, (d, h, k), self.dtype)
        self.kv_w = weight(self, "kv_w", init, (d, 2, g, k), self.dtype)
        self.o_w = weight(self, "o_w", init, (h, k, d), self.dtype)

    def _rope(self, positions_BT, dtype):
        return rope_cos_sin(positions_BT, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def new_kv(self, x_BTD: jax.Array, positions_BT: jax.Array) -> dict[str, jax.Array]:
        cos, sin = self._rope(positions_BT, x_BTD.dtype)
        # float keys and values keep XLA's product: through the matrix-vector kernel tiny decoded 10%
        # slower at batch 1 (H100, BENCHMARKS.md); quantized ones take it (it reads their values in place)
        kv = project("BTD,DWGK->WBTGK", x_BTD, self.kv_w, self.runtime.kernels and is_quantized(self.kv_w))
        return {"k": apply_rope(kv[0], cos, sin), "v": kv[1]}

    def __call__(self, x_BTD, positions_BT, kv: dict[str, jax.Array], mask_BTS, key_valid_BS=None,
                 key_lengths_B=None) -> jax.Array:
        c = self.cfg
        cos, sin = self._rope(positions_BT, x_BTD.dtype)
        kernel = self.runtime.kernels
        q = apply_rope(project("BTD,DHK->BTHK", x_BTD, self.q_w, kernel), cos, sin)
        b, t, h, k = q.shape
        g = c.num_key_value_heads
        if key_lengths_B is not None:
            out = decode_attention((q.reshape(b, g, h // g, k),), (kv["k"],), kv["v"], key_lengths_B, k**-0.5)
            return project("BTHK,HKD->BTD", out.reshape(b, t, h, k), self.o_w, kernel)
        fused = fused_impl(self.runtime, q.dtype, t, k)
        if fused:
            out = attend_fused(q, kv["k"], kv["v"], mask_BTS, k**-0.5, fused, key_valid_BS,
                               self.runtime.attention == "auto")
            if out is not None:
                return project("BTHK,HKD->BTD", out, self.o_w, kernel)
        q = q.reshape(b, t, g, h // g, k)
        scores = einsum("BTGhK,BSGK->BGhTS", q, kv["k"]) / jnp.asarray(k**0.5, q.dtype)
        probs = masked_softmax(scores, mask_BTS[:, None, None], q.dtype)
        out = einsum("BGhTS,BSGK->BTGhK", probs, kv["v"]).reshape(b, t, h, k)
        return project("BTHK,HKD->BTD", out, self.o_w, kernel)


class MLAttention(nn.Module):
    cfg: LanguageConfig
    dtype: jnp.dtype = jnp.float32
    runtime: Runtime = Runtime.plain()

    def setup(self):
        c, init = self.cfg, normal_init()
        d, h, r = c.hidden_size, c.num_attention_heads, c.kv_lora_rank
        if c.q_lora_rank is None:
            self.q_w = weight(self, "q_w", init, (d, h, c.q_head_dim), self.dtype)
        else:
            self.q_a_w = weight(self, "q_a_w", init, (d, c.q_lora_rank), self.dtype)
            self.q_a_norm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS, self.dtype)
            self.q_b_w = weight(self, "q_b_w", init, (c.q_lora_rank, h, c.q_head_dim), self.dtype)
        self.kv_a_w = weight(self, "kv_a_w", init, (d, r + c.qk_rope_head_dim), self.dtype)
        self.kv_a_norm = RMSNorm(r, LATENT_NORM_EPS, self.dtype)
        self.wk_b = weight(self, "wk_b", init, (h, c.qk_nope_head_dim, r), self.dtype)
        self.wv_b = weight(self, "wv_b", init, (h, c.v_head_dim, r), self.dtype)
        self.o_w = weight(self, "o_w", init, (h, c.v_head_dim, d), self.dtype)

    def _rope(self, positions_BT, dtype):
        return rope_cos_sin(positions_BT, self.cfg.qk_rope_head_dim, self.cfg.rope_theta, dtype)

    def new_kv(self, x_BTD: jax.Array, positions_BT: jax.Array) -> dict[str, jax.Array]:
        cos, sin = self._rope(positions_BT, x_BTD.dtype)
        kv_a = project("BTD,DR->BTR", x_BTD, self.kv_a_w, self.runtime.kernels)  # R here is R + J
        r = self.cfg.kv_lora_rank
        latent = self.kv_a_norm(kv_a[..., :r])
        k_rope = apply_rope_interleaved(kv_a[..., None, r:], cos, sin)[:, :, 0, :]
        return {"latent": latent, "k_rope": k_rope}

    def _expanded(self, kv: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """The latent entries expanded per head: keys [B, S, H, K+J] (k_nope | the shared k_rope) and
        values [B, S, H, U], for the fused attention."""
        latent, k_rope = kv["latent"], kv["k_rope"]
        k_nope = qeinsum("BSR,HKR->BSHK", latent, self.wk_b)
        k_rope = jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3], k_rope.shape[-1])).astype(k_nope.dtype)
        return jnp.concatenate([k_nope, k_rope], -1), qeinsum("BSR,HUR->BSHU", latent, self.wv_b)

    def __call__(self, x_BTD, positions_BT, kv: dict[str, jax.Array], mask_BTS, key_valid_BS=None,
                 key_lengths_B=None) -> jax.Array:
        c, kernel = self.cfg, self.runtime.kernels
        if c.q_lora_rank is None:
            q = project("BTD,DHK->BTHK", x_BTD, self.q_w, kernel)
        else:
            q_a = self.q_a_norm(project("BTD,DQ->BTQ", x_BTD, self.q_a_w, kernel))
            q = project("BTQ,QHK->BTHK", q_a, self.q_b_w, kernel)
        q_nope, q_rope = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim :]
        cos, sin = self._rope(positions_BT, x_BTD.dtype)
        q_rope = apply_rope_interleaved(q_rope, cos, sin)
        fused = fused_impl(self.runtime, q.dtype, q.shape[1], c.q_head_dim)
        if fused:
            k_full, v = self._expanded(kv)
            out = attend_fused(jnp.concatenate([q_nope, q_rope], -1), k_full, v, mask_BTS, c.q_head_dim**-0.5,
                               fused, key_valid_BS, self.runtime.attention == "auto")
            if out is not None:
                return project("BTHU,HUD->BTD", out, self.o_w, kernel)
        q_latent = qeinsum("BTHK,HKR->BTHR", q_nope, self.wk_b)
        if key_lengths_B is not None:  # T == 1: [B, 1, H, .] is [B, G = 1, M = H, .]
            out_latent = decode_attention((q_latent, q_rope.astype(q_latent.dtype)),
                                          (kv["latent"][:, :, None], kv["k_rope"][:, :, None]), None, key_lengths_B,
                                          c.q_head_dim**-0.5)
            out = qeinsum("BTHR,HUR->BTHU", out_latent, self.wv_b)
            return project("BTHU,HUD->BTD", out, self.o_w, kernel)
        scores = einsum("BTHJ,BSJ->BHTS", q_rope, kv["k_rope"]) + einsum("BTHR,BSR->BHTS", q_latent, kv["latent"])
        scores = scores * jnp.asarray(c.q_head_dim**-0.5, scores.dtype)
        probs = masked_softmax(scores, mask_BTS[:, None], q.dtype)
        out_latent = einsum("BHTS,BSR->BTHR", probs, kv["latent"])
        out = qeinsum("BTHR,HUR->BTHU", out_latent, self.wv_b)
        return project("BTHU,HUD->BTD", out, self.o_w, kernel)
