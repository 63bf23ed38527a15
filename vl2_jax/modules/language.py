"""The DeepSeek-V2 language model: embedding, pre-norm decoder layers (attention + MLP or MoE), final
RMSNorm and an untied LM head.

Parameter layout (`params["language"]`):
    embed [V, D], layers_{i}: attn_norm/scale [D], attn/..., mlp_norm/scale [D], mlp/...,
    norm/scale [D], lm_head [D, V]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from vl2_jax.cache import KVCache, write
from vl2_jax.config import LanguageConfig, Runtime
from vl2_jax.modules.attention import MHAttention, MLAttention
from vl2_jax.modules.layers import RMSNorm, einsum, normal_init
from vl2_jax.modules.moe import MLP, MoE
from vl2_jax.sharding import constrain


def causal_mask(valid_BT: jax.Array) -> jax.Array:
    """[B, T, T]: query i may attend to key j <= i where key j is a real token (`valid_BT`)."""
    t = valid_BT.shape[1]
    return jnp.tril(jnp.ones((t, t), bool))[None] & valid_BT[:, None, :]


class DecoderLayer(nn.Module):
    cfg: LanguageConfig
    layer: int
    dtype: jnp.dtype = jnp.float32
    runtime: Runtime = Runtime.plain()

    def setup(self):
        c = self.cfg
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype)
        self.attn = (MLAttention if c.use_mla else MHAttention)(c, self.dtype, self.runtime)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype)
        if c.is_moe_layer(self.layer):
            self.mlp = MoE(c, self.dtype, self.runtime)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, self.dtype, self.runtime.kernels)

    def new_kv(self, x_BTD, positions_BT):
        """Key entries [B, T, ...] of these tokens for this layer (see `attention`)."""
        return self.attn.new_kv(self.attn_norm(x_BTD), positions_BT)

    def __call__(self, x_BTD, positions_BT, kv, mask_BTS, key_valid_BS=None) -> jax.Array:
        """See `modules/attention.py` for kv, the mask and `key_valid`."""
        x_BTD = self.attend(x_BTD, positions_BT, kv, mask_BTS, key_valid_BS)
        return constrain(x_BTD + self.mlp(self.mlp_norm(x_BTD)), ("batch", None, None))

    def attend(self, x_BTD, positions_BT, kv, mask_BTS, key_valid_BS=None) -> jax.Array:
        """The residual stream after this layer's attention: [B, T, D]."""
        return x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, kv, mask_BTS, key_valid_BS)


class LanguageModel(nn.Module):
    cfg: LanguageConfig
    dtype: jnp.dtype = jnp.float32
    runtime: Runtime = Runtime.plain()

    def setup(self):
        c = self.cfg
        self.embed_table = self.param("embed", normal_init(), (c.vocab_size, c.hidden_size), self.dtype)
        self.layers = [DecoderLayer(c, i, self.dtype, self.runtime)
                       for i in range(c.num_hidden_layers)]  # layers_{i}
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype)
        self.lm_head = self.param("lm_head", normal_init(), (c.hidden_size, c.vocab_size), self.dtype)

    def embed(self, ids_BT: jax.Array) -> jax.Array:
        """Token ids [B, T] -> embeddings [B, T, D]."""
        return constrain(jnp.take(self.embed_table, ids_BT, axis=0), ("batch", None, None))

    def head(self, x_BTD: jax.Array) -> jax.Array:
        """Final norm and LM head: [B, T, D] -> float32 logits [B, T, V] (computed in the model dtype)."""
        return einsum("BTD,DV->BTV", self.norm(x_BTD), self.lm_head).astype(jnp.float32)

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, valid_BT: jax.Array) -> jax.Array:
        """Full causal forward without a cache: embeddings [B, T, D] -> float32 logits [B, T, V].

        `valid_BT` marks real tokens (False on left padding): keys at padding are never attended to.
        """
        mask_BTS = causal_mask(valid_BT)
        for layer in self.layers:
            x_BTD = layer(x_BTD, positions_BT, layer.new_kv(x_BTD, positions_BT), mask_BTS, valid_BT)
        return self.head(x_BTD)

    def expert_load(self, x_BTD: jax.Array, positions_BT: jax.Array, valid_BT: jax.Array) -> jax.Array:
        """How many of the tokens each routed expert receives, per MoE layer, in a full forward without a
        cache (as `__call__`): int32 [MoE layers, E]. Padding tokens are routed too, as in the forward."""
        mask_BTS, counts = causal_mask(valid_BT), []
        for layer in self.layers:
            kv = layer.new_kv(x_BTD, positions_BT)
            if self.cfg.is_moe_layer(layer.layer):
                _, idx_NX = layer.mlp.choices(layer.mlp_norm(layer.attend(x_BTD, positions_BT, kv, mask_BTS, valid_BT)))
                counts.append(jnp.sum(idx_NX[..., None] == jnp.arange(self.cfg.n_routed_experts), (0, 1)))
            x_BTD = layer(x_BTD, positions_BT, kv, mask_BTS, valid_BT)
        return jnp.stack(counts).astype(jnp.int32) if counts else jnp.zeros((0, 0), jnp.int32)

    def forward_cached(
        self, x_BTD: jax.Array, positions_BT: jax.Array, valid_BT: jax.Array, cache: KVCache, fresh: bool = False
    ) -> tuple[jax.Array, KVCache]:
        """T new tokens written into the cache at `cache.length` -> (float32 logits [B, V] of the last
        token, cache).

        `valid_BT` marks real tokens among the new ones (False on left padding). Used for prefill (whole
        prompt or chunks of it) and decode (T = 1); the cache comes back with the entries written.
        `fresh` (static) says the cache holds nothing yet (the first chunk of a prompt): the tokens then
        attend among themselves, causally, not over the cache's S slots.
        """
        t = x_BTD.shape[1]
        start = cache.length
        valid = jax.lax.dynamic_update_slice(cache.valid, valid_BT, (0, start))
        cache = cache.replace(valid=valid)
        if fresh:
            mask_BTS, key_valid = causal_mask(valid_BT), valid_BT
        else:
            mask_BTS, key_valid = cache.mask(t), None
        layers = []
        for layer, entries in zip(self.layers, cache.layers):
            new = layer.new_kv(x_BTD, positions_BT)
            entries = write(entries, new, start)
            x_BTD = layer(x_BTD, positions_BT, new if fresh else entries, mask_BTS, key_valid)
            layers.append(entries)
        return self.head(x_BTD[:, -1:])[:, 0], cache.replace(layers=tuple(layers), length=start + t)
