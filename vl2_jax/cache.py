"""The static, preallocated KV cache of the language model.

One `KVCache` holds, per layer, the key entries of every slot `[B, S, ...]` (see `modules/attention.py`:
MHA caches rotated k and v, MLA only the normed latent and the rotated shared rope key), plus which slots
hold real tokens. Its shape never changes during generation; jitted steps take it donated and write the
new tokens' entries in place with `dynamic_update_slice`. All rows share the write position `length`
(prompts are left padded to a common length), while each row keeps its own RoPE positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from vl2_jax.config import LanguageConfig


@struct.dataclass
class KVCache:
    """layers: per layer a dict of [B, S, ...] arrays; valid: [B, S] bool (slot holds a real token);
    length: [] int32, slots written so far."""

    layers: tuple[dict[str, jax.Array], ...]
    valid: jax.Array
    length: jax.Array

    @classmethod
    def zeros(cls, cfg: LanguageConfig, batch: int, slots: int, dtype) -> KVCache:
        """An empty cache. Zero-filled (not `jnp.empty`): unwritten slots are masked, but never garbage."""
        if cfg.use_mla:
            shapes = {"latent": (cfg.kv_lora_rank,), "k_rope": (cfg.qk_rope_head_dim,)}
        else:
            kv = (cfg.num_key_value_heads, cfg.head_dim)
            shapes = {"k": kv, "v": kv}
        layers = tuple(
            {k: jnp.zeros((batch, slots, *s), dtype) for k, s in shapes.items()} for _ in range(cfg.num_hidden_layers)
        )
        return cls(layers, jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    def mask(self, queries: int) -> jax.Array:
        """[B, T, S] attention mask for `queries` new tokens written at `length`: valid and causal."""
        q_slot = self.length + jnp.arange(queries)
        causal = jnp.arange(self.slots)[None, :] <= q_slot[:, None]
        return self.valid[:, None, :] & causal[None]


def write(entries: dict[str, jax.Array], new: dict[str, jax.Array], start: jax.Array) -> dict[str, jax.Array]:
    """Writes new entries [B, T, ...] into the cache arrays [B, S, ...] at slot `start`."""
    out = {}
    for k, cached in entries.items():
        index = (0, start) + (0,) * (cached.ndim - 2)
        out[k] = jax.lax.dynamic_update_slice(cached, new[k].astype(cached.dtype), index)
    return out
