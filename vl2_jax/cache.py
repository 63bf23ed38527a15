"""The static, preallocated KV cache of the language model: one row per engine slot.

`KVCache.layers` holds, per layer, the key entries of every slot `[B, S, ...]` (see `modules/attention.py`:
MHA caches rotated k and v, MLA only the normed latent and the rotated shared rope key). Its shape
never changes: the engine's jitted programs take it donated and write new entries in place: several
prompts' first chunks, each into its slot (`write_prompts`), several prompts' later chunks, each into
its slot from its own start (`write_chunks`; one is `write_chunk`), or one token into each decoding slot
at its own length (`write_rows`). Which entries are real is the engine's business (each slot's length);
unwritten entries are zeros, never garbage, and are always masked.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from vl2_jax.config import LanguageConfig


def entry_shapes(cfg: LanguageConfig) -> dict[str, tuple[int, ...]]:
    """Per-token cache entry shapes of one layer, by name."""
    if cfg.use_mla:
        return {"latent": (cfg.kv_lora_rank,), "k_rope": (cfg.qk_rope_head_dim,)}
    kv = (cfg.num_key_value_heads, cfg.head_dim)
    return {"k": kv, "v": kv}


@struct.dataclass
class KVCache:
    """layers: per layer a dict of [B, S, ...] arrays (B slots, S tokens of capacity each)."""

    layers: tuple[dict[str, jax.Array], ...]

    @classmethod
    def zeros(cls, cfg: LanguageConfig, batch: int, slots: int, dtype) -> KVCache:
        """An empty cache of `batch` rows of `slots` tokens. Zero-filled (not `jnp.empty`)."""
        shapes = entry_shapes(cfg)
        return cls(tuple({k: jnp.zeros((batch, slots, *s), dtype) for k, s in shapes.items()}
                         for _ in range(cfg.num_hidden_layers)))

    @staticmethod
    def bytes_per_token(cfg: LanguageConfig, dtype) -> int:
        """Cache bytes one token takes in one row, all layers together."""
        per_layer = sum(math.prod(s) for s in entry_shapes(cfg).values())
        return per_layer * cfg.num_hidden_layers * jnp.dtype(dtype).itemsize

    @property
    def rows(self) -> int:
        """B: the cache's rows (one per engine slot)."""
        return next(iter(self.layers[0].values())).shape[0]

    @property
    def slots(self) -> int:
        """S: token positions per row."""
        return next(iter(self.layers[0].values())).shape[1]


def write_prompts(entries: dict[str, jax.Array], new: dict[str, jax.Array], rows_N: jax.Array):
    """New entries [N, T, ...] of N prompts' first T tokens written into the cache arrays [B, S, ...] at
    positions 0..T-1 of rows `rows_N` [N]; a row past the cache's (B: a padding prompt) is dropped
    (`write_chunks` from position 0)."""
    return write_chunks(entries, new, rows_N, jnp.zeros(rows_N.shape, jnp.int32))


def write_chunk(entries: dict[str, jax.Array], new: dict[str, jax.Array], row: jax.Array, start: jax.Array):
    """New entries [1, T, ...] of one row written into the cache arrays [B, S, ...] at (row, start)."""
    return {k: jax.lax.dynamic_update_slice(c, new[k].astype(c.dtype), (row, start) + (0,) * (c.ndim - 2))
            for k, c in entries.items()}


def write_chunks(entries: dict[str, jax.Array], new: dict[str, jax.Array], rows_N: jax.Array, starts_N: jax.Array):
    """New entries [N, T, ...] of N prompts' later chunks written into the cache arrays [B, S, ...] at
    positions starts_N[i]..starts_N[i]+T-1 of rows `rows_N` [N]; a row past the cache's (B: a padding
    prompt) is dropped. One chunk is one in-place slice update (`write_chunk`)."""
    n, t = next(iter(new.values())).shape[:2]
    if n == 1:
        return write_chunk(entries, new, rows_N[0], starts_N[0])
    at = starts_N[:, None] + jnp.arange(t)[None, :]
    return {k: c.at[rows_N[:, None], at].set(new[k].astype(c.dtype), mode="drop") for k, c in entries.items()}


def write_rows(entries: dict[str, jax.Array], new: dict[str, jax.Array], positions_N: jax.Array):
    """One new entry per row, [N, 1, ...], written into rows 0..N-1 of the cache arrays [B, S, ...] at
    each row's own position (positions [N]); positions past the capacity are dropped."""
    rows = jnp.arange(positions_N.shape[0])
    return {k: c.at[rows, positions_N].set(new[k][:, 0].astype(c.dtype), mode="drop") for k, c in entries.items()}
