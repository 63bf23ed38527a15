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

from vl2_jax.cache import KVCache, write_chunks, write_prompts, write_rows
from vl2_jax.config import LanguageConfig, Runtime
from vl2_jax.modules.attention import MHAttention, MLAttention, ragged_decode
from vl2_jax.modules.layers import RMSNorm, normal_init, qeinsum, weight
from vl2_jax.modules.moe import MLP, MoE
from vl2_jax.sharding import constrain


def routed_tokens(t: int, last_N: jax.Array, slots_N: jax.Array, rows: int) -> jax.Array:
    """bool [N, T]: the tokens of a prefill call's chunks that go to the experts: up to each prompt's
    last (`last_N` [N]), in prompts whose slot (`slots_N` [N]) is one of the cache's `rows` (a slot past
    them marks a padding prompt). Padding takes no expert's time."""
    return (jnp.arange(t)[None, :] <= last_N[:, None]) & (slots_N < rows)[:, None]


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

    def __call__(self, x_BTD, positions_BT, kv, mask_BTS, key_valid_BS=None, token_valid_BT=None,
                 key_lengths_B=None) -> jax.Array:
        """See `modules/attention.py` for kv, the mask, `key_valid` and `key_lengths`. `token_valid` [B, T]:
        tokens that take part in expert routing (None: all); the others' MLP output is unspecified."""
        x_BTD = self.attend(x_BTD, positions_BT, kv, mask_BTS, key_valid_BS, key_lengths_B)
        return constrain(x_BTD + self.mlp(self.mlp_norm(x_BTD), token_valid_BT), ("batch", None, None))

    def with_router(self, x_BTD, positions_BT, kv, mask_BTS, key_valid_BS=None, token_valid_BT=None):
        """`__call__` for training: (x [B, T, D], the MoE's (scores [B, T, E], expert ids [B, T, X]) or
        None in a dense layer); see `MoE.with_router`."""
        x_BTD = self.attend(x_BTD, positions_BT, kv, mask_BTS, key_valid_BS)
        h_BTD = self.mlp_norm(x_BTD)
        if not self.cfg.is_moe_layer(self.layer):
            return constrain(x_BTD + self.mlp(h_BTD, token_valid_BT), ("batch", None, None)), None
        y_BTD, router = self.mlp.with_router(h_BTD, token_valid_BT)
        return constrain(x_BTD + y_BTD, ("batch", None, None)), router

    def attend(self, x_BTD, positions_BT, kv, mask_BTS, key_valid_BS=None, key_lengths_B=None) -> jax.Array:
        """The residual stream after this layer's attention: [B, T, D]."""
        return x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, kv, mask_BTS, key_valid_BS, key_lengths_B)


