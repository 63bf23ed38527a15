"""Self-attention of the language model: MHA (deepseek-vl2-tiny) and multi-head latent attention (MLA).

Both modules map `x [B, T, D]` at `positions [B, T]` to `[B, T, D]`. Keys come from `kv`, a dict of
per-token key entries `[B, S, ...]` that the caller assembles (the current tokens alone, or a cache that
already holds them); `new_kv(x, positions)` computes the entries of the current tokens. `mask [B, T, S]`
is True where a query may attend to a key.

MHA entries: k [B, S, G, K] (rotated), v [B, S, G, K].
MLA entries: latent [B, S, R] (RMS-normed), k_rope [B, S, J] (rotated): 576 numbers per token at the
real sizes. Attention uses the absorbed form, exactly as the reference's eager path: `kv_b_proj` is folded
into the query (`wk_b`) and into the output (`wv_b`).

Parameter layout (`language/layers_{i}/attn`):
    MHA: q_w [D, H, K], kv_w [D, W, G, K] (W = 2: key | value), o_w [H, K, D]
    MLA: q_w [D, H, K+J] (or q_a_w [D, Q], q_a_norm/scale [Q], q_b_w [Q, H, K+J]),
         kv_a_w [D, R+J] (latent | rope key), kv_a_norm/scale [R], wk_b [H, K, R], wv_b [H, U, R], o_w [H, U, D]
Projections that read the same input share one weight (one matmul at decode, where each costs a kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from vl2_jax.config import LanguageConfig
from vl2_jax.modules.layers import (
    RMSNorm,
    apply_rope,
    apply_rope_interleaved,
    einsum,
    normal_init,
    rope_cos_sin,
)

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


class MHAttention(nn.Module):
    cfg: LanguageConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c, init = self.cfg, normal_init()
        h, g, k, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
        self.q_w = self.param("q_w", init, (d, h, k), self.dtype)
        self.kv_w = self.param("kv_w", init, (d, 2, g, k), self.dtype)
        self.o_w = self.param("o_w", init, (h, k, d), self.dtype)

    def _rope(self, positions_BT, dtype):
        return rope_cos_sin(positions_BT, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def new_kv(self, x_BTD: jax.Array, positions_BT: jax.Array) -> dict[str, jax.Array]:
        cos, sin = self._rope(positions_BT, x_BTD.dtype)
        kv = einsum("BTD,DWGK->WBTGK", x_BTD, self.kv_w)
        return {"k": apply_rope(kv[0], cos, sin), "v": kv[1]}

    def __call__(self, x_BTD, positions_BT, kv: dict[str, jax.Array], mask_BTS) -> jax.Array:
        c = self.cfg
        cos, sin = self._rope(positions_BT, x_BTD.dtype)
        q = apply_rope(einsum("BTD,DHK->BTHK", x_BTD, self.q_w), cos, sin)
        b, t, h, k = q.shape
        g = c.num_key_value_heads
        q = q.reshape(b, t, g, h // g, k)
        scores = einsum("BTGhK,BSGK->BGhTS", q, kv["k"]) / jnp.asarray(k**0.5, q.dtype)
        probs = masked_softmax(scores, mask_BTS[:, None, None], q.dtype)
        out = einsum("BGhTS,BSGK->BTGhK", probs, kv["v"]).reshape(b, t, h, k)
        return einsum("BTHK,HKD->BTD", out, self.o_w)


class MLAttention(nn.Module):
    cfg: LanguageConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c, init = self.cfg, normal_init()
        d, h, r = c.hidden_size, c.num_attention_heads, c.kv_lora_rank
        if c.q_lora_rank is None:
            self.q_w = self.param("q_w", init, (d, h, c.q_head_dim), self.dtype)
        else:
            self.q_a_w = self.param("q_a_w", init, (d, c.q_lora_rank), self.dtype)
            self.q_a_norm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS, self.dtype)
            self.q_b_w = self.param("q_b_w", init, (c.q_lora_rank, h, c.q_head_dim), self.dtype)
        self.kv_a_w = self.param("kv_a_w", init, (d, r + c.qk_rope_head_dim), self.dtype)
        self.kv_a_norm = RMSNorm(r, LATENT_NORM_EPS, self.dtype)
        self.wk_b = self.param("wk_b", init, (h, c.qk_nope_head_dim, r), self.dtype)
        self.wv_b = self.param("wv_b", init, (h, c.v_head_dim, r), self.dtype)
        self.o_w = self.param("o_w", init, (h, c.v_head_dim, d), self.dtype)

    def _rope(self, positions_BT, dtype):
        return rope_cos_sin(positions_BT, self.cfg.qk_rope_head_dim, self.cfg.rope_theta, dtype)

    def new_kv(self, x_BTD: jax.Array, positions_BT: jax.Array) -> dict[str, jax.Array]:
        cos, sin = self._rope(positions_BT, x_BTD.dtype)
        kv_a = einsum("BTD,DR->BTR", x_BTD, self.kv_a_w)  # R here is R + J
        r = self.cfg.kv_lora_rank
        latent = self.kv_a_norm(kv_a[..., :r])
        k_rope = apply_rope_interleaved(kv_a[..., None, r:], cos, sin)[:, :, 0, :]
        return {"latent": latent, "k_rope": k_rope}

    def __call__(self, x_BTD, positions_BT, kv: dict[str, jax.Array], mask_BTS) -> jax.Array:
        c = self.cfg
        if c.q_lora_rank is None:
            q = einsum("BTD,DHK->BTHK", x_BTD, self.q_w)
        else:
            q = einsum("BTQ,QHK->BTHK", self.q_a_norm(einsum("BTD,DQ->BTQ", x_BTD, self.q_a_w)), self.q_b_w)
        q_nope, q_rope = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim :]
        cos, sin = self._rope(positions_BT, x_BTD.dtype)
        q_rope = apply_rope_interleaved(q_rope, cos, sin)
        q_latent = einsum("BTHK,HKR->BTHR", q_nope, self.wk_b)
        scores = einsum("BTHJ,BSJ->BHTS", q_rope, kv["k_rope"]) + einsum("BTHR,BSR->BHTS", q_latent, kv["latent"])
        scores = scores * jnp.asarray(c.q_head_dim**-0.5, scores.dtype)
        probs = masked_softmax(scores, mask_BTS[:, None], q.dtype)
        out_latent = einsum("BHTS,BSR->BTHR", probs, kv["latent"])
        out = einsum("BTHR,HUR->BTHU", out_latent, self.wv_b)
        return einsum("BTHU,HUD->BTD", out, self.o_w)
