"""The whole DeepSeek-VL2: vision tower + projector + tile layout + language model.

Image features are written into the text embeddings by one gather: the processor's image-token layout
(`processor.image_token_sources`) gives, for every position of the sequence, an index into the table
`[image_newline, view_separator, projected tile tokens...]`; positions outside `images_seq_mask` keep
their token embedding.

Parameter layout: vision/..., projector/..., image_newline [D], view_separator [D], language/...
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from vl2_jax.config import Runtime, VL2Config
from vl2_jax.modules.language import LanguageModel
from vl2_jax.modules.layers import normal_init
from vl2_jax.modules.projector import Projector
from vl2_jax.modules.vision import VisionTransformer


class VL2(nn.Module):
    cfg: VL2Config
    dtype: jnp.dtype = jnp.float32
    runtime: Runtime = Runtime.plain()
    language_class = LanguageModel  # (training swaps in a rematerialised one: `training.remat`)

    def setup(self):
        c = self.cfg
        self.vision = VisionTransformer(c.vision, self.dtype, self.runtime)
        self.projector = Projector(c.projector, c.vision.grid, self.dtype)
        d = c.language.hidden_size
        self.image_newline = self.param("image_newline", normal_init(), (d,), self.dtype)
        self.view_separator = self.param("view_separator", normal_init(), (d,), self.dtype)
        self.language = self.language_class(c.language, self.dtype, self.runtime)

    def image_features(self, tiles_I3SS: jax.Array) -> jax.Array:
        """Normalised tiles [I, 3, S, S] -> projected tile tokens [I, h*w, D]."""
        return self.projector(self.vision(tiles_I3SS))

    def embed(self, input_ids_BT, tiles_I3SS, src_BT, images_seq_mask_BT) -> jax.Array:
        """Token embeddings with image features scattered in: [B, T, D]. `tiles` may be None (text only)."""
        x_BTD = self.language.embed(input_ids_BT)
        if tiles_I3SS is None:
            return x_BTD
        feats = self.image_features(tiles_I3SS)
        table = jnp.concatenate(  # the rows `processor.image_token_sources` indexes
            [self.image_newline[None], self.view_separator[None], feats.reshape(-1, feats.shape[-1])]
        ).astype(x_BTD.dtype)
        return jnp.where(images_seq_mask_BT[..., None], table[src_BT], x_BTD)

    def __call__(self, input_ids_BT, tiles_I3SS, src_BT, images_seq_mask_BT, positions_BT, valid_BT):
        """Full forward without cache -> float32 logits [B, T, V]."""
        x_BTD = self.embed(input_ids_BT, tiles_I3SS, src_BT, images_seq_mask_BT)
        return self.language(x_BTD, positions_BT, valid_BT)

    def with_router(self, input_ids_BT, tiles_I3SS, src_BT, images_seq_mask_BT, positions_BT, valid_BT):
        """`__call__` for training: (float32 logits [B, T, V], the MoE layers' router scores and choices:
        `LanguageModel.with_router`)."""
        x_BTD = self.embed(input_ids_BT, tiles_I3SS, src_BT, images_seq_mask_BT)
        return self.language.with_router(x_BTD, positions_BT, valid_BT)
