"""The whole DeepSeek-VL2: vision tower + projector + tile layout + language model.

Image features are written into the text embeddings by one gather: `image_token_sources` (numpy, on the
host) turns `images_spatial_crop` into, for every position of the sequence, an index into the table
`[projected tile tokens..., image_newline, view_separator]`; positions outside `images_seq_mask` keep
their token embedding. The layout per image is the reference's `global_view_pos="head"` 2D layout: the
global tile's h x w grid with `image_newline` after each row, `view_separator`, then the local tiles
stitched into one (nh*h) x (nw*w) grid, again with `image_newline` after each row.

Parameter layout: vision/..., projector/..., image_newline [D], view_separator [D], language/...
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vl2_jax.config import VL2Config
from vl2_jax.errors import InputError
from vl2_jax.modules.language import LanguageModel
from vl2_jax.modules.layers import normal_init
from vl2_jax.modules.projector import Projector
from vl2_jax.modules.vision import VisionTransformer


def image_token_sources(
    images_spatial_crop: np.ndarray, images_seq_mask: np.ndarray, side: int
) -> tuple[np.ndarray, np.ndarray]:
    """Where each sequence position takes its image embedding from.

    Args:
      images_spatial_crop: [B, n_images, 2] (width tiles, height tiles); rows of zeros end a row's images.
      images_seq_mask: [B, T] True at image-token positions.
      side: tokens per tile side after the projector (h = w).

    Returns:
      tiles: [I, 2] (batch row, tile within the row) of the tiles actually used, in feature order.
      src: [B, T] int32 indices into `[I * side * side tile tokens, image_newline, view_separator]`
        (0 where `images_seq_mask` is False).
    """
    b = images_spatial_crop.shape[0]
    hw = side * side
    tiles: list[tuple[int, int]] = []  # (row, tile within row)
    streams: list[list[int]] = []
    for row in range(b):
        stream: list[int] = []
        first_tile = 0
        for nw, nh in images_spatial_crop[row]:
            nw, nh = int(nw), int(nh)
            if nw == 0 or nh == 0:
                break
            base = len(tiles)
            tiles.extend((row, first_tile + i) for i in range(1 + nw * nh))
            first_tile += 1 + nw * nh
            grid = np.arange(hw).reshape(side, side)
            for r in range(side):  # global view
                stream.extend((base * hw + grid[r]).tolist())
                stream.append(-1)
            stream.append(-2)
            for th in range(nh):  # local views, stitched
                for r in range(side):
                    for tw in range(nw):
                        stream.extend(((base + 1 + th * nw + tw) * hw + grid[r]).tolist())
                    stream.append(-1)
        streams.append(stream)
    newline, separator = len(tiles) * hw, len(tiles) * hw + 1
    src = np.zeros(images_seq_mask.shape, np.int32)
    for row, stream in enumerate(streams):
        positions = np.flatnonzero(images_seq_mask[row])
        if len(positions) != len(stream):
            raise InputError(
                f"batch row {row} has {len(positions)} image-token positions but its images_spatial_crop "
                f"gives {len(stream)} image tokens; the batch was not made by this model's processor."
            )
        s = np.asarray(stream, np.int64)
        s = np.where(s == -1, newline, np.where(s == -2, separator, s))
        src[row, positions] = s
    return np.asarray(tiles, np.int32).reshape(-1, 2), src


class VL2(nn.Module):
    cfg: VL2Config
    dtype: jnp.dtype = jnp.float32
    moe_impl: str = "dense"  # see moe.MoE
    attention: str = "auto"  # see vl2_jax.config.ATTENTION_IMPLS (vision tower and language model)

    def setup(self):
        c = self.cfg
        self.vision = VisionTransformer(c.vision, self.dtype, self.attention)
        self.projector = Projector(c.projector, c.vision.grid, self.dtype)
        d = c.language.hidden_size
        self.image_newline = self.param("image_newline", normal_init(), (d,), self.dtype)
        self.view_separator = self.param("view_separator", normal_init(), (d,), self.dtype)
        self.language = LanguageModel(c.language, self.dtype, self.moe_impl, self.attention)

    def image_features(self, tiles_I3SS: jax.Array) -> jax.Array:
        """Normalised tiles [I, 3, S, S] -> projected tile tokens [I, h*w, D]."""
        return self.projector(self.vision(tiles_I3SS))

    def embed(self, input_ids_BT, tiles_I3SS, src_BT, images_seq_mask_BT) -> jax.Array:
        """Token embeddings with image features scattered in: [B, T, D]. `tiles` may be None (text only)."""
        x_BTD = self.language.embed(input_ids_BT)
        if tiles_I3SS is None:
            return x_BTD
        feats = self.image_features(tiles_I3SS)
        table = jnp.concatenate(
            [feats.reshape(-1, feats.shape[-1]), self.image_newline[None], self.view_separator[None]]
        ).astype(x_BTD.dtype)
        return jnp.where(images_seq_mask_BT[..., None], table[src_BT], x_BTD)

    def __call__(self, input_ids_BT, tiles_I3SS, src_BT, images_seq_mask_BT, positions_BT, valid_BT):
        """Full forward without cache -> float32 logits [B, T, V]."""
        x_BTD = self.embed(input_ids_BT, tiles_I3SS, src_BT, images_seq_mask_BT)
        return self.language(x_BTD, positions_BT, valid_BT)