class LanguageModel(nn.Module):
    cfg: LanguageConfig
    dtype: jnp.dtype = jnp.float32
    runtime: Runtime = Runtime.plain()
    layer_class = DecoderLayer  # (training swaps in a rematerialised one: `training.remat`)

    def setup(self):
        c = self.cfg
        self.embed_table = self.param("embed", normal_init(), (c.vocab_size, c.hidden_size), self.dtype)
        self.layers = [self.layer_class(c, i, self.dtype, self.runtime)
                       for i in range(c.num_hidden_layers)]  # layers_{i}
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype)
        self.lm_head = weight(self, "lm_head", normal_init(), (c.hidden_size, c.vocab_size), self.dtype)

    def embed(self, ids_BT: jax.Array) -> jax.Array:
        """Token ids [B, T] -> embeddings [B, T, D]."""
        return constrain(jnp.take(self.embed_table, ids_BT, axis=0), ("batch", None, None))

    def head(self, x_BTD: jax.Array) -> jax.Array:
        """Final norm and LM head: [B, T, D] -> float32 logits [B, T, V] (computed in the model dtype)."""
        return qeinsum("BTD,DV->BTV", self.norm(x_BTD), self.lm_head).astype(jnp.float32)

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, valid_BT: jax.Array) -> jax.Array:
        """Full causal forward without a cache: embeddings [B, T, D] -> float32 logits [B, T, V].

        `valid_BT` marks real tokens (False on left padding): keys at padding are never attended to.
        """
        mask_BTS = causal_mask(valid_BT)
        for layer in self.layers:
            x_BTD = layer(x_BTD, positions_BT, layer.new_kv(x_BTD, positions_BT), mask_BTS, valid_BT)
        return self.head(x_BTD)

    def with_router(self, x_BTD: jax.Array, positions_BT: jax.Array, valid_BT: jax.Array):
        """`__call__` for training: (float32 logits [B, T, V], (scores [L, B, T, E] float32, expert ids
        [L, B, T, X] int32) of the L MoE layers, or None without MoE layers)."""
        mask_BTS, routers = causal_mask(valid_BT), []
        for layer in self.layers:
            x_BTD, router = layer.with_router(x_BTD, positions_BT, layer.new_kv(x_BTD, positions_BT), mask_BTS,
                                              valid_BT)
            if router is not None:
                routers.append(router)
        stacked = tuple(jnp.stack(r) for r in zip(*routers)) if routers else None
        return self.head(x_BTD), stacked

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

    def prefill(self, x_NTD: jax.Array, last_N: jax.Array, cache: KVCache, slots_N: jax.Array
                ) -> tuple[jax.Array, KVCache]:
        """The first T tokens (positions 0..T-1) of N prompts, each into its cache row `slots_N` [N] ->
        (float32 logits [N, V] of each prompt's token at index `last_N` [N], the cache with their entries
        written).

        Each prompt's tokens attend causally among themselves (fused attention runs causal with no mask
        tensor). Tokens past a prompt's last (padding its chunk) come after its real ones, so causality
        alone keeps them out of the real tokens' attention; their entries, written past the prompt, are
        overwritten by later chunks or decoding and never read before; they are routed to no expert. A
        row whose slot is past the cache's rows (B) is a padding prompt: written nowhere, routed nowhere.
        """
        n, t = x_NTD.shape[:2]
        positions_NT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
        routed_NT = routed_tokens(t, last_N, slots_N, cache.rows)
        mask_NTT, key_valid_NT = causal_mask(jnp.ones((n, t), bool)), jnp.ones((n, t), bool)
        layers = []
        for layer, entries in zip(self.layers, cache.layers):
            new = layer.new_kv(x_NTD, positions_NT)
            layers.append(write_prompts(entries, new, slots_N))
            x_NTD = layer(x_NTD, positions_NT, new, mask_NTT, key_valid_NT, routed_NT)
        last_N1D = jnp.take_along_axis(x_NTD, last_N[:, None, None], axis=1)
        return self.head(last_N1D)[:, 0], cache.replace(layers=tuple(layers))

    def extend(self, x_NTD: jax.Array, start_N: jax.Array, last_N: jax.Array, cache: KVCache, slots_N: jax.Array,
               keys: int) -> tuple[jax.Array, KVCache]:
        """Later chunks of N prompts, each in its cache row `slots_N` [N]: T tokens at positions
        start..start+T-1 of its own `start_N` [N] (> 0: the row already holds the ones before) -> (float32
        logits [N, V] of each chunk's token at index `last_N` [N], the cache with their entries written).

        A chunk's tokens attend to the first `keys` (static) entries of their row, their own included:
        key s is visible to query t where s <= start + t. Padding past a prompt's last token, and padding
        prompts (a row past the cache's, B), as in `prefill`.
        """
        n, t = x_NTD.shape[:2]
        positions_NT = start_N[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        routed_NT = routed_tokens(t, last_N, slots_N, cache.rows)
        mask_NTS = jnp.arange(keys)[None, None, :] <= positions_NT[:, :, None]
        rows_N = jnp.minimum(slots_N, cache.rows - 1)  # (a padding prompt reads some row; its output is unused)
        layers = []
        for layer, entries in zip(self.layers, cache.layers):
            entries = write_chunks(entries, layer.new_kv(x_NTD, positions_NT), slots_N, start_N)
            if n == 1:
                kv = {k: jax.lax.dynamic_slice_in_dim(v, rows_N[0], 1, 0)[:, :keys] for k, v in entries.items()}
            else:
                kv = {k: v[rows_N, :keys] for k, v in entries.items()}
            x_NTD = layer(x_NTD, positions_NT, kv, mask_NTS, None, routed_NT)
            layers.append(entries)
        last_N1D = jnp.take_along_axis(x_NTD, last_N[:, None, None], axis=1)
        return self.head(last_N1D)[:, 0], cache.replace(layers=tuple(layers))

    def decode(self, x_N1D: jax.Array, lengths_N: jax.Array, cache: KVCache, keys: int,
               live_N: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """One token for each of the first N slots, fed at its slot's length (the tokens already cached)
        -> (float32 logits [N, V], the cache with each token's entries written at its position).

        Attention reads the first `keys` (static) entries of each slot, up to and including the new one;
        where `ragged_decode` holds (for the cache's rows), only each slot's own entries, read in place.
        `live` [N]: slots whose tokens take part in expert routing and are written to the cache (the
        others' logits are unspecified), so that an empty slot makes no expert's weights be read.
        """
        positions_N1 = lengths_N[:, None]
        n = x_N1D.shape[0]
        # a slot that is not live writes nothing (past the capacity: dropped), since its rows may be
        # taking a new prompt's chunks between decode calls
        write_at = lengths_N if live_N is None else jnp.where(live_N, lengths_N, cache.slots)
        ragged = ragged_decode(self.cfg, self.dtype, self.runtime, cache.slots)
        live_N1 = None if live_N is None else live_N[:, None]
        mask_N1S = None if ragged else (jnp.arange(keys)[None, :] <= lengths_N[:, None])[:, None, :]
        layers = []
        for layer, entries in zip(self.layers, cache.layers):
            entries = write_rows(entries, layer.new_kv(x_N1D, positions_N1), write_at)
            if ragged:
                x_N1D = layer(x_N1D, positions_N1, entries, None, None, live_N1, lengths_N + 1)
            else:
                kv = {k: v[:n, :keys] for k, v in entries.items()}
                x_N1D = layer(x_N1D, positions_N1, kv, mask_N1S, None, live_N1)
            layers.append(entries)
        return self.head(x_N1D)[:, 0], cache.replace(layers=tuple(layers))
